"""python -m utils.summarize on logs written by main.py: runs grouped by configuration,
mean ± std (ddof=1), min and max against the logs, and a running run marked."""
import os
import re
import signal
import statistics
import subprocess
import sys

from tests.scripts_support import REPO, read_log, script_env, wait_for, write_tiny_cifar100
from utils.summarize import TAIL_BYTES, read_tail


def start_run(results, data_root, save, seed, epochs):
    return subprocess.Popen(
        [sys.executable, os.path.join(REPO, "main.py"), "--gpus", "cpu", "--model", "resnet18",
         "--width", "4", "--epochs", str(epochs), "-b", "64", "-L", "2", "-K", "2",
         "--warmup_epochs", "1", "--seed", str(seed), "--data_root", data_root,
         "--results_dir", str(results), "--save", save],
        env=script_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def summarize(results):
    return subprocess.run([sys.executable, "-m", "utils.summarize", str(results)], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=60)


def test_groups_statistics_and_running_runs(tmp_path):
    data_root = write_tiny_cifar100(str(tmp_path / "data"))
    results = tmp_path / "results"
    finished = {seed: start_run(results, data_root, f"resnet18_seed={seed}_w4", seed, 2) for seed in (1, 2)}
    running = start_run(results, data_root, "resnet18_seed=3_w4_long", 3, 30)
    (tmp_path / "results").mkdir(exist_ok=True)
    (results / "notes.txt").write_text("not a run log\n")
    try:
        for process in finished.values():
            assert process.wait(timeout=300) == 0, process.stderr.read()
        long_log = results / "resnet18_seed=3_w4_long.txt"
        wait_for(lambda: long_log.exists() and "Epoch 1/30" in long_log.read_text(), timeout=300)
        result = summarize(results)
    finally:
        running.send_signal(signal.SIGTERM)
        running.wait(timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "mean ± sample std (ddof=1)" in lines[0]

    bests = [read_log(results / f"resnet18_seed={seed}_w4.txt")[1][0] for seed in (1, 2)]
    mean, std = statistics.mean(bests), statistics.stdev(bests)
    group = lines.index("resnet18_seed=*_w4")
    assert lines[group + 1].split() == ["n=2", "best", "top-1", f"{mean:.2f}", "±", f"{std:.2f}",
                                        "min", f"{min(bests):.2f}", "max", f"{max(bests):.2f}"]
    assert not lines[group + 2].strip().startswith("running")  # both finished

    long_group = lines.index("resnet18_seed=*_w4_long")
    assert "n=1" in lines[long_group + 1] and "one run, no std" in lines[long_group + 1]
    marked = re.fullmatch(r"    running or stopped \(1 of 1\): seed=3 at epoch (\d+)/30", lines[long_group + 2])
    assert marked and 1 <= int(marked.group(1)) < 30
    assert lines[-1] == "(not run logs, ignored: notes.txt)"


def test_reads_only_the_end_of_a_log(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("".join(f"line {i}\n" for i in range(200_000)))
    lines = read_tail(str(path))
    assert lines[-1] == "line 199999"
    assert sum(len(line) + 1 for line in lines) <= TAIL_BYTES
    assert all(re.fullmatch(r"line \d+", line) for line in lines)  # no cut first line
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], 200_000))


def test_no_logs_is_an_error(tmp_path):
    result = summarize(tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: no run logs (*.txt ending with a 'Best Prec@1' line) in {tmp_path}"
