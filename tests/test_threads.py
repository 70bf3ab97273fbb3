"""CPU threads: a run takes the cores it may use, shared among its job's processes on the
machine, unless --threads or OMP_NUM_THREADS says how many; the log states the count, the
demo runs on one thread, and a resumed run keeps the count it started with."""
import os
import re
import signal

import pytest

from helpers import ENV, TINY, run_main, send_when_logged, start_main
from utils import threads

WITHOUT_OMP = {k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def test_the_count_is_the_option_else_the_environment_else_the_shared_cores(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    assert threads.choose(3, {"OMP_NUM_THREADS": "5"}) == 3
    assert threads.choose(None, {"OMP_NUM_THREADS": "5"}) == 5
    assert threads.choose(None, {}) == 8
    assert threads.choose(None, {"LOCAL_WORLD_SIZE": "4"}) == 2    # torchrun: 4 ranks on this machine
    assert threads.choose(None, {"LOCAL_WORLD_SIZE": "16"}) == 1
    assert threads.choose(None, {"OMP_NUM_THREADS": "", "LOCAL_WORLD_SIZE": "x"}) == 8  # unusable values


def test_usable_cores_follow_the_affinity_mask():
    """A process allowed one core (taskset, a scheduler's cpuset) counts one."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no affinity masks on this system")
    allowed = os.sched_getaffinity(0)
    pid = os.fork()
    if pid == 0:
        os.sched_setaffinity(0, {min(allowed)})
        os._exit(0 if threads.usable_cores() == 1 else 1)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert threads.usable_cores() <= len(allowed)


def test_a_busy_cpu_is_named_with_advice(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (1.9, 1.0, 1.0))
    assert threads.describe(2) == ("2 CPU threads (the CPU was busy at the start, load 1.9 on 2 cores: with "
                                   "fewer threads, --threads 1, this run may be faster)")
    assert threads.describe(1) == "1 CPU thread"
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert threads.describe(2) == "2 CPU threads"


def device_line(results, save):
    with open(results / f"{save}.txt") as f:
        return next(line for line in f if line.startswith("Device:"))


def test_the_log_states_the_count(cifar10_root, tmp_path):
    run = run_main(*TINY, "--data_root", cifar10_root, "--results_dir", tmp_path, "--save", "two", "--epochs", 1,
                   "--threads", 2, env=WITHOUT_OMP)
    assert run.returncode == 0, run.stderr
    assert re.match(r"Device: cpu \(2 CPU threads[ )]", device_line(tmp_path, "two"))


def test_a_resumed_run_goes_on_with_its_thread_count(cifar10_root, tmp_path):
    """Stopped after its first epoch (SIGTERM), resumed with neither --threads nor
    OMP_NUM_THREADS: it goes on with the 2 threads it started with."""
    output = tmp_path / "out"
    process = start_main(*TINY, "--data_root", cifar10_root, "--results_dir", tmp_path, "--save", "run",
                         "--epochs", 3, "--threads", 2, output=output)
    send_when_logged(process, output, r"^Epoch 1/3", signal.SIGTERM)
    resumed = run_main("--resume", tmp_path / "run", "--gpus", "cpu", env=WITHOUT_OMP)
    assert resumed.returncode == 0, resumed.stderr
    with open(tmp_path / "run.txt") as f:
        log = f.read()
    assert re.search(r"^Resumed from .*; 2 CPU threads", log, re.M), log
