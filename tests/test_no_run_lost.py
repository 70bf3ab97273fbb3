"""No run is lost, even to a hostile but realistic user: each way of losing or
silently corrupting a run found by trying (resuming from the wrong file, two runs in
one folder, deleted checkpoints, damaged or non-finite checkpoints, hostile dataset
files, absurd settings, a full disk, Ctrl-C to a benchmark) ends with one `error:`
line and a non-zero exit, or a clear statement of what happens - and the files that
could be lost are hashed before and after."""
import fcntl
import os
import re
import shutil
import signal
import subprocess
import zipfile

import pytest
import torch

from data.synthetic import structured_images, write_cifar
from helpers import (CHECKPOINT, REPO, TINY, assert_clear_error, folder_digest, load_checkpoint,
                     read_text, rewrite_as_the_run, run_main, script_env, start_main, wait_for)
import checkpoint
from utils.run_dir import RunDir


def tiny(data, results, save, *extra, epochs=3):
    return [*TINY, "--epochs", epochs, "--data_root", data, "--results_dir", results, "--save", save, *extra]


@pytest.fixture(scope="module")
def finished(cifar10_root, tmp_path_factory):
    """A finished 3-epoch run: (results folder, RunDir)."""
    results = str(tmp_path_factory.mktemp("results"))
    r = run_main(*tiny(cifar10_root, results, "three"))
    assert r.returncode == 0, r.stderr
    return results, RunDir(results, "three")


def copy_run(finished, tmp_path, name="three"):
    """A copy of the finished run in a results folder of the test's own."""
    results = str(tmp_path / "results")
    os.makedirs(results)
    shutil.copytree(finished[1].folder, os.path.join(results, name))
    shutil.copy(finished[1].log, os.path.join(results, name + ".txt"))
    return results, RunDir(results, name)


def refused(command, *fragments, watched=()):
    """main.py with ``command`` exits 1 with one error line holding ``fragments``, and
    no file under ``watched`` changes."""
    before = folder_digest(*watched)
    result = run_main(*command)
    assert folder_digest(*watched) == before, "a file was changed, added or removed"
    return assert_clear_error(result, *fragments)


# ---- resuming from the right file ------------------------------------------------------------

def test_resuming_from_model_best_is_refused_and_rewind_goes_back_explicitly(finished, cifar10_root, tmp_path):
    results, run = copy_run(finished, tmp_path)
    best_epoch = load_checkpoint(run.best)["epoch"]
    if best_epoch == 3:  # make the best epoch an earlier one, as it is in most runs
        best = load_checkpoint(run.best)
        rewrite_as_the_run(dict(best, epoch=2, history=best["history"][:2]), run.best)
        best_epoch = 2
    line = refused(["--resume", run.best, "--data_root", cifar10_root, "--gpus", "cpu"],
                   f"is not the latest checkpoint of the run 'three' (it is at epoch {best_epoch}; its "
                   f"checkpoint.pth.tar is at epoch 3)", "Add --rewind to go back to it, or --fork",
                   watched=[results])
    assert line.startswith(f"error: {run.best}")
    r = run_main("--resume", run.best, "--rewind", "--data_root", cifar10_root, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    log = read_text(run.log)
    assert f"Rewound to epoch {best_epoch}/3 from {run.best} (it holds no momenta: they start again from zero)" in log
    assert [row["epoch"] for row in run.read_metrics()] == [1, 2, 3]
    assert load_checkpoint(run.checkpoint)["epoch"] == 3


def test_model_best_at_the_latest_epoch_is_refused_for_what_it_lacks(finished, cifar10_root, tmp_path):
    """When the best epoch is the last one, model_best.pth.tar discards nothing, but it
    holds no momenta: the refusal says that, and which command goes on exactly."""
    results, run = copy_run(finished, tmp_path)
    latest = load_checkpoint(run.checkpoint)
    without = {i: {k: v for k, v in entry.items() if "momentum" not in k}
               for i, entry in latest["optimizer"]["state"].items()}
    rewrite_as_the_run(dict(latest, optimizer=dict(latest["optimizer"], state=without)), run.best)
    refused(["--resume", run.best, "--data_root", cifar10_root, "--gpus", "cpu"],
            f"{run.best} is at the run's latest epoch (3) but is not its checkpoint; it holds no momenta",
            f"resume with --resume {run.folder}, which goes on exactly from {run.checkpoint}",
            watched=[results])


def test_a_resumed_run_reads_its_data_from_where_it_was_trained(finished, cifar10_root, tmp_path):
    """After a crash, ``--resume RUN`` alone: the checkpoint knows the data folder (and
    ``--evaluate`` of it too). Where that folder is gone, the error says so (and nothing
    is written); --data_root wins."""
    results, run = copy_run(finished, tmp_path)
    state = load_checkpoint(run.checkpoint)
    assert state["data_root"] == os.path.abspath(cifar10_root)

    def unfinished(data_root):  # the same run, with a fourth epoch still to train
        rewrite_as_the_run(dict(state, data_root=data_root, config=dict(state["config"], epochs=4)), run.checkpoint)

    moved = str(tmp_path / "moved")
    unfinished(moved)
    refused(["--resume", run.folder, "--gpus", "cpu"], f"error: cifar10 not found: {moved}",
            f"({moved} is where the run was trained; give --data-root to read the dataset from elsewhere)",
            watched=[results])
    r = run_main("--resume", run.folder, "--gpus", "cpu", "--data_root", cifar10_root)
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run.checkpoint)["epoch"] == 4

    unfinished(os.path.abspath(cifar10_root))
    r = run_main("--resume", run.folder, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run.checkpoint)["epoch"] == 4
    r = run_main("--evaluate", run.best, "--gpus", "cpu")  # the same for --evaluate
    assert r.returncode == 0 and "Test: loss" in r.stdout, r.stderr


def test_a_resume_on_other_data_is_refused_and_a_fork_may_train_on_it(finished, tmp_path):
    """Other training images give other steps per epoch, another schedule: not the run."""
    results, run = copy_run(finished, tmp_path)
    state = load_checkpoint(run.checkpoint)
    rewrite_as_the_run(dict(state, config=dict(state["config"], epochs=4)), run.checkpoint)
    bigger = tmp_path / "bigger"
    write_cifar(str(bigger), "cifar10", *structured_images(600, 100, 10, seed=1))
    refused(["--resume", run.folder, "--gpus", "cpu", "--data_root", bigger],
            f"the training set in {bigger} gives 10 steps per epoch, and the run took 5", watched=[results])
    r = run_main("--resume", run.checkpoint, "--fork", "--save", "on_more", "--data_root", bigger, "--gpus", "cpu",
                 "--results_dir", results)
    assert r.returncode == 0, r.stderr


def test_a_copy_kept_elsewhere_is_not_resumed_beside_an_unrelated_file(finished, cifar10_root, tmp_path):
    """elsewhere/backup/checkpoint.pth.tar with elsewhere/backup.txt beside its folder:
    resuming it would write its log into backup.txt."""
    elsewhere = tmp_path / "elsewhere"
    os.makedirs(elsewhere / "backup")
    shutil.copy(finished[1].checkpoint, elsewhere / "backup" / CHECKPOINT)
    (elsewhere / "backup.txt").write_text("my notes, not a log\n")
    refused(["--resume", elsewhere / "backup" / CHECKPOINT, "--data_root", cifar10_root, "--gpus", "cpu"],
            "is a checkpoint of the run 'three', kept in the folder 'backup'", "--fork --save NAME",
            watched=[elsewhere])
    # --fork: a new run of its own, nothing written beside the copy
    new_results = tmp_path / "results"
    before = folder_digest(elsewhere)
    r = run_main("--resume", elsewhere / "backup" / CHECKPOINT, "--fork", "--save", "forked", "--epochs", 4,
                 "--results_dir", new_results, "--data_root", cifar10_root, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert folder_digest(elsewhere) == before
    assert f"Forked from {elsewhere / 'backup' / CHECKPOINT} (run three) at epoch 3/4" in r.stdout
    forked = load_checkpoint(new_results / "forked" / CHECKPOINT)
    assert (forked["run"], forked["epoch"], forked["config"]["epochs"]) == ("forked", 4, 4)


@pytest.mark.parametrize("extra, message", [
    (["--overwrite"], "--resume and --overwrite exclude each other"),
    (["--save", "other"], "continues the run 'three', not --save 'other' (to start a new run from it, add --fork)"),
    (["--evaluate", "x.pth"], "--evaluate and --resume exclude each other"),
    (["--rewind", "--fork"], "--rewind and --fork exclude each other"),
], ids=["overwrite", "another save", "evaluate", "rewind and fork"])
def test_contradictory_options_are_refused(finished, cifar10_root, extra, message):
    refused(["--resume", finished[1].folder, "--data_root", cifar10_root, "--gpus", "cpu", *extra], message,
            watched=[finished[0]])


@pytest.mark.parametrize("save", ["", "..", "a/b", ".hidden", "a" * 201, "é" * 101],
                         ids=["empty", "dots", "a path", "hidden", "201 letters", "202 bytes"])
def test_a_run_name_is_a_folder_name(cifar10_root, tmp_path, save):
    refused(tiny(cifar10_root, tmp_path / "results", save), "--save takes a run name", watched=[tmp_path])
    assert not (tmp_path / "results").exists()


def test_fork_needs_a_name_and_rewind_a_file(finished, cifar10_root):
    refused(["--resume", finished[1].checkpoint, "--fork", "--data_root", cifar10_root], "--fork needs --save NAME")
    refused(["--rewind", "--data_root", cifar10_root, "--save", "x"], "--rewind and --fork go with --resume FILE")


# ---- one writer per run ----------------------------------------------------------------------

def test_a_run_folder_in_use_is_refused_and_freed_when_its_process_ends(cifar10_root, tmp_path):
    """The lock is an OS lock on results/<name>/.lock: a second writer is refused at once;
    when the holder ends, however it ends, the kernel frees it."""
    results = tmp_path / "results"
    run = RunDir(str(results), "busy")
    os.makedirs(run.folder)
    holder = os.open(os.path.join(run.folder, ".lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    os.write(holder, b"4242")
    try:
        refused(tiny(cifar10_root, results, "busy", epochs=1),
                f"{run.folder} is in use by another run (process 4242)", watched=[results])
    finally:
        os.close(holder)
    assert run_main(*tiny(cifar10_root, results, "busy", epochs=1)).returncode == 0


def test_two_runs_started_at_once_with_the_same_name_leave_one_whole_run(cifar10_root, tmp_path):
    results = tmp_path / "results"
    outputs = [str(tmp_path / f"out{i}.txt") for i in range(2)]
    processes = [start_main(*tiny(cifar10_root, results, "same", epochs=4), output=o) for o in outputs]
    codes = [p.wait(timeout=300) for p in processes]
    assert sorted(codes) == [0, 1], [read_text(o) for o in outputs]
    loser = read_text(outputs[codes.index(1)]).strip().splitlines()[-1]
    assert re.fullmatch(r"error: .*same (is in use by another run \(process \d+\)|already holds a run).*", loser)
    log = read_text(results / "same.txt")
    assert log.count("VISPA run same (id ") == 1
    assert re.findall(r"^Epoch (\d+)/4", log, re.M) == ["1", "2", "3", "4"]
    assert [row["epoch"] for row in RunDir(str(results), "same").read_metrics()] == [1, 2, 3, 4]


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_replaced(finished, cifar10_root, tmp_path):
    results, run = copy_run(finished, tmp_path)
    os.unlink(run.checkpoint)
    os.unlink(run.best)
    refused(tiny(cifar10_root, results, "three"), f"{run.folder} already holds a run", watched=[results])


# ---- every check before anything is written ---------------------------------------------------

def write_split_sizes(root, train, test):
    images = structured_images(max(train, 1), max(test, 1), 10, seed=1)
    write_cifar(str(root), "cifar10", images[0][:train], images[1][:train], images[2][:test], images[3][:test])
    return str(root)


@pytest.mark.parametrize("train, test, message", [
    (0, 20, "the training set of cifar10 in {root} has 0 images: BatchNorm needs batches of at least 2"),
    (1, 20, "the training set of cifar10 in {root} has 1 image: BatchNorm needs batches of at least 2"),
    (50, 0, "the test set of cifar10 in {root} has no images"),
], ids=["no training images", "one training image", "no test images"])
def test_a_dataset_too_small_to_train_fails_before_overwrite_deletes_anything(finished, tmp_path, train, test, message):
    results, run = copy_run(finished, tmp_path)
    root = write_split_sizes(tmp_path / "data", train, test)
    refused(tiny(root, results, "three", "--overwrite"), message.format(root=root), watched=[results])


def test_a_scale_that_makes_the_state_non_finite_stops_the_run(cifar10_root, tmp_path):
    """S = 1e-320 is a finite number, but 1 / sqrt(S) is not one in float32: the draws,
    then M and Z, become infinite. The run stops with the divergence status."""
    r = run_main(*tiny(cifar10_root, tmp_path / "results", "x", "--scale", "1e-320", epochs=2))
    assert r.returncode == 3, r.stdout + r.stderr
    assert_clear_error(r, "training diverged in epoch 1", status=3)
    assert load_checkpoint(tmp_path / "results" / "x" / CHECKPOINT)["epoch"] == 0


# ---- checkpoints that cannot be trusted -------------------------------------------------------

def test_a_checkpoint_full_of_nan_is_refused_for_evaluation_and_resume(finished, cifar10_root, tmp_path):
    ckpt = load_checkpoint(finished[1].checkpoint)
    ckpt["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    path = str(tmp_path / "nan" / CHECKPOINT)
    os.makedirs(os.path.dirname(path))
    checkpoint.write(ckpt, path)  # digest and all: only its values are wrong
    for option in ("--evaluate", "--resume"):
        refused([option, path, "--data_root", cifar10_root, "--gpus", "cpu"],
                f"{path} holds non-finite values (NaN or infinity) in model/conv1.weight", watched=[tmp_path])


def test_a_checkpoint_with_flipped_bytes_is_refused(finished, cifar10_root, tmp_path):
    """41 bytes of tensor data flipped, the zip structure intact: the digest tells."""
    path = tmp_path / "flipped.pth.tar"
    shutil.copy(finished[1].checkpoint, path)
    with zipfile.ZipFile(path) as z:
        largest = max((info for info in z.infolist() if "/data/" in info.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(largest.header_offset + 30 + len(largest.filename.encode()) + len(largest.extra))
        f.seek(largest.file_size // 2, os.SEEK_CUR)
        where = f.tell()
        chunk = f.read(41)
        f.seek(where)
        f.write(bytes(b ^ 0xFF for b in chunk))
    assert torch.load(path, weights_only=True)["epoch"] == 3  # it still loads as a file
    for option in ("--evaluate", "--resume"):
        refused([option, path, "--data_root", cifar10_root, "--gpus", "cpu"],
                f"{path} is damaged: its content does not match the digest written with it", watched=[tmp_path])


@pytest.mark.parametrize("content, message", [
    ({"format": "vispa-checkpoint"}, "is not a complete checkpoint of this program: it has no 'config'"),
    ({"format": "vispa-checkpoint", "version": "2"}, "its format version '2' is not a version of this program's files"),
], ids=["format only", "version a string"])
def test_a_checkpoint_missing_its_parts_is_refused_with_what_it_lacks(cifar10_root, tmp_path, content, message):
    path = tmp_path / "bare.pth"
    torch.save(content, path)
    for option in ("--evaluate", "--resume"):
        refused([option, path, "--data_root", cifar10_root, "--gpus", "cpu"], message, watched=[tmp_path])


def test_settings_a_command_line_would_refuse_are_refused_in_a_checkpoint(finished, cifar10_root, tmp_path):
    ckpt = load_checkpoint(finished[1].checkpoint)
    ckpt["config"]["K"] = -1
    path = str(tmp_path / "k.pth")
    checkpoint.write(ckpt, path)
    refused(["--evaluate", path, "--data_root", cifar10_root, "--gpus", "cpu"],
            "its settings cannot be read: K must be >= 0, got -1", watched=[tmp_path])


# ---- hostile dataset files ---------------------------------------------------------------------

class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_dataset_pickle_that_would_run_a_command_is_refused_before_it_runs(cifar10_root, tmp_path):
    import pickle
    data = str(tmp_path / "data")
    shutil.copytree(cifar10_root, data)
    marker = tmp_path / "the-command-ran"
    with open(os.path.join(data, "cifar-10-batches-py", "test_batch"), "wb") as f:
        pickle.dump({"data": RunsAShellCommand(marker), "labels": [1]}, f, protocol=2)
    refused(tiny(data, tmp_path / "results", "x"), "refusing to read", "test_batch: it names posix.system",
            "which is not data and could run code", watched=[tmp_path])
    assert not marker.exists()


def test_labels_that_are_not_integers_are_refused(cifar10_root, tmp_path):
    """A label 3.7 is not class 3."""
    import pickle
    from data.synthetic import _dump
    data = str(tmp_path / "data")
    shutil.copytree(cifar10_root, data)
    path = os.path.join(data, "cifar-10-batches-py", "test_batch")
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")
    entry[b"labels"] = [label + 0.7 for label in entry[b"labels"]]
    _dump(path, entry)
    refused(tiny(data, tmp_path / "results", "x"), f"cannot read {path}", "labels must be integers, found float64",
            watched=[tmp_path])


# ---- Ctrl-C to a benchmark ---------------------------------------------------------------------

def test_ctrl_c_to_a_benchmark_in_a_terminal_stops_its_runs_cleanly(cifar100_root, tmp_path):
    """SIGINT to the whole process group, as a terminal sends it: every run is reported
    stopped (not failed) and resumes with the same command."""
    results = tmp_path / "results"
    env = script_env(GPUS="cpu cpu", SEEDS="1 2", EPOCHS=30, WIDTH=4, L=1, K=2, BATCH=64, WARMUP_EPOCHS=1,
                     DATA_ROOT=cifar100_root, RESULTS_DIR=results)
    script = subprocess.Popen(["bash", os.path.join(REPO, "benchmark_cifar100_resnet18_1W32A.sh")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    logs = lambda: [p for p in results.glob("*.txt")] if results.exists() else []
    wait_for(lambda: len(logs()) == 2 and all("Epoch 1/30" in p.read_text() for p in logs()), timeout=240)
    os.killpg(script.pid, signal.SIGINT)
    output, _ = script.communicate(timeout=120)
    assert script.returncode == 128 + signal.SIGINT, output
    assert "FAILED" not in output and "exit status -" not in output, output
    assert len(re.findall(r"stopped after epoch \d+/30, resumes when the command is run again", output)) == 2
    for log in logs():
        assert "Stopped by SIGTERM" in log.read_text()
