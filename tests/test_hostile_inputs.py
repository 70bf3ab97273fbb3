"""No run is lost, round 2: hostile inputs through main.py, the scripts and summarize.
Each test reproduces an attack and checks the promise: one clear error line (or a
warning where the input is usable), and every file that is not the program's to write
hashed the same before and after."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoint
from data.synthetic import write_image_folders, write_tiny_imagenet
from helpers import (resumable_copy, ENV, REPO, TINY, Forked, assert_clear_error, folder_digest, load_checkpoint, read_text,
                     rewrite_as_the_run, run_main, run_script, start_main, temporary_files, tiny_for, train_tiny)
from models import build_model, is_binary, packed, released
from utils import files
from utils.run_dir import BEST, CHECKPOINT, RunDir


def refused(command, *fragments, watched, env=None):
    """main.py exits 1 with one error line holding ``fragments``; nothing under ``watched`` changes."""
    before = folder_digest(*watched)
    result = run_main(*command, env=env)
    assert folder_digest(*watched) == before, "a file was changed, added or removed"
    return assert_clear_error(result, *fragments)


def refused_by_the_command_line(command, *fragments, watched):
    """main.py exits 2 (argparse: its usage, then one line) and writes nothing."""
    before = folder_digest(*watched)
    result = run_main(*command)
    assert folder_digest(*watched) == before
    assert result.returncode == 2, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("main.py: error: ") and all(f in last for f in fragments), last
    return last


def resumable(one_epoch, tmp_path, epochs=2):
    return resumable_copy(one_epoch, tmp_path, epochs)


# ---- 1, 2, 3, 7: what a run folder is, and who wrote each file in it ---------------------------------

def test_a_lock_that_is_a_symbolic_link_is_never_written_through(one_epoch, cifar10_root, tmp_path):
    results, run = resumable(one_epoch, tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text("".join(f"line {i}\n" for i in range(50)))
    os.remove(os.path.join(run.folder, ".lock"))
    os.symlink(outside, os.path.join(run.folder, ".lock"))
    refused(["--resume", run.folder, "--gpus", "cpu"], ".lock is a symbolic link", watched=[outside, results])


def test_a_log_that_is_a_symbolic_link_is_never_written_through(cifar10_root, tmp_path):
    results, outside = tmp_path / "results", tmp_path / "outside.txt"
    results.mkdir()
    outside.write_text("".join(f"line {i}\n" for i in range(40)))
    os.symlink(outside, results / "new.txt")
    refused([*TINY, "--epochs", 1, "--data_root", cifar10_root, "--results_dir", results, "--save", "new"],
            "new.txt is a symbolic link", watched=[outside, results])


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["new run", "--overwrite"])
def test_a_file_no_run_wrote_is_never_replaced(cifar10_root, tmp_path, overwrite):
    """--save requirements beside a requirements.txt of the user's: refused, even with
    --overwrite; a log is what starts with the line only this program writes."""
    (tmp_path / "requirements.txt").write_text("torch\nnumpy\n")
    refused([*TINY, "--epochs", 1, "--data_root", cifar10_root, "--results_dir", tmp_path, "--save", "requirements",
             *overwrite], "requirements.txt exists and was not written by a run of this program", watched=[tmp_path])


@pytest.mark.parametrize("target", [CHECKPOINT, "metrics.csv", "config.json", "../run.txt"])
def test_export_never_writes_over_its_input_or_a_file_of_a_run(one_epoch, tmp_path, target):
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    source = results / "run" / CHECKPOINT
    refused(["--export", source, "--out", results / "run" / target, "--overwrite"], "--out", watched=[results])


def test_export_respects_the_lock_of_a_run_being_trained(one_epoch, tmp_path):
    import fcntl
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    lock = os.open(results / "run" / ".lock", os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)  # as the run's process holds it
    try:
        refused(["--export", results / "run" / BEST, "--out", results / "run" / "model.bnn"],
                "is the folder of a run being trained now", watched=[results])
    finally:
        os.close(lock)
    r = run_main("--export", results / "run" / BEST, "--out", results / "run" / "model.bnn")
    assert r.returncode == 0, r.stderr


def test_a_checkpoint_copied_from_another_run_of_the_same_name_is_not_resumed(one_epoch, cifar10_root, tmp_path):
    """Two runs called "run" in two results folders: the one's checkpoint in the other's
    folder carries its own run id, which the folder's log does not name."""
    results, run = resumable(one_epoch, tmp_path)
    other = tmp_path / "other"
    r = run_main(*TINY, "--epochs", 1, "--data_root", cifar10_root, "--results_dir", other, "--save", "run")
    assert r.returncode == 0, r.stderr
    state = load_checkpoint(other / "run" / CHECKPOINT)
    checkpoint.write(dict(state, config=dict(state["config"], epochs=2)), run.checkpoint)
    refused(["--resume", run.folder, "--gpus", "cpu"], "is the log of the run of that name with the id",
            "copied from another run", "--fork", watched=[results])


def test_control_characters_in_a_run_name_are_refused(cifar10_root, tmp_path):
    refused([*TINY, "--data_root", cifar10_root, "--results_dir", tmp_path, "--save", "a\nb"],
            "--save takes a run name", watched=[tmp_path])



@pytest.mark.parametrize("option", ["--results_dir", "--data_root"])
def test_an_empty_path_is_refused_rather_than_read_as_the_current_folder(cifar10_root, tmp_path, option):
    """``--results_dir "$RESULTS"`` with the variable unset would write the run into main.py's folder."""
    paths = {"--results_dir": tmp_path, "--data_root": cifar10_root}
    command = [*TINY, "--save", "empty-path-run", *[x for o, p in paths.items() for x in (o, "" if o == option else p)]]
    documented = option.replace("_", "-")  # argparse names the option by every spelling it accepts
    refused_by_the_command_line(command, f"argument {documented}/{option}: expected a path, got an empty string",
                                watched=[tmp_path])
    assert not os.path.exists(os.path.join(REPO, "empty-path-run.txt"))


# ---- 4: a double Ctrl-C while a checkpoint is being written ---------------------------------------------

def test_a_double_ctrl_c_during_the_checkpoint_write_lets_it_land(cifar10_root, tmp_path, monkeypatch):
    """The writer thread is slowed down; two SIGINTs arrive while it writes epoch 1's
    checkpoint: the run stops (130) once both files are whole, and its log, metrics and
    checkpoints agree; resumed, it ends its epochs."""
    if torch.get_num_threads() > 1:
        pytest.skip("the slowed-down writer reaches main.py only when it is forked from this process (one thread)")
    real = checkpoint.write

    def slow(content, path, owner=None):
        time.sleep(1.5)
        real(content, path, owner)
    monkeypatch.setattr(checkpoint, "write", slow)  # in this process, and in main.py forked from it
    output = tmp_path / "out"
    process = start_main(*TINY, "--epochs", 3, "--data_root", cifar10_root, "--results_dir", tmp_path,
                         "--save", "run", output=output)
    deadline = time.monotonic() + 120
    while not re.search(r"^Epoch 1/3", read_text(output), re.M) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 128 + signal.SIGINT
    run = RunDir(str(tmp_path), "run")
    assert temporary_files(run.folder) == []
    assert load_checkpoint(run.checkpoint)["epoch"] == 1 and load_checkpoint(run.best)["epoch"] == 1
    assert [row["epoch"] for row in run.read_metrics()] == [1]
    monkeypatch.setattr(checkpoint, "write", real)
    resumed = run_main("--resume", run.folder, "--gpus", "cpu")
    assert resumed.returncode == 0, resumed.stderr
    assert [row["epoch"] for row in run.read_metrics()] == [1, 2, 3]


# ---- 5, 8, 11, 13: datasets that lie ---------------------------------------------------------------------

TINY_IMAGENET = ["--gpus", "cpu", "--model", "resnet18", "--width", "4", "-b", "40", "-L", "1", "-K", "2",
                 "--warmup_epochs", "1", "--epochs", "1", "--seed", "1", "--dataset", "tiny-imagenet"]


def test_a_loop_of_links_in_a_tiny_imagenet_class_is_refused(tmp_path):
    root = tmp_path / "data"
    folder = write_tiny_imagenet(str(root), classes=3, per_class=4, val_per_class=2)
    wnid = sorted(os.listdir(os.path.join(folder, "train")))[0]
    os.symlink("..", os.path.join(folder, "train", wnid, "images", "loop"))
    refused([*TINY_IMAGENET, "--data_root", root, "--results_dir", tmp_path / "results", "--save", "t"],
            "a link that makes a loop", watched=[root, tmp_path])


IMAGENET = ["--recipe", "resnet18_1w32a_imagenet", "--width", "4", "--epochs", "1", "--warmup_epochs", "1",
            "-b", "4", "-L", "1", "--eval-batch-size", "4", "--gpus", "cpu", "--seed", "1"]


def test_a_loop_of_links_in_an_imagenet_class_is_refused(tmp_path):
    root = write_image_folders(str(tmp_path / "imagenet"), 3, (4, 2), 32)
    wnid = sorted(os.listdir(os.path.join(root, "train")))[0]
    os.symlink("..", os.path.join(root, "train", wnid, "loop"))
    refused([*IMAGENET, "-j", 0, "--data_root", root, "--results_dir", tmp_path / "results", "--save", "i"],
            "a link that makes a loop", watched=[tmp_path])


def test_a_tiny_imagenet_cache_with_shifted_labels_is_not_used(tmp_path):
    """The cache edited by hand, with a fresh digest: its labels are not those of the class
    folders, so it is decoded again (said on stderr) and the run trains on the right ones."""
    root = tmp_path / "data"
    write_tiny_imagenet(str(root), classes=3, per_class=4, val_per_class=2)
    first = run_main(*TINY_IMAGENET, "--data_root", root, "--results_dir", tmp_path / "r", "--save", "a")
    assert first.returncode == 0, first.stderr
    cache = root / "tiny-imagenet-200.train.pt"
    content = files.verify_digest(files.load(str(cache)), str(cache), "a cache")
    right = content["labels"].clone()
    files.save_atomic(files.with_digest(dict(content, labels=(right + 1) % 3)), str(cache))
    again = run_main(*TINY_IMAGENET, "--data_root", root, "--results_dir", tmp_path / "r", "--save", "b")
    assert again.returncode == 0, again.stderr
    assert "not used, it does not hold what it should" in again.stderr
    assert torch.equal(files.load(str(cache))["labels"], right)


def test_a_tiny_imagenet_cache_with_flipped_bytes_is_not_used(tmp_path):
    root = tmp_path / "data"
    write_tiny_imagenet(str(root), classes=3, per_class=4, val_per_class=2)
    first = run_main(*TINY_IMAGENET, "--data_root", root, "--results_dir", tmp_path / "r", "--save", "a")
    assert first.returncode == 0, first.stderr
    cache = root / "tiny-imagenet-200.val.pt"
    content = torch.load(cache, weights_only=True)
    content["images"][0, 0, 0, :8] ^= 0xFF
    torch.save(content, cache)  # the old digest: the bytes no longer match it
    again = run_main(*TINY_IMAGENET, "--data_root", root, "--results_dir", tmp_path / "r", "--save", "b")
    assert again.returncode == 0, again.stderr
    assert "is damaged" in again.stderr and "decoding the images again" in again.stderr


def test_a_class_folder_that_is_a_file_is_named(tmp_path):
    """A class missing in both splits (a file where its folder was): every later label
    would shift by one. A run of ours is warned, on stderr and in its log."""
    root = tmp_path / "data"
    folder = write_tiny_imagenet(str(root), classes=4, per_class=4, val_per_class=2)
    wnid = sorted(os.listdir(os.path.join(folder, "train")))[1]
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(folder, split, wnid))
        open(os.path.join(folder, split, wnid), "w").close()
    r = run_main(*TINY_IMAGENET, "--data_root", root, "--results_dir", tmp_path / "r", "--save", "a")
    assert r.returncode == 0, r.stderr
    assert f"warning: tiny-imagenet at {root}: 1 of its classes have no folder in train/ ({wnid})" in r.stderr
    assert f"Warning: tiny-imagenet at {root}" in read_text(tmp_path / "r" / "a.txt")


def test_the_authors_network_is_not_evaluated_on_a_dataset_missing_a_class(tmp_path):
    root = write_image_folders(str(tmp_path / "imagenet"), 3, (2, 2), 32)
    wnid = sorted(os.listdir(os.path.join(root, "train")))[1]
    for split in ("train", "val"):
        shutil.rmtree(os.path.join(root, split, wnid))
        open(os.path.join(root, split, wnid), "w").close()
    model = build_model("resnet18_imagenet", 1000, 8)
    distributions = {name: (p.detach(), torch.randn(2, *p.shape)) for name, p in model.named_parameters()
                     if is_binary(p)}
    torch.save({"epoch": 1, "state_dict": released.to_released(model, distributions)}, tmp_path / "released.pth")
    refused(["--evaluate", tmp_path / "released.pth", "--model", "resnet18_imagenet", "--dataset", "imagenet",
             "--width", 8, "-L", 1, "--loader", "torchvision", "-j", 0, "--eval-batch-size", 2, "--data_root", root,
             "--gpus", "cpu"], f"1 class is not a folder ({wnid})", "the released network's classes",
            watched=[tmp_path])


def test_a_damaged_imagenet_image_is_named_before_anything_is_written(tmp_path):
    root = write_image_folders(str(tmp_path / "imagenet"), 3, (4, 2), 32)
    wnid = sorted(os.listdir(os.path.join(root, "train")))[2]
    victim = sorted(os.listdir(os.path.join(root, "train", wnid)))[0]
    open(os.path.join(root, "train", wnid, victim), "w").close()  # zero bytes
    refused([*IMAGENET, "-j", 2, "--data_root", root, "--results_dir", tmp_path / "results", "--save", "i"],
            f"{victim} is empty (0 bytes)", watched=[tmp_path])


def test_an_image_that_fails_to_decode_mid_epoch_stops_the_run_in_one_line(tmp_path):
    """A JPEG's first bytes and nothing more: the check before the run lets it pass, the
    decoder fails in a worker process; the run stops with one line naming the file, and
    its log says so."""
    root = write_image_folders(str(tmp_path / "imagenet"), 3, (4, 2), 32)
    wnid = sorted(os.listdir(os.path.join(root, "train")))[0]
    victim = os.path.join(root, "train", wnid, sorted(os.listdir(os.path.join(root, "train", wnid)))[1])
    with open(victim, "r+b") as f:
        f.truncate(24)
    r = run_main(*IMAGENET, "-j", 2, "--data_root", root, "--results_dir", tmp_path / "results", "--save", "i")
    line = assert_clear_error(r, "cannot decode the image", victim)
    assert "Traceback" not in r.stderr
    assert f"Stopped: {line[len('error: '):]}" in read_text(tmp_path / "results" / "i.txt")


# ---- 6, 16: ranks ---------------------------------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, world, port, **extra):
    return dict(ENV, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)


def test_ranks_started_with_different_settings_refuse_to_train(cifar10_root, tmp_path):
    port = free_port()
    common = [*TINY, "--epochs", 1, "--data_root", cifar10_root, "--results_dir", tmp_path / "results", "--save", "r"]
    outputs = [tmp_path / f"out{rank}" for rank in (0, 1)]
    processes = [Forked([*common, "--seed", rank + 1], out, out, env=rank_env(rank, 2, port))
                 for rank, out in enumerate(outputs)]
    assert [p.wait(timeout=120) for p in processes] == [1, 1]
    for out in outputs:
        lines = read_text(out).strip().splitlines()
        assert re.fullmatch(r"error: the ranks were started with different options: seed is 1 on rank 0, 2 on "
                            r"rank 1; start every rank with the same command \(rank \d\)", lines[-1]), lines
    assert not os.path.exists(tmp_path / "results")


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE='abc' is not a whole number"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 is set but RANK is not"),
    ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is not one of the WORLD_SIZE=2 ranks"),
], ids=["not a number", "no RANK", "RANK outside"])
def test_bad_rank_variables_get_one_line(cifar10_root, tmp_path, env, message):
    refused([*TINY, "--data_root", cifar10_root, "--results_dir", tmp_path / "results"], message,
            watched=[tmp_path], env=dict(ENV, **env))


def test_a_rendezvous_that_never_completes_ends_with_one_line(cifar10_root, tmp_path):
    began = time.monotonic()
    refused([*TINY, "--data_root", cifar10_root, "--results_dir", tmp_path / "results"],
            "the ranks did not all meet within 3 s", watched=[tmp_path],
            env=rank_env(0, 2, free_port(), VISPA_RENDEZVOUS_SECONDS="3"))
    assert time.monotonic() - began < 60


# ---- 9: summaries -----------------------------------------------------------------------------------------

def test_summarize_keeps_runs_of_other_settings_apart(tmp_path):
    """Two seeds of a ResNet18 and one of a VGG16 under names that differ only in the seed."""
    for seed, model, top1 in ((1, "resnet18", 50.0), (2, "resnet18", 60.0), (3, "vgg16", 10.0)):
        run = RunDir(str(tmp_path), f"exp_seed={seed}")
        os.makedirs(run.folder)
        run.write_config({"model": model, "dataset": "cifar10", "epochs": 1, "seed": seed})
        run.write_metrics([{"epoch": 1, "lr": 0.1, "train_loss": 1, "train_prec1": 1, "train_prec5": 1,
                            "val_loss": 1, "val_prec1": top1, "val_prec5": 1, "mean_prec1": 1,
                            "best_prec1": top1, "best_epoch": 1, "seconds": 1}])
    out = subprocess.run([sys.executable, "-m", "utils.summarize", str(tmp_path)], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "exp_seed=* [model=resnet18]\n    n=2  best top-1 55.00 ± 7.07" in text
    assert "exp_seed=* [model=vgg16]\n    n=1  best top-1 10.00 (one run, no std)" in text


# ---- 10, 18: files that lie ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A narrow VGG16 for CIFAR-100, exported."""
    torch.manual_seed(0)
    model = build_model("vgg16", 100, 8)
    means = {name: p.detach().clone() for name, p in model.named_parameters() if is_binary(p)}
    path = str(tmp_path_factory.mktemp("bnn") / "vgg16.bnn")
    packed.save(packed.pack(model, means, "vgg16", 8, 100, 32, "cifar100", (0.5,) * 3, (0.25,) * 3, "a test"), path)
    return path


def test_an_exported_network_is_not_evaluated_as_another(exported, cifar100_root, tmp_path):
    """The ResNet18 evaluate script given a VGG16 export: refused, as a checkpoint would be."""
    before = folder_digest(os.path.dirname(exported))
    r = run_script("evaluate_cifar100_resnet18_1W32A.sh", exported, DATA_ROOT=cifar100_root, GPU="cpu", L=1)
    assert folder_digest(os.path.dirname(exported)) == before
    assert_clear_error(r, "is another network than the one asked for: model=resnet18 (checkpoint: vgg16)")


def hand_made(exported, tmp_path, **changes):
    content = files.verify_digest(files.load(exported), exported, "")
    for key, value in changes.items():
        if key == "zeros":
            name = next(iter(content["binary"]))
            content["binary"] = dict(content["binary"], **{name: dict(content["binary"][name], zeros=value)})
        else:
            content[key] = value
    path = str(tmp_path / "hand-made.bnn")
    packed.save(content, path)  # with a fresh digest: only its values are wrong
    return path


@pytest.mark.parametrize("changes, message", [
    ({"zeros": torch.tensor([10 ** 9])}, "names zero positions outside its"),
    ({"width": "8"}, "must be whole numbers"),
    ({"num_classes": 10}, "a network of 10 classes for the dataset 'cifar100'"),
    ({"model": "no-such-net"}, "cannot be built"),
], ids=["zeros out of range", "width a string", "classes of another dataset", "unknown network"])
def test_an_exported_network_with_hostile_fields_is_refused(exported, cifar100_root, tmp_path, changes, message):
    path = hand_made(exported, tmp_path, **changes)
    refused(["--evaluate", path, "--data_root", cifar100_root, "--gpus", "cpu"], message, watched=[tmp_path])


@pytest.mark.parametrize("changes, message", [
    ({"epoch": -5}, "epoch -5 is not a whole number from 0"),
    ({"best_prec1": "high"}, "best top-1 'high' is not a percentage"),
    ({"log_offset": 2.5}, "log offset 2.5 is not a whole number"),
    ({"history": [{"epoch": 1}]}, "row 1 of its metrics does not have the columns"),
    ({"run": "../elsewhere"}, "is not a folder name"),
], ids=["negative epoch", "a string for a number", "a fractional offset", "a short row", "a path for a name"])
def test_a_checkpoint_with_hostile_fields_is_refused(one_epoch, tmp_path, changes, message):
    results, run = resumable(one_epoch, tmp_path)
    state = load_checkpoint(run.checkpoint)
    checkpoint.write(dict(state, **changes), run.checkpoint)  # with a fresh digest
    for option in ("--resume", "--evaluate"):
        refused([option, run.checkpoint, "--gpus", "cpu"], message, watched=[results])


# ---- 12, 15, 17, 19: settings that cannot go together ------------------------------------------------------

def test_a_warm_up_longer_than_the_run_is_refused(cifar10_root, tmp_path):
    refused_by_the_command_line([*TINY, "--warmup_epochs", 10, "--epochs", 2, "--data_root", cifar10_root,
                                 "--results_dir", tmp_path], "--warmup-epochs 10 is more than --epochs 2",
                                watched=[tmp_path])


@pytest.mark.parametrize("method", ["bayesbinn", "ste"])
def test_vispas_settings_are_refused_for_a_rival_that_would_ignore_them(cifar10_root, tmp_path, method):
    refused_by_the_command_line([*TINY, "--method", method, "--scale", 7, "--data_root", cifar10_root,
                                 "--results_dir", tmp_path], f"-K and --scale: the rank and scale of VISPA's "
                                f"covariance factor, which --method {method} does not have", watched=[tmp_path])


def test_the_deployed_network_every_epoch_needs_images_for_its_statistics(cifar10_root, tmp_path):
    refused_by_the_command_line([*TINY, "--deployed-every-epoch", "--recalibrate", 0, "--data_root", cifar10_root,
                                 "--results_dir", tmp_path], "--deployed-every-epoch evaluates the deployed network",
                                "give --recalibrate above 0", watched=[tmp_path])


@pytest.mark.parametrize("method", ["vispa", "bayesbinn", "ste"])
def test_the_largest_learning_rate_taken_diverges_as_a_divergence_for_every_method(cifar10_root, tmp_path, method):
    """A NaN mid-epoch (BayesBiNN's test draws of a NaN lamda included) is no traceback: the
    run stops with the divergence at the end of the epoch, exit status 3."""
    result = run_main(*tiny_for("--method", method), "--method", method, "--lr", "1e6", "--epochs", 1,
                      "--data_root", cifar10_root, "--results_dir", tmp_path, "--save", "run")
    assert result.returncode == 3, result.stderr
    assert "error: training diverged in epoch 1" in result.stderr and "Traceback" not in result.stderr
    assert ("another --scale" in result.stderr) == (method == "vispa")  # VISPA's setting, named to VISPA alone


def test_too_few_images_for_the_deployed_networks_statistics_are_refused_at_the_start(cifar10_root, tmp_path):
    """BatchNorm in train mode cannot normalise a batch of one image: found before a run
    writes anything, not after its last epoch."""
    run = [*TINY, "--epochs", 1, "--data_root", cifar10_root, "--results_dir", tmp_path]
    refused_by_the_command_line([*run, "--recalibrate", 1], "--recalibrate 1", "batches of at least 2 images",
                                watched=[tmp_path])
    refused([*run, "--recalibrate", 3, "--virtual-ranks", 4], "--recalibrate 3 leaves 0 images to the 4 ranks",
            "give --recalibrate 4 or more", watched=[tmp_path])


def test_a_fork_with_nothing_left_to_train_is_refused(one_epoch, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    refused(["--resume", results / "run" / CHECKPOINT, "--fork", "--save", "new", "--epochs", 1, "--gpus", "cpu"],
            "the new run would have nothing to train; give --epochs above 1", watched=[results])


@pytest.mark.parametrize("model, dataset", [("alexnet_1w1a", "cifar10"), ("vgg16", "tiny-imagenet")])
def test_a_network_that_does_not_fit_the_dataset_is_refused_before_any_data_is_read(tmp_path, model, dataset):
    last = refused_by_the_command_line(["--model", model, "--dataset", dataset, "--data_root", tmp_path / "none",
                                        "--results_dir", tmp_path / "results", "--gpus", "cpu"],
                                       f"--model {model} takes images of", watched=[tmp_path])
    assert "not found" not in last


def test_a_rank_too_large_for_memory_is_refused_with_the_figure(cifar10_root, tmp_path):
    line = refused([*TINY, "-K", 1000000, "--data_root", cifar10_root, "--results_dir", tmp_path / "r"],
                   "-K 1000000, --width 4: resnet18", "GiB free", watched=[tmp_path])
    needed = float(re.search(r"needs about ([\d,.]+) GiB", line).group(1).replace(",", ""))
    weights = sum(p.numel() for p in build_model("resnet18", 10, 4).parameters() if is_binary(p))
    assert abs(needed - 3 * 1000001 * 4 * weights / 2**30) < 0.1


@pytest.fixture(scope="module")
def three_epochs(cifar10_root, tmp_path_factory):
    """A run of three epochs whose best epoch is the first, at 100% (no later epoch can be
    better): its checkpoints and metrics rewritten so."""
    results = tmp_path_factory.mktemp("three")
    train_tiny(cifar10_root, results, "src", epochs=3)
    src = RunDir(str(results), "src")
    state = load_checkpoint(src.checkpoint)
    history = [dict(row, best_prec1=100.0, best_epoch=1) for row in state["history"]]
    history[0]["val_prec1"] = 100.0
    rewrite_as_the_run(dict(state, best_epoch=1, best_prec1=100.0, history=history), src.checkpoint)
    best = load_checkpoint(src.best)  # the state of some epoch, labelled as the first
    rewrite_as_the_run(dict(best, epoch=1, best_epoch=1, best_prec1=100.0, history=history[:1]), src.best)
    return results


@pytest.mark.parametrize("change, named", [(["--method", "ste"], "method=ste (checkpoint: vispa)"),
                                           (["--width", 8], "width=8 (checkpoint: 4)"),
                                           (["-K", 4], "K=4 (checkpoint: 2)")], ids=["method", "width", "K"])
def test_a_fork_keeps_the_network_and_the_method_it_goes_on_from(one_epoch, tmp_path, change, named):
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    refused(["--resume", results / "run" / CHECKPOINT, "--fork", "--save", "new", "--epochs", 2, *change, "--gpus",
             "cpu"], named, "a fork goes on from the checkpoint's network and its vispa state", watched=[results])


def test_a_fork_of_a_rival_refuses_vispas_settings_as_a_new_run_does(cifar10_root, tmp_path):
    r = run_main(*tiny_for("--method", "ste"), "--method", "ste", "--epochs", 1, "--data_root", cifar10_root,
                 "--results_dir", tmp_path, "--save", "ste")
    assert r.returncode == 0, r.stderr
    refused(["--resume", tmp_path / "ste" / CHECKPOINT, "--fork", "--save", "new", "--epochs", 2, "--scale", 50,
             "--gpus", "cpu"], "--scale: the rank and scale of VISPA's covariance factor, which --method ste does not",
            watched=[tmp_path])


def test_a_fork_gets_the_model_best_of_its_best_epoch(three_epochs, tmp_path):
    """The source's best epoch lies before the fork point: the fork gets a copy of the
    source's model_best, named as the new run, and the evaluate script reads it."""
    results = tmp_path / "results"
    shutil.copytree(three_epochs, results)
    r = run_main("--resume", results / "src" / CHECKPOINT, "--fork", "--save", "fork", "--epochs", 4,
                 "--results_dir", results, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    best = load_checkpoint(results / "fork" / BEST)
    assert (best["run"], best["epoch"], best["config"]["epochs"]) == ("fork", 1, 4)
    assert load_checkpoint(results / "fork" / CHECKPOINT)["best_epoch"] == 1
    evaluated = run_script("evaluation/evaluate_cifar10_resnet18_1W32A.sh", results / "fork" / BEST, GPU="cpu", L=2)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr


def test_a_fork_whose_source_has_no_model_best_counts_its_best_from_the_fork(three_epochs, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(three_epochs, results)
    os.remove(results / "src" / BEST)
    r = run_main("--resume", results / "src" / CHECKPOINT, "--fork", "--save", "fork", "--epochs", 4,
                 "--results_dir", results, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert "The best epoch 1 has no model_best.pth.tar here to go with it" in r.stdout
    state = load_checkpoint(results / "fork" / CHECKPOINT)
    assert state["best_epoch"] in (3, 4) and load_checkpoint(results / "fork" / BEST)["epoch"] == state["best_epoch"]


def test_a_fork_takes_no_model_best_of_another_run_of_the_same_name(three_epochs, tmp_path):
    """A model_best of the best epoch and the run's name, copied in from another run (its
    id differs): the fork does not take that network for its best."""
    results = tmp_path / "results"
    shutil.copytree(three_epochs, results)
    other = load_checkpoint(results / "src" / BEST)
    checkpoint.write(dict(other, run_id="another0run"), str(results / "src" / BEST))
    r = run_main("--resume", results / "src" / CHECKPOINT, "--fork", "--save", "fork", "--epochs", 4,
                 "--results_dir", results, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert "The best epoch 1 has no model_best.pth.tar here to go with it" in r.stdout
    assert load_checkpoint(results / "fork" / BEST)["run"] == "fork"


# ---- 14: the benchmark scripts' runner ----------------------------------------------------------------

SCRIPT = "benchmark_cifar100_resnet18_1W32A.sh"
SMALL = dict(EPOCHS=1, WARMUP_EPOCHS=1, WIDTH=4, L=2, K=2, BATCH=64)


def test_a_results_folder_that_cannot_be_written_is_one_line(cifar100_root, tmp_path):
    (tmp_path / "a-file").write_text("not a folder\n")
    r = run_script(SCRIPT, GPUS="cpu", SEEDS="1", DATA_ROOT=cifar100_root, RESULTS_DIR=tmp_path / "a-file" / "results",
                   **SMALL)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert r.stderr.strip().startswith(f"error: cannot write to RESULTS_DIR {tmp_path / 'a-file' / 'results'}")


def test_a_run_folder_that_cannot_be_written_fails_alone(cifar100_root, tmp_path):
    """Seed 2's folder is a file: seed 2 is reported as not startable, seed 1 trains and is
    supervised to its end."""
    import config
    results = tmp_path / "results"
    results.mkdir()
    cfg = config.Config(**dict(config.RECIPES["resnet18_1w32a_cifar100"].to_dict(), epochs=1, warmup_epochs=1,
                               width=4, L=2, K=2, batch_size=64))
    (results / config.run_name("resnet18_1w32a_cifar100", cfg, 2)).write_text("in the way\n")
    r = run_script(SCRIPT, GPUS="cpu", SEEDS="1 2", DATA_ROOT=cifar100_root, RESULTS_DIR=results, **SMALL)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert re.search(r"^  2 +FAILED \(cannot start it: ", r.stdout, re.M), r.stdout
    assert re.search(r"^  1 +\d+\.\d\d +1/1 ", r.stdout, re.M), r.stdout


def test_seeds_that_never_started_are_not_called_failed(cifar100_root, tmp_path):
    """SIGTERM while seed 1 trains, seeds 2 and 3 queued on the one slot: 1 stopped, the
    others not started."""
    env = dict(ENV, RECIPE="", GPUS="cpu", SEEDS="1 2 3", DATA_ROOT=str(cifar100_root), RESULTS_DIR=str(tmp_path),
               **{k: str(v) for k, v in dict(SMALL, EPOCHS=50).items()})
    env.pop("RECIPE")
    process = subprocess.Popen(["bash", os.path.join(REPO, SCRIPT)], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    seen = ""
    while "seed 1: started" not in seen:
        seen += process.stdout.readline()
    time.sleep(3)
    process.send_signal(signal.SIGTERM)
    out = seen + process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, out
    assert re.search(r"^  1 +stopped", out, re.M), out
    for seed in (2, 3):
        assert re.search(rf"^  {seed} +not started", out, re.M), out
    assert "FAILED" not in out


# ---- round 3: hand-made files, absurd numbers and settings, each one line ---------------------------------

@pytest.mark.parametrize("seconds", ["inf", "nan", "0", "soon"])
def test_a_rendezvous_time_that_is_not_a_number_of_seconds_is_one_line(cifar10_root, tmp_path, seconds):
    refused([*TINY, "--data_root", cifar10_root, "--results_dir", tmp_path / "results"],
            f"VISPA_RENDEZVOUS_SECONDS={seconds!r}: give the seconds", watched=[tmp_path],
            env=rank_env(0, 2, free_port(), VISPA_RENDEZVOUS_SECONDS=seconds))


def exported_with_state(exported, tmp_path, change):
    content = files.verify_digest(files.load(exported), exported, "")
    content["state"] = {name: change(name, tensor) for name, tensor in content["state"].items()}
    path = str(tmp_path / "hand-made.bnn")
    packed.save(content, path)
    return path


def test_an_exported_network_with_a_statistic_of_another_dtype_is_refused(exported, cifar100_root, tmp_path):
    """load_state_dict would cast an int64 running mean silently, and change the result."""
    path = exported_with_state(exported, tmp_path, lambda name, t: t.round().long() if "running_mean" in name else t)
    refused(["--evaluate", path, "--data_root", cifar100_root, "--gpus", "cpu"], "is torch.int64 where vgg16 has "
            "torch.float32", watched=[tmp_path])


@pytest.mark.parametrize("changes, message", [
    ({"mean": [float("nan"), 0.5, 0.5]}, "its mean is not three finite numbers"),
    ({"source": "a \x1b[2J\x1b[31mred\x1b[0m network"}, "its source is not one printable line of text"),
    ({"source": "x" * 1_000_000}, "its source is not one printable line of text"),
], ids=["NaN in the mean", "terminal escapes", "a megabyte of source"])
def test_an_exported_network_with_unprintable_or_non_finite_fields_is_refused(exported, cifar100_root, tmp_path,
                                                                               changes, message):
    path = hand_made(exported, tmp_path, **changes)
    line = refused(["--evaluate", path, "--data_root", cifar100_root, "--gpus", "cpu"], message, watched=[tmp_path])
    assert "\x1b" not in line and len(line) < 1000


def hand_made_checkpoint(one_epoch, tmp_path, change):
    results, run = resumable(one_epoch, tmp_path)
    state = load_checkpoint(run.checkpoint)
    change(state)
    rewrite_as_the_run(state, run.checkpoint)
    return results, run


def test_a_checkpoint_whose_ranks_hold_no_random_states_is_one_line_before_anything_is_written(one_epoch, tmp_path):
    results, run = hand_made_checkpoint(one_epoch, tmp_path, lambda state: state.update(ranks=[{}]))
    refused(["--resume", run.folder, "--gpus", "cpu"], "the random states of its ranks cannot be restored",
            watched=[results])


@pytest.mark.parametrize("change, message", [
    (lambda s: next(e for e in s["optimizer"]["state"].values() if "M" in e).update(M="a string"),
     "M is a str, not a tensor"),
    (lambda s: s["optimizer"]["param_groups"][0].update(K="eight"), "K must be a whole number >= 0, got 'eight'"),
    (lambda s: s["optimizer"]["param_groups"][0].update(lr=True), "lr must be a finite number >= 0, got True"),
], ids=["M a string", "K a word", "lr a bool"])
def test_an_optimizer_state_that_is_not_vispas_is_one_line(one_epoch, tmp_path, change, message):
    results, run = hand_made_checkpoint(one_epoch, tmp_path, change)
    for command in (["--resume", run.folder], ["--evaluate", run.checkpoint],
                    ["--export", run.checkpoint, "--out", tmp_path / "x.bnn"]):
        refused([*command, "--gpus", "cpu"], "does not fit this network", message, watched=[tmp_path])


def test_more_threads_than_cores_is_one_line(cifar10_root, tmp_path):
    refused([*TINY, "--threads", 100000, "--data_root", cifar10_root, "--results_dir", tmp_path / "r"],
            "--threads 100000: this process may use", "give at most that many", watched=[tmp_path])


def test_a_network_too_wide_for_memory_is_refused_before_it_is_built(cifar10_root, tmp_path):
    line = refused([*TINY, "--width", 65536, "--data_root", cifar10_root, "--results_dir", tmp_path / "r"],
                   "--width 65536: resnet18 (", "GiB free", watched=[tmp_path])
    network = sum(p.numel() for p in build_model("resnet18", 10, 4).parameters())  # width 4: 1/16384 of it, squared
    assert f"{network:,}" not in line


@pytest.fixture(scope="module")
def cifar100_ood(tmp_path_factory):
    from data.synthetic import write_structured_cifar
    root = str(tmp_path_factory.mktemp("ood"))
    write_structured_cifar(root, "cifar100", num_train=10, num_test=40, seed=3)
    return root


def test_the_mutual_information_of_a_single_sample_is_not_applicable(one_epoch, cifar100_ood):
    r = run_main("--evaluate", one_epoch / "run" / BEST, "--gpus", "cpu", "-L", 1, "--ood", "cifar100",
                 "--ood_data_root", cifar100_ood)
    assert r.returncode == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "mutual information" in line)
    assert "n/a" in row and "L = 1: one sampled network" in row


def test_an_out_of_distribution_set_without_images_is_one_line_before_any_result(one_epoch, tmp_path):
    from data.synthetic import write_cifar
    root = str(tmp_path / "empty")
    write_cifar(root, "cifar100", torch.zeros(2, 3, 32, 32, dtype=torch.uint8), torch.zeros(2, dtype=torch.long),
                torch.zeros(0, 3, 32, 32, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    before = folder_digest(one_epoch)
    r = run_main("--evaluate", one_epoch / "run" / BEST, "--gpus", "cpu", "-L", 1, "--ood", "cifar100",
                 "--ood_data_root", root)
    assert folder_digest(one_epoch) == before
    assert_clear_error(r, "the test set in", "has no images to tell apart")
    assert "Test:" not in r.stdout
