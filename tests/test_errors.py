"""Every bad input ends main.py with one clear line on stderr ("error: ...", or
argparse's own message), a non-zero exit, and no existing file changed - and a
start that fails leaves nothing behind that would block the next one. A full disk
during a save leaves the previous checkpoint as it was. All through main.py in
subprocesses, on the CPU."""
import os
import re
import resource
import shutil
import signal

import pytest
import torch

from helpers import (BEST, CHECKPOINT, TINY, folder_digest, load_checkpoint, read_text, run_main,
                     send_when_logged, start_main, temporary_files)
from models import build_model, is_binary, released
from optim import VISPA
import checkpoint
from utils import files
from utils.manifest import Manifest
from utils.run_dir import RunDir
from data import DATASETS


class World:
    """A dataset, a finished run ``base`` and a folder of damaged or foreign files."""

    def __init__(self, root, data):
        self.data = data
        self.results = str(root / "results")
        self.files = str(root / "files")
        self.base = os.path.join(self.results, "base")
        self.checkpoint = os.path.join(self.base, CHECKPOINT)

    def digest(self):
        return folder_digest(self.data, self.results, self.files)


@pytest.fixture(scope="module")
def world(tmp_path_factory, cifar10_root):
    w = World(tmp_path_factory.mktemp("world"), cifar10_root)
    r = run_main(*TINY, "--epochs", 1, "--data_root", w.data, "--results_dir", w.results, "--save", "base")
    assert r.returncode == 0, r.stdout + r.stderr
    os.makedirs(w.files)
    with open(w.checkpoint, "rb") as f:
        whole = f.read()
    write(w, "truncated.pth", whole[:len(whole) // 2])
    write(w, "text.pth", b"this is not a checkpoint\n")
    ckpt = load_checkpoint(w.checkpoint)
    torch.save(released_layout(ckpt), os.path.join(w.files, "released.pth"))
    # settings that say K=4 around tensors of a K=2 run, at epoch 0 so that it would resume
    checkpoint.write(dict(ckpt, config=dict(ckpt["config"], K=4), epoch=0, history=[], best_epoch=0, best_prec1=0.0),
                     os.path.join(w.files, "other-K-inside.pth"))
    torch.save({"format": "vispa-checkpoint", "model": CreatesAFile(os.path.join(w.files, "MARKER"))},
               os.path.join(w.files, "code.pth"))
    return w


def write(world, name, data):
    with open(os.path.join(world.files, name), "wb") as f:
        f.write(data)


class CreatesAFile:
    """Unpickling this object opens (creates) a file: the proof that a loader ran code."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def released_layout(ckpt):
    """One of our checkpoints in the layout of the authors' released files."""
    config = ckpt["config"]
    model = build_model(config["model"], DATASETS[config["dataset"]].num_classes, config["width"])
    model.load_state_dict(ckpt["model"])
    state = ckpt["optimizer"]["state"]
    distributions = {name: (state[i]["M"], state[i]["Z"]) for i, (name, p) in
                     enumerate(model.named_parameters()) if is_binary(p)}
    return {"state_dict": released.to_released(model, distributions), "epoch": ckpt["epoch"],
            "best_prec1": ckpt["best_prec1"]}


def fails_cleanly(world, *args, message, argparse=False):
    """Run main.py; check the exit code, the one line of error and that no file under
    the data, results and files folders was changed, added or removed."""
    before = world.digest()
    r = run_main(*args)
    assert world.digest() == before, "a file was changed, added or removed"
    lines = r.stderr.strip().splitlines()
    if argparse:  # argparse prints its usage first, then one line
        assert r.returncode == 2, r.stderr
        assert lines[-1].startswith("main.py: error: argument "), r.stderr
    else:
        assert r.returncode == 1, r.stdout + r.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert re.search(message, lines[-1]), lines[-1]
    return lines[-1]


def train_args(world, *extra, data_root=None, save="new"):
    return (*TINY, "--epochs", 2, "--data_root", data_root or world.data, "--results_dir", world.results,
            "--save", save, *extra)


# ---- datasets --------------------------------------------------------------------------------

def test_missing_dataset_says_how_to_download_it(world, tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    line = fails_cleanly(world, *train_args(world, data_root=empty),
                         message=r"cifar10 not found: .*data_batch_1 is missing")
    assert f"`DATA_ROOT={empty} bash download_data.sh cifar10`" in line
    assert not os.path.exists(os.path.join(world.results, "new")), "a failed start left a run folder"


def test_overwrite_that_fails_at_start_deletes_nothing(world, tmp_path):
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    fails_cleanly(world, *train_args(world, "--overwrite", data_root=empty, save="base"),
                  message=r"cifar10 not found")


@pytest.mark.parametrize("damage", ["truncated", "not a pickle"])
def test_damaged_dataset_file(world, tmp_path, damage):
    data = str(tmp_path / "data")
    shutil.copytree(world.data, data)
    path = os.path.join(data, "cifar-10-batches-py", "test_batch")
    with open(path, "rb") as f:
        whole = f.read()
    with open(path, "wb") as f:
        f.write(whole[:len(whole) // 3] if damage == "truncated" else b"\x00garbage" * 100)
    fails_cleanly(world, *train_args(world, data_root=data),
                  message=rf"cannot read {re.escape(path)}: .*download it again")


def test_a_failed_start_leaves_nothing_that_blocks_the_next_one(world, tmp_path):
    results = str(tmp_path / "results")
    args = [*TINY, "--epochs", 1, "--results_dir", results, "--save", "run"]
    r = run_main(*args, "--data_root", tmp_path / "wrong")
    assert r.returncode == 1 and "not found" in r.stderr
    assert not os.path.exists(results)
    # what a start killed before its first checkpoint leaves: its log (in its record), a partial write
    folder = os.path.join(results, "run")
    os.makedirs(folder)
    record = Manifest(folder, "run", "0123456789abcdef")
    files.write_text_atomic("VISPA run run (id 0123456789abcdef): an earlier start\n", folder + ".txt", record)
    with open(files.temporary_name(os.path.join(folder, CHECKPOINT)), "wb") as f:
        f.write(b"PK\x03\x04 partial")
    with open(os.path.join(folder, "config.json.mybackup.tmp"), "w") as f:  # a file of the user's
        f.write("{}")
    r = run_main(*args, "--data_root", world.data)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "an earlier start" not in read_text(folder + ".txt")
    assert load_checkpoint(os.path.join(folder, CHECKPOINT))["epoch"] == 1
    assert temporary_files(folder) == ["config.json.mybackup.tmp"]


def test_starting_over_an_existing_run_is_refused(world):
    fails_cleanly(world, *train_args(world, save="base"),
                  message=r"already holds a run: continue it with --resume .*--overwrite")


# ---- checkpoints -----------------------------------------------------------------------------

BROKEN = {
    "missing": ("does-not-exist.pth", r"checkpoint not found: .*does-not-exist\.pth"),
    "truncated": ("truncated.pth", r"cannot read .*truncated\.pth: truncated, corrupt, or not a checkpoint"),
    "not a checkpoint": ("text.pth", r"cannot read .*text\.pth: truncated, corrupt, or not a checkpoint"),
    "holds code": ("code.pth", r"refusing to load .*code\.pth: it holds objects other than tensors "
                               r"and plain data, which could run code \(it names \S*open\)"),
}


@pytest.mark.parametrize("option", ["--resume", "--evaluate"])
@pytest.mark.parametrize("problem", list(BROKEN))
def test_unusable_checkpoint(world, option, problem):
    name, message = BROKEN[problem]
    fails_cleanly(world, option, os.path.join(world.files, name), "--data_root", world.data,
                  "--gpus", "cpu", message=message)
    assert not os.path.exists(os.path.join(world.files, "MARKER")), "the file's code was run"



@pytest.mark.parametrize("option", [["--evaluate"], ["--export", "--out", "x.bnn"]], ids=["--evaluate", "--export"])
def test_a_run_folder_given_for_a_checkpoint_names_the_files_in_it(world, option):
    run = os.path.join(world.results, "base")
    fails_cleanly(world, option[0], run, *option[1:], "--data_root", world.data, "--gpus", "cpu",
                  message=rf"{re.escape(run)} is a folder, not a file: give a file in it "
                          r"\(checkpoint\.pth\.tar, model_best\.pth\.tar\)")


OTHER_NETWORK = {
    "architecture": (["--model", "vgg16"], "model=vgg16 (checkpoint: resnet18)"),
    "K": (["-K", "8"], "K=8 (checkpoint: 2)"),  # 8 is the default: typed out, it still counts
    "number of classes": (["--dataset", "cifar100"], "dataset=cifar100 (checkpoint: cifar10)"),
}


@pytest.mark.parametrize("other", list(OTHER_NETWORK))
def test_resume_with_settings_of_another_network(world, other):
    flags, conflict = OTHER_NETWORK[other]
    fails_cleanly(world, "--resume", world.base, "--data_root", world.data, "--gpus", "cpu", *flags,
                  message=r"the checkpoint belongs to another run: " + re.escape(conflict))


@pytest.mark.parametrize("other", list(OTHER_NETWORK))
def test_evaluate_our_checkpoint_as_another_network(world, other):
    flags, conflict = OTHER_NETWORK[other]
    fails_cleanly(world, "--evaluate", world.checkpoint, "--data_root", world.data, "--gpus", "cpu",
                  *flags, message=r"holds another network than the one asked for: " + re.escape(conflict))


def test_resume_checkpoint_whose_tensors_do_not_fit_its_settings(world):
    fails_cleanly(world, "--resume", os.path.join(world.files, "other-K-inside.pth"), "--fork", "--save",
                  "forked", "--results_dir", world.results, "--data_root", world.data, "--gpus", "cpu",
                  message=r"other-K-inside\.pth does not fit this network: .*Z has shape \(2, .*\(4, ")


RELEASED = ["--evaluate", None, "--model", "resnet18", "--width", "4", "-K", "2", "--dataset", "cifar10",
            "-L", "2", "--gpus", "cpu"]


def released_args(world, **changes):
    args = list(RELEASED)
    args[1] = os.path.join(world.files, "released.pth")
    for flag, value in changes.items():
        args[args.index(flag) + 1] = value
    return [*args, "--data_root", world.data]


def test_released_layout_file_evaluates_with_the_right_network(world):
    """The file the next test feeds to other networks is a valid one."""
    r = run_main(*released_args(world))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "released checkpoint" in r.stdout


@pytest.mark.parametrize("flag, value, problem", [
    ("--model", "vgg16", r"released\.pth: it does not match the network \(another architecture or "
                         r"number of classes\?\) - missing: .*unexpected: "),
    ("-K", "4", r"released\.pth holds K=2 \(the first dimension of its Z\), not the -K 4 asked for"),
    ("--dataset", "cifar100", r"released\.pth: it does not match the network .* shape mismatch: "
                              r".*linear\.weight \(10, .* in the file, \(100, "),
], ids=["architecture", "K", "number of classes"])
def test_evaluate_released_layout_as_another_network(world, flag, value, problem):
    fails_cleanly(world, *released_args(world, **{flag: value}), message=problem)


# ---- settings and devices --------------------------------------------------------------------

def test_invalid_setting(world):
    """Every option's check is config.py's (test_config.py tries them all); through main.py
    a refused value is argparse's one line, exit status 2, nothing written."""
    fails_cleanly(world, *train_args(world), "-K", "-1", message=r"argument -K: must be >= 0, got -1",
                  argparse=True)


@pytest.mark.parametrize("gpus", [
    "99",
    pytest.param("0", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has GPU 0")),
])
def test_gpu_that_does_not_exist(world, gpus):
    args = list(train_args(world))
    args[args.index("--gpus") + 1] = gpus
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    fails_cleanly(world, *args, message=rf"--gpus {gpus}: no such CUDA device \(this machine has "
                                        rf"{count or 'no'} GPU.*; use --gpus cpu\)")


def test_results_folder_that_cannot_be_written(world):
    under_a_file = os.path.join(world.files, "text.pth", "results")  # text.pth is a regular file
    args = list(train_args(world))
    args[args.index("--results_dir") + 1] = under_a_file
    fails_cleanly(world, *args, message=rf"cannot write to {re.escape(under_a_file)}/new: Not a directory")


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(world, tmp_path):
    results = str(tmp_path / "results")
    run_dir = os.path.join(results, "run")
    output = str(tmp_path / "output.txt")
    process = start_main(*TINY, "--epochs", 3, "--data_root", world.data, "--results_dir", results,
                         "--save", "run", output=output)
    send_when_logged(process, output, r"^Epoch 1/", signal.SIGTERM)
    assert process.returncode != 0 and load_checkpoint(os.path.join(run_dir, CHECKPOINT))["epoch"] == 1
    with open(os.path.join(run_dir, CHECKPOINT), "rb") as f:
        previous = f.read()
    # A file-size limit makes every write past it fail (EFBIG) as a full disk does
    # (ENOSPC): model_best.pth.tar still fits, the full checkpoint of epoch 2 does not.
    limit = (os.path.getsize(os.path.join(run_dir, BEST)) + len(previous)) // 2
    assert os.path.getsize(os.path.join(run_dir, BEST)) < limit < len(previous)
    r = run_main("--resume", run_dir, "--data_root", world.data, "--gpus", "cpu",
                 preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr
    assert re.fullmatch(rf"error: could not write {re.escape(os.path.join(run_dir, CHECKPOINT))}: "
                        r"File too large; the previous file there is unchanged", lines[0]), lines[0]
    with open(os.path.join(run_dir, CHECKPOINT), "rb") as f:
        assert f.read() == previous
    assert temporary_files(run_dir) == []
    # nothing claims the epoch that could not be saved: metrics.csv, the status that
    # summaries read and the log's best line say what the checkpoint on disk holds
    run = RunDir(results, "run")
    assert [row["epoch"] for row in run.read_metrics()] == [1]
    assert run.status().epoch == 1 and not run.status().finished
    log = read_text(run.log).splitlines()
    assert log[-2].startswith(f"Stopped: could not write {run.checkpoint}: File too large")
    assert log[-1] == f"Best Prec@1: {run.read_metrics()[0]['best_prec1']:.2f} (epoch 1/3)"
    # with room again, the run goes on from the checkpoint that survived
    r = run_main("--resume", run_dir, "--data_root", world.data, "--gpus", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Resumed from" in r.stdout and "at epoch 1/3" in r.stdout
    assert load_checkpoint(os.path.join(run_dir, CHECKPOINT))["epoch"] == 3


# ---- checkpoints of format 1 ------------------------------------------------------------------

def format_1(ckpt):
    """A checkpoint as the version before format 2 wrote it: no "version", the run name
    in the settings, formatted numbers in the history, the last draw "r" of every binary
    weight in the optimizer state and no generator."""
    state = {i: dict(entry, r=torch.zeros(ckpt["config"]["K"])) if "M" in entry else entry
             for i, entry in ckpt["optimizer"]["state"].items()}
    optimizer = {"state": state, "param_groups": ckpt["optimizer"]["param_groups"]}
    old = {k: v for k, v in ckpt.items() if k not in ("version", "run")}
    return dict(old, config=dict(ckpt["config"], save="old"), optimizer=optimizer,
                history=[{k: f"{v}" for k, v in row.items()} for row in ckpt["history"]])


@pytest.mark.parametrize("option, purpose", [("--evaluate", "evaluated"), ("--resume", "resumed")])
def test_a_resnet18_of_format_1_is_refused_because_its_stem_had_a_relu(world, option, purpose):
    path = os.path.join(world.files, "resnet18-format-1.pth")
    torch.save(format_1(load_checkpoint(world.checkpoint)), path)
    fails_cleanly(world, option, path, "--data_root", world.data, "--gpus", "cpu",
                  message=rf"resnet18-format-1\.pth holds a ResNet18 of checkpoint format 1, trained with a "
                          rf"ReLU after the stem that the authors' network does not have: it cannot be "
                          rf"{purpose} by this version")


def test_a_vgg16_of_format_1_evaluates_but_does_not_resume(world, tmp_path):
    """VGG16 computes the same function as before; its draws came from another generator."""
    from config import Config
    torch.manual_seed(0)
    cfg = Config(model="vgg16", dataset="cifar10", width=4, K=2, L=2, epochs=3, warmup_epochs=1, seed=1)
    model = build_model("vgg16", 10, 4)
    opt = VISPA(model.parameters(), lr=0.1, K=2)
    ours = {"format": "vispa-checkpoint", "version": 2, "config": cfg.to_dict(), "run": "old", "epoch": 1,
            "model": model.state_dict(), "optimizer": opt.state_dict(), "best_prec1": 10.0, "best_epoch": 1,
            "history": [{"epoch": 1, "val_prec1": 10.0}], "rng": {}, "log_offset": 0}
    old = format_1(ours)
    path = os.path.join(world.files, "vgg16-format-1.pth")
    torch.save(old, path)
    r = run_main("--evaluate", path, "--data_root", world.data, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert "(vgg16, cifar10, K=2; epoch 1 of run old)" in r.stdout and "Test: loss" in r.stdout
    fails_cleanly(world, "--resume", path, "--data_root", world.data, "--gpus", "cpu",
                  message=r"vgg16-format-1\.pth was written in checkpoint format 1, whose random draws "
                          r"this version cannot continue exactly: it can be evaluated, not resumed")
