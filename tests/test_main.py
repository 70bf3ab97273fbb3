"""main.py end to end, in subprocesses, on small generated datasets in the CIFAR
on-disk format."""
import json
import os
import re

import pytest
import torch

from config import Config
from helpers import (ENV, TINY, assert_clear_error, epoch_lines, folder_digest, load_checkpoint, metrics_without_seconds,
                     run_main)
from models import build_model, is_binary
from utils.run_dir import RunDir

BEST = re.compile(r"^Best Prec@1: (\d+\.\d\d) \(epoch (\d+)/(\d+)\)$")
EPOCH = re.compile(r"^Epoch (\d+)/(\d+) .*val loss \S+ Prec@1 (\S+) .*mean-net Prec@1 (\S+)")


def tiny_run(data_root, results, save, *extra):
    return run_main(*TINY, "--data_root", data_root, "--epochs", 2, "--results_dir", results,
                    "--save", save, *extra)


@pytest.fixture(scope="module")
def finished_run(cifar10_root, tmp_path_factory):
    results = tmp_path_factory.mktemp("results")
    done = tiny_run(cifar10_root, results, "tiny")
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


def test_run_folder_holds_config_csv_and_both_checkpoints(finished_run):
    results, _ = finished_run
    run = RunDir(str(results), "tiny")
    rows = metrics_without_seconds(run.metrics)
    assert [row["epoch"] for row in rows] == ["1", "2"]
    with open(run.config) as f:
        settings = json.load(f)
    assert Config.from_dict(settings) == Config(model="resnet18", dataset="cifar10", width=4, epochs=2,
                                                batch_size=64, L=2, K=2, warmup_epochs=1, seed=1)
    ckpt, best = load_checkpoint(run.checkpoint), load_checkpoint(run.best)
    assert ckpt["epoch"] == 2 and best["epoch"] == ckpt["best_epoch"]
    assert ckpt["config"] == settings and ckpt["run"] == "tiny"
    last = ckpt["history"][-1]  # numbers, which metrics.csv writes rounded
    assert isinstance(last["val_prec1"], float) and f"{last['val_prec1']:.2f}" == rows[-1]["val_prec1"]
    # the optimizer state of the first binary weight, found by its name
    named = list(build_model("resnet18", 10, 4).named_parameters())
    names = [name for name, _ in named]
    first = next(i for i, (_, p) in enumerate(named) if is_binary(p))
    assert names[first] == "layer1.0.conv1.weight"
    assert set(ckpt["optimizer"]["state"][first]) == {"M", "Z", "M_momentum", "Z_momentum"}
    assert set(best["optimizer"]["state"][first]) == {"M", "Z"}  # no momenta in model_best
    assert "generator" in ckpt["optimizer"]
    # the network's own binary weights are the mean network sign(M)
    assert torch.equal(ckpt["model"][names[first]], torch.sign(ckpt["optimizer"]["state"][first]["M"]))


@pytest.mark.parametrize("file", ["model_best.pth.tar", "checkpoint.pth.tar"])
def test_evaluate_at_the_logs_L_reproduces_the_logged_epoch(finished_run, file):
    """The evaluation draws of an epoch come from the run's seed and that epoch: --evaluate
    of its checkpoint with the log's L draws the same networks, and prints the loss, top-1
    and top-5 of the log's line, and the mean network's top-1 (reading the data from
    where the run was trained)."""
    results, _ = finished_run
    rows = metrics_without_seconds(results / "tiny" / "metrics.csv")
    epoch = int(rows[-1]["best_epoch"]) if file == "model_best.pth.tar" else len(rows)
    logged = rows[epoch - 1]
    out = run_main("--evaluate", results / "tiny" / file, "--gpus", "cpu", "-L", 2)
    assert out.returncode == 0, out.stderr
    test = re.search(r"Test: loss (\S+)\s+Prec@1 (\S+)\s+Prec@5 (\S+)\s+\(L=2\)\s+\|\s+mean network Prec@1 (\S+)",
                     out.stdout)
    assert test, out.stdout
    assert test.groups() == (logged["val_loss"], logged["val_prec1"], logged["val_prec5"], logged["mean_prec1"])


def test_a_notebook_evaluates_as_the_command_line_does(finished_run, capsys):
    """The typed request of evaluate.py's docstring, in this process: the figures of the
    log's best epoch, as --evaluate prints them."""
    from evaluate import Evaluation, evaluate
    results, _ = finished_run
    rows = metrics_without_seconds(results / "tiny" / "metrics.csv")
    logged = rows[int(rows[-1]["best_epoch"]) - 1]
    assert evaluate(Evaluation(str(results / "tiny" / "model_best.pth.tar"), asked=Config(L=2), typed={"L"})) == 0
    printed = capsys.readouterr().out
    test = re.search(r"Test: loss (\S+)\s+Prec@1 (\S+)\s+Prec@5 (\S+)\s+\(L=2\)\s+\|\s+mean network Prec@1 (\S+)",
                     printed)
    assert test, printed
    assert test.groups() == (logged["val_loss"], logged["val_prec1"], logged["val_prec5"], logged["mean_prec1"])
    assert f"training images: Prec@1 {logged['deployed_prec1']}  " in printed


def test_piped_output_shows_progress_inside_an_epoch(cifar10_root, tmp_path):
    """Where stderr is a file (a cluster job), no progress bar: a plain line of progress
    every minute, or every VISPA_PROGRESS_SECONDS (here every batch)."""
    out = run_main(*TINY, "--data_root", cifar10_root, "--epochs", 2, "--results_dir", tmp_path, "--save", "piped",
                   env=dict(ENV, VISPA_PROGRESS_SECONDS="0"))
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert "train: 1/5 batches (20%) in" in lines[0] and "s to go" in lines[0], lines[:3]
    assert any(line.startswith("eval L=2: 1/1 batches (100%)") for line in lines), lines
    assert not any("\r" in line for line in lines)


def test_same_seed_same_machine_gives_identical_metrics(finished_run, cifar10_root, tmp_path):
    results, _ = finished_run
    again = tiny_run(cifar10_root, tmp_path, "tiny")
    assert again.returncode == 0, again.stderr
    assert metrics_without_seconds(tmp_path / "tiny" / "metrics.csv") == metrics_without_seconds(results / "tiny" / "metrics.csv")
    assert epoch_lines(open(tmp_path / "tiny.txt").read()) == epoch_lines(open(results / "tiny.txt").read())


def test_vgg16_and_cifar100_layout_run_end_to_end(cifar100_root, tmp_path):
    out = run_main("--gpus", "cpu", "--dataset", "cifar100", "--data_root", cifar100_root,
                   "--model", "vgg16_cifar100_sdp", "--width", 8, "--epochs", 1, "--warmup_epochs", 1,
                   "-b", 80, "-L", 2,
                   "-K", 1, "--seed", 2, "--results_dir", tmp_path / "results", "--save", "vgg")
    assert out.returncode == 0, out.stderr
    assert BEST.match(open(tmp_path / "results" / "vgg.txt").read().splitlines()[-1])


def test_a_recipe_gives_its_settings_and_options_override_them(cifar10_root, tmp_path):
    out = run_main("--recipe", "vgg16_1w32a_cifar10", "--width", 4, "--epochs", 1, "--warmup_epochs", 1,
                   "-b", 100, "-L", 1,
                   "--gpus", "cpu", "--data_root", cifar10_root, "--results_dir", tmp_path, "--save", "r")
    assert out.returncode == 0, out.stderr
    with open(RunDir(str(tmp_path), "r").config) as f:
        settings = json.load(f)
    assert (settings["model"], settings["dataset"], settings["width"], settings["K"], settings["lr"]) == \
        ("vgg16", "cifar10", 4, 8, 0.1)


def test_demo_learns_far_above_chance(tmp_path):
    """The advertised first command: the whole pipeline on generated data with real
    class structure (10 classes, chance = 10%), on one CPU thread whatever the machine
    has (OMP_NUM_THREADS unset), so that its result does not depend on the cores."""
    env = {k: v for k, v in ENV.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    os.makedirs(tmp_path / "demo_data" / ".writing.x1")  # a demo killed while it wrote its data
    (tmp_path / "demo_data" / ".writing.x1" / "data_batch_1").write_bytes(b"half")
    out = run_main("--demo", "--results_dir", tmp_path, timeout=900, env=env)
    assert out.returncode == 0, out.stderr
    assert os.listdir(tmp_path / "demo_data") == ["cifar-10-batches-py"]
    log = open(tmp_path / "demo.txt").read().splitlines()
    best = BEST.match(log[-1])
    assert best and float(best.group(1)) >= 60.0, best and best.group(0)
    assert (tmp_path / "demo" / "model_best.pth.tar").exists()
    assert any(re.match(r"Device: cpu \(1 CPU thread[ )]", line) for line in log), log[:4]
    assert f"Files: this log is {tmp_path / 'demo.txt'}; the checkpoints, metrics.csv and config.json are in " \
           f"{tmp_path / 'demo'}/" in log

    # the network to deploy: the log's figures of it, --evaluate's and those of its export are the same
    logged = next(line for line in log if line.startswith(f"Deployed network of epoch {best.group(2)}, "))
    figures = re.search(r": (Prec@1 .*)$", logged).group(1)
    evaluated = run_main("--evaluate", tmp_path / "demo" / "model_best.pth.tar", "-L", 4, "--threads", 1, env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"Deployed network, sign(M) with BatchNorm statistics recomputed on 2,000 training images: {figures}" \
        in evaluated.stdout
    exported = run_main("--export", tmp_path / "demo" / "model_best.pth.tar", "--out", tmp_path / "demo.bnn",
                        "--threads", 1, env=env)
    assert exported.returncode == 0, exported.stderr
    deployed = run_main("--evaluate", tmp_path / "demo.bnn", "--threads", 1, env=env)
    assert deployed.returncode == 0, deployed.stderr
    prec1, prec5, calibration = re.fullmatch(r"Prec@1 (\S+)  Prec@5 (\S+)  (NLL .*)", figures).groups()
    assert f"Calibration: {calibration}\n" in deployed.stdout
    assert f"Prec@1 {prec1}  Prec@5 {prec5}  (the deployed network sign(M))" in deployed.stdout


def test_the_demo_replaces_its_own_earlier_run_and_no_other_run_named_demo(cifar10_root, tmp_path):
    results = tmp_path / "results"
    mine = tiny_run(cifar10_root, results, "demo")
    assert mine.returncode == 0, mine.stderr
    before = folder_digest(results / "demo")
    refused = run_main("--demo", "--results_dir", results)
    assert folder_digest(results / "demo") == before
    assert_clear_error(refused, "holds a run that is not the demo's (trained on", "--demo replaces only its own")


def test_help_explains_every_option_with_its_default():
    out = run_main("--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())  # argparse wraps lines
    for flag, explanation in [
            ("--model", "network: resnet18, vgg16"), ("--dataset", "(default: cifar100)"),
            ("-K", "rank of the covariance factor Z; 0 = plain latent weights"),
            ("-L", "samples per test image; the logits of the L passes are averaged (default: 40)"),
            ("--scale", "the draw is r ~ N(0, I_K / S); the Z gradient is scaled by sqrt(S) (default: 100.0)"),
            ("--lr", "peak learning rate (default: 0.1)"), ("--wd", "(default: 0.0005)"),
            ("--epochs", "(default: 500)"), ("--batch-size", "(default: 256)"),
            ("--recipe", "start from one of the authors' configurations"),
            ("--gpus", "CUDA device index, or 'cpu'"), ("--resume", "continue a run from its latest checkpoint"),
            ("--rewind", "discarding the run's later epochs"), ("--fork", "start the new run NAME"),
            ("--evaluate", "K is read from the file"), ("--bf16", "bfloat16 autocast"),
            ("--projection", "the paper's constraint"), ("--demo", "generated dataset"),
            ("--data_root", "with --resume or --evaluate of a checkpoint of ours, the folder the run was trained on"),
            ("--results_dir", "(default: ./results)")]:
        assert flag in out.stdout, flag
        assert explanation in text, (flag, explanation)
    assert "(default: None)" not in text and "(default: False)" not in text
