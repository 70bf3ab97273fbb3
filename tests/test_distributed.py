"""Several ranks, as the authors' torchrun runs: two processes on the CPU (gloo) train as
one process with two virtual ranks does, to the bit; a stop on one rank stops both at
the same step, and the run resumes exactly."""
import os
import re
import signal
import subprocess
import socket
import sys
import time

import pytest
import torch

from helpers import ENV, REPO, assert_bit_identical, assert_clear_error, load_checkpoint, read_text, run_main, tiny_for

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def torchrun_command(*args):
    return TORCHRUN + [os.path.join(REPO, "main.py"), *map(str, args)]


def torchrun(*args, timeout=300):
    return subprocess.run(torchrun_command(*args), cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def tiny(data, results, save, epochs, method="vispa"):
    return [*tiny_for("--method", method), "--data_root", data, "--results_dir", results, "--save", save, "--epochs",
            epochs, "--method", method]


def state(results, save):
    """The network and the optimizer's state (VISPA's M, Z and momenta; BayesBiNN's or the
    STE's latent weights and moments) of a run's last checkpoint."""
    ckpt = load_checkpoint(os.path.join(results, save, "checkpoint.pth.tar"))
    return {"model": ckpt["model"], "optimizer": ckpt["optimizer"]["state"]}


@pytest.mark.parametrize("method", ["vispa", "bayesbinn", "ste"])
def test_two_ranks_train_as_two_virtual_ranks_of_one_process(cifar10_root, tmp_path, method):
    """Each rank: its own shard, its own draws, its own BatchNorm batch statistics; the
    gradients averaged; the running statistics rank 0's. The same seeds give the same
    optimizer state, real parameters and running statistics, bit for bit, whichever
    method trains the binary weights."""
    results = tmp_path / "results"
    args = lambda save: tiny(cifar10_root, results, save, 2, method)  # noqa: E731
    two = torchrun(*args("two"))
    assert two.returncode == 0, two.stdout + two.stderr
    assert "2 ranks x 1 virtual; 3 training steps per epoch" in read_text(results / "two.txt")
    virtual = run_main(*args("virtual"), "--virtual-ranks", 2)
    assert virtual.returncode == 0, virtual.stderr
    assert "2 virtual ranks; 3 training steps per epoch" in read_text(results / "virtual.txt")
    assert state(results, "two")["optimizer"], "no optimizer state to compare"
    assert_bit_identical(state(results, "two"), state(results, "virtual"), "the state after 6 steps")
    # and it is not the state of one rank alone
    one = run_main(*args("one"))
    assert one.returncode == 0
    assert not all(a.equal(b) for a, b in zip(state(results, "one")["model"].values(),
                                              state(results, "two")["model"].values()))


def worker_of_rank(agent_pid, rank):
    """The pid of the torchrun worker process of ``rank``."""
    children = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
    for pid in children:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"RANK={rank}".encode() in f.read().split(b"\0"):
                    return int(pid)
        except OSError:
            continue
    return None


def test_a_stop_on_one_rank_stops_both_and_the_run_resumes_exactly(cifar10_root, tmp_path):
    results = tmp_path / "results"
    straight = torchrun(*tiny(cifar10_root, results, "straight", 8))
    assert straight.returncode == 0, straight.stdout + straight.stderr

    log = results / "stopped.txt"
    agent = subprocess.Popen(torchrun_command(*tiny(cifar10_root, results, "stopped", 8)), cwd=REPO, env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not re.search(r"^Epoch 1/8", read_text(log), re.M):
        assert agent.poll() is None and time.time() < deadline, "the run ended before epoch 1 was logged"
        time.sleep(0.01)
    os.kill(worker_of_rank(agent.pid, 1), signal.SIGTERM)  # rank 1 only
    agent.wait(timeout=120)
    stopped = re.search(r"^Stopped by SIGTERM during epoch (\d+)/8; the checkpoint of epoch (\d+) is \S+\. "
                        r"Resume with: torchrun --nproc_per_node 2 main.py --resume (\S+)", read_text(log), re.M)
    assert stopped, read_text(log)
    assert int(stopped.group(2)) == int(stopped.group(1)) - 1 < 8
    assert load_checkpoint(results / "stopped" / "checkpoint.pth.tar")["epoch"] == int(stopped.group(2))

    one_rank = run_main("--resume", results / "stopped", "--data_root", cifar10_root, "--gpus", "cpu")
    assert_clear_error(one_rank, "was trained on 2 rank(s), and this run has 1: resume it with as many")
    resumed = torchrun("--resume", results / "stopped", "--data_root", cifar10_root, "--gpus", "cpu")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    a, b = (load_checkpoint(results / name / "checkpoint.pth.tar") for name in ("straight", "stopped"))
    assert a["epoch"] == b["epoch"] == 8
    for part in ("model", "optimizer", "ranks"):
        assert_bit_identical(a[part], b[part], part)
    assert [row["val_prec1"] for row in a["history"]] == [row["val_prec1"] for row in b["history"]]


def test_the_deployed_networks_statistics_are_those_of_the_union_of_the_ranks_batches(cifar10_root, tmp_path):
    """Two gloo ranks, each with its shard of the recalibration images (the union path of
    ``recalibrate``), give the BatchNorm statistics of one process with two virtual ranks,
    whose batch at every step is the union batch (torch's own BatchNorm path)."""
    outputs = {}
    for name, world_size in (("two ranks", 2), ("virtual ranks", 1)):
        out, port = tmp_path / name.replace(" ", "-"), str(free_port())
        processes = [subprocess.Popen([sys.executable, "-c", UNION_STATISTICS, cifar10_root, str(out), str(rank),
                                       str(world_size), port], cwd=REPO, env=ENV) for rank in range(world_size)]
        assert [p.wait(timeout=300) for p in processes] == [0] * len(processes)
        outputs[name] = torch.load(out, weights_only=True)
    two, one = outputs["two ranks"], outputs["virtual ranks"]
    assert two["images"] == one["images"] == 300 and sorted(two["statistics"]) == sorted(one["statistics"])
    for key in one["statistics"]:
        torch.testing.assert_close(two["statistics"][key], one["statistics"][key], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(one["statistics"][k], one["before"][k]) for k in one["before"])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# In a process of its own: rank RANK of WORLD recomputes the statistics of a fixed network on
# its part of --recalibrate 300 training images (two virtual ranks in all) and rank 0 saves them.
UNION_STATISTICS = """
import sys, datetime, torch, torch.distributed as dist
from config import Config
from factory import DataFolder, build, recalibration_batches
from optim import recalibrate
from utils import distributed
root, out, rank, world, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
cfg = Config(model="resnet18", dataset="cifar10", width=4, K=2, batch_size=64, recalibrate=300, seed=3,
             virtual_ranks=2 // world)
model, opt = build(cfg, torch.device("cpu"))
before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
grid = distributed.World(rank, world, rank) if world > 1 else distributed.World()
if world > 1:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
images = recalibrate(model, opt, recalibration_batches(cfg, DataFolder(root), torch.device("cpu"), grid),
                     distributed.summing(grid))
if rank == 0:
    torch.save({"images": images, "before": before,
                "statistics": {k: v for k, v in model.state_dict().items() if "running" in k}}, out)
if world > 1:
    dist.destroy_process_group()
"""
