"""main.py end to end, in subprocesses, on small generated datasets in the CIFAR
on-disk format."""
import re

import pytest
import torch

from data.synthetic import write_structured_cifar
from helpers import epoch_lines, metrics_without_seconds, run_main

BEST = re.compile(r"^Best Prec@1: (\d+\.\d\d) \(epoch (\d+)/(\d+)\)$")
EPOCH = re.compile(r"^Epoch (\d+)/(\d+) .*val loss \S+ Prec@1 (\S+) .*mean-net Prec@1 (\S+)")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_structured_cifar(str(root), "cifar10", num_train=300, num_test=100, seed=3)
    return root


def tiny_run(data_root, results, save, *extra):
    return run_main("--gpus", "cpu", "--dataset", "cifar10", "--data_root", data_root,
                    "--model", "resnet18", "--width", 4, "--epochs", 2, "-b", 64, "-L", 2, "-K", 2,
                    "--warmup_epochs", 1, "--seed", 1, "--results_dir", results, "--save", save, *extra)


@pytest.fixture(scope="module")
def finished_run(data_root, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    done = tiny_run(data_root, results, "tiny")
    assert done.returncode == 0, done.stderr
    return results, done


def test_log_ends_with_the_best_line_and_names_every_epoch(finished_run):
    results, _ = finished_run
    log = open(results / "tiny.txt").read().splitlines()
    best = BEST.match(log[-1])
    assert best, log[-1]
    epochs = [EPOCH.match(line).groups() for line in log if line.startswith("Epoch ")]
    assert [int(e[0]) for e in epochs] == [1, 2]
    val = [float(e[2]) for e in epochs]
    assert float(best.group(1)) == max(val)
    assert int(best.group(2)) == 1 + val.index(max(val)) and best.group(3) == "2"
    assert sum(1 for line in log if line.startswith("Best Prec@1")) == 1


def test_run_folder_holds_csv_and_both_checkpoints(finished_run):
    results, _ = finished_run
    rows = metrics_without_seconds(results / "tiny" / "metrics.csv")
    assert [row["epoch"] for row in rows] == ["1", "2"]
    ckpt = torch.load(results / "tiny" / "checkpoint.pth.tar", weights_only=True)
    best = torch.load(results / "tiny" / "model_best.pth.tar", weights_only=True)
    assert ckpt["epoch"] == 2 and best["epoch"] == ckpt["best_epoch"]
    assert {"M", "Z", "M_momentum", "Z_momentum"} <= set(ckpt["optimizer"]["state"][3])
    assert {"M", "Z"} <= set(best["optimizer"]["state"][3])


def test_evaluate_reproduces_the_logged_mean_network_accuracy(finished_run, data_root):
    results, _ = finished_run
    rows = metrics_without_seconds(results / "tiny" / "metrics.csv")
    best_epoch = int(rows[-1]["best_epoch"])
    logged = rows[best_epoch - 1]
    out = run_main("--evaluate", results / "tiny" / "model_best.pth.tar", "--gpus", "cpu", "-L", 2,
                   "--data_root", data_root)
    assert out.returncode == 0, out.stderr
    mean = re.search(r"mean network Prec@1 (\S+)", out.stdout).group(1)
    assert mean == logged["mean_prec1"]
    assert re.search(r"Test: loss \S+\s+Prec@1 \S+\s+Prec@5 \S+\s+\(L=2\)", out.stdout)


def test_same_seed_same_machine_gives_identical_metrics(finished_run, data_root, tmp_path):
    results, _ = finished_run
    again = tiny_run(data_root, tmp_path, "tiny")
    assert again.returncode == 0, again.stderr
    assert metrics_without_seconds(tmp_path / "tiny" / "metrics.csv") == metrics_without_seconds(results / "tiny" / "metrics.csv")
    assert epoch_lines(open(tmp_path / "tiny.txt").read()) == epoch_lines(open(results / "tiny.txt").read())


def test_vgg16_and_cifar100_layout_run_end_to_end(tmp_path):
    write_structured_cifar(str(tmp_path / "data"), "cifar100", num_train=200, num_test=50, seed=4)
    out = run_main("--gpus", "cpu", "--dataset", "cifar100", "--data_root", tmp_path / "data",
                   "--model", "vgg16_cifar100_sdp", "--width", 8, "--epochs", 1, "-b", 50, "-L", 2,
                   "-K", 1, "--seed", 2, "--results_dir", tmp_path / "results", "--save", "vgg")
    assert out.returncode == 0, out.stderr
    assert BEST.match(open(tmp_path / "results" / "vgg.txt").read().splitlines()[-1])


def test_demo_learns_far_above_chance(tmp_path):
    """The advertised first command: the whole pipeline on generated data with real
    class structure (10 classes, chance = 10%)."""
    out = run_main("--demo", "--results_dir", tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr
    best = BEST.match(open(tmp_path / "demo.txt").read().splitlines()[-1])
    assert best and float(best.group(1)) >= 60.0, best and best.group(0)
    assert (tmp_path / "demo" / "model_best.pth.tar").exists()


def test_help_explains_the_options():
    out = run_main("--help")
    assert out.returncode == 0
    for flag in ("--model", "--dataset", "-K", "-L", "--scale", "--gpus", "--resume", "--evaluate",
                 "--bf16", "--projection", "--demo"):
        assert flag in out.stdout
