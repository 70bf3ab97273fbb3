"""No run is lost, round 3: a run knows exactly which files are its own.

A run records every file it writes (``utils/manifest.py``); a file is the run's when the
record lists it unchanged, whatever it holds. Every other file is foreign and is never
replaced or deleted, --overwrite included; files are replaced by rename, never edited in
place; the one-file outputs (--export's --out, --predictions, utils.plot's --out) follow
one rule. Each test reproduces an attack and hashes every file that is not the
program's to change before and after."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import (resumable_copy, ENV, REPO, TINY, assert_clear_error, folder_digest, load_checkpoint, metrics_without_seconds,
                     read_text, rewrite_as_the_run, run_main)
from utils.manifest import NAME as RECORD
from utils.run_dir import BEST, CHECKPOINT, NotOurs, RunDir


def refused(command, *fragments, watched, env=None):
    """main.py exits 1 with one error line holding ``fragments``; nothing under ``watched`` changes."""
    before = folder_digest(*watched)
    result = run_main(*command, env=env)
    assert folder_digest(*watched) == before, "a file was changed, added or removed"
    return assert_clear_error(result, *fragments)


def new_run(data, results, save, *extra, epochs=1):
    return [*TINY, "--epochs", epochs, "--data_root", data, "--results_dir", results, "--save", save, *extra]


def resumable(one_epoch, tmp_path, epochs=2):
    return resumable_copy(one_epoch, tmp_path, epochs)


# ---- 1, 3, 8: a file is the run's because the run recorded it, not because of what it holds --------------

@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]], ids=["new run", "--overwrite"])
def test_a_json_file_of_the_users_is_not_a_runs_settings(cifar10_root, tmp_path, overwrite):
    (tmp_path / "myapp").mkdir()
    (tmp_path / "myapp" / "config.json").write_text('{"port": 8080, "debug": true}\n')
    line = refused(new_run(cifar10_root, tmp_path, "myapp", *overwrite),
                   "myapp/config.json exists and was not written by a run of this program", watched=[tmp_path])
    assert "add --overwrite" not in line


def test_a_run_folder_that_links_to_a_folder_of_the_users_writes_nothing_there(cifar10_root, tmp_path):
    users = tmp_path / "users"
    users.mkdir()
    (users / "config.json").write_text('{"theme": "dark"}\n')
    (tmp_path / "results").mkdir()
    os.symlink(users, tmp_path / "results" / "myapp")
    for overwrite in ([], ["--overwrite"]):
        refused(new_run(cifar10_root, tmp_path / "results", "myapp", *overwrite), "config.json exists and was not "
                "written by a run", watched=[users, tmp_path / "results"])


@pytest.mark.parametrize("name", [CHECKPOINT, BEST])
def test_another_programs_checkpoint_is_never_deleted(cifar10_root, tmp_path, name):
    """The PyTorch ImageNet example writes checkpoint.pth.tar and model_best.pth.tar too."""
    (tmp_path / "imagenet").mkdir()
    torch.save({"epoch": 90, "arch": "resnet50", "state_dict": {"fc.weight": torch.ones(2, 2)}},
               tmp_path / "imagenet" / name)
    line = refused(new_run(cifar10_root, tmp_path, "imagenet", "--overwrite"),
                   f"{name} exists and was not written by a run of this program", watched=[tmp_path])
    assert "add --overwrite" not in line and "start it over with --overwrite" not in line


def test_a_text_file_that_starts_like_a_log_is_not_a_log(cifar10_root, tmp_path):
    (tmp_path / "notes.txt").write_text("VISPA run notes: what to try next\n- a smaller lr\n")
    refused(new_run(cifar10_root, tmp_path, "notes"), "notes.txt exists and was not written by a run",
            watched=[tmp_path])
    refused(new_run(cifar10_root, tmp_path, "notes", "--overwrite"), "notes.txt exists and was not written",
            watched=[tmp_path])


def test_a_file_the_user_changed_in_a_run_is_no_longer_the_runs(one_epoch, cifar10_root, tmp_path):
    """Edited in place after the run wrote it: --overwrite keeps it (and says why)."""
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    with open(results / "run" / "config.json", "a") as f:
        f.write('{"my": "notes"}\n')
    refused(new_run(cifar10_root, results, "run", "--overwrite"), "config.json exists and was not written by a "
            "run of this program (or was changed since)", watched=[results])


def test_overwrite_replaces_the_runs_own_files_and_nothing_else(one_epoch, cifar10_root, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    (results / "run" / "my-notes.txt").write_text("keep me\n")
    (results / "run" / "config.json.mybackup.tmp").write_text("{}\n")
    old = load_checkpoint(results / "run" / CHECKPOINT)["run_id"]
    r = run_main(*new_run(cifar10_root, results, "run", "--overwrite", "--seed", 7))
    assert r.returncode == 0, r.stderr
    assert (results / "run" / "my-notes.txt").read_text() == "keep me\n"
    assert (results / "run" / "config.json.mybackup.tmp").read_text() == "{}\n"
    assert load_checkpoint(results / "run" / CHECKPOINT)["run_id"] != old
    record = json.loads((results / "run" / RECORD).read_text())
    assert sorted(record["files"]) == sorted(["../run.txt", CHECKPOINT, BEST, "metrics.csv", "config.json"])


# ---- 2, 11: TensorBoard's folder follows the same rule, and goes back with the run ----------------------

def test_a_file_named_tb_stops_an_overwrite_before_anything_is_deleted(one_epoch, cifar10_root, tmp_path):
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    (results / "run" / "tb").write_text("not a folder\n")
    refused(new_run(cifar10_root, results, "run", "--overwrite", "--tensorboard"), "tb is not a folder",
            watched=[results])


def test_an_event_file_half_written_when_a_run_was_killed_is_a_leftover(cifar10_root, tmp_path):
    """A kill while an epoch's events were written leaves their temporary file in tb/: the
    next start removes it, as it removes those of the run's other files."""
    pytest.importorskip("tensorboard")
    results = tmp_path / "results"
    assert run_main(*new_run(cifar10_root, results, "run", "--tensorboard")).returncode == 0
    leftover = results / "run" / "tb" / ".events.out.tfevents.000002.vispa.0123456789ab.tmp"
    leftover.write_bytes(b"half an event file")
    r = run_main(*new_run(cifar10_root, results, "run", "--tensorboard", "--overwrite"))
    assert r.returncode == 0, r.stderr
    assert not leftover.exists()


def test_tensorboard_never_writes_through_a_linked_folder(cifar10_root, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine\n")
    (tmp_path / "results" / "run").mkdir(parents=True)
    os.symlink(elsewhere, tmp_path / "results" / "run" / "tb")
    refused(new_run(cifar10_root, tmp_path / "results", "run", "--tensorboard"), "tb is a symbolic link",
            watched=[tmp_path])


def scalar_steps(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, round(e.value, 4)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_go_back_with_a_rewind_and_an_overwrite(cifar10_root, tmp_path):
    pytest.importorskip("tensorboard")
    results = tmp_path / "results"
    r = run_main(*new_run(cifar10_root, results, "tb", "--tensorboard", epochs=3))
    assert r.returncode == 0, r.stderr
    run = RunDir(str(results), "tb")
    rewrite_as_the_run(dict(load_checkpoint(run.best), epoch=1, history=load_checkpoint(run.best)["history"][:1],
                            best_epoch=1, best_prec1=load_checkpoint(run.best)["history"][0]["val_prec1"]), run.best)
    r = run_main("--resume", run.best, "--rewind", "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    rows = metrics_without_seconds(run.metrics)
    steps = scalar_steps(run.tensorboard)
    assert steps["val/prec1"] == [(int(row["epoch"]), round(float(row["val_prec1"]), 4)) for row in rows]
    assert all(len({s for s, _ in v}) == len(v) for v in steps.values()), "two values at one step"
    assert len(steps["train/loss"]) == 3 and len(steps["deployed/prec1"]) == 1  # the best epoch's, at the end

    r = run_main(*new_run(cifar10_root, results, "tb", "--overwrite", "--seed", 5, epochs=1))
    assert r.returncode == 0, r.stderr
    assert not os.path.exists(run.tensorboard), "the old run's events outlived it"


def test_resuming_a_tensorboard_run_without_the_package_names_its_folder(one_epoch, tmp_path, monkeypatch):
    if torch.get_num_threads() > 1:
        pytest.skip("main.py runs forked from this process only with one thread")
    results, run = resumable(one_epoch, tmp_path)
    os.makedirs(run.tensorboard)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    refused(["--resume", run.folder, "--gpus", "cpu"], f"{run.tensorboard} holds this run's TensorBoard events",
            f"move {run.tensorboard} elsewhere to go on without them", watched=[results])


# ---- 6, 7, 9: hard links and leftovers ------------------------------------------------------------------

def test_a_lock_that_is_a_hard_link_is_never_written(one_epoch, tmp_path):
    results, run = resumable(one_epoch, tmp_path)
    precious = tmp_path / "precious.txt"
    precious.write_text("".join(f"line {i}\n" for i in range(100)))
    os.remove(os.path.join(run.folder, ".lock"))
    os.link(precious, os.path.join(run.folder, ".lock"))
    before = folder_digest(precious)
    refused(["--resume", run.folder, "--gpus", "cpu"], ".lock is not a lock of this program", watched=[results])
    assert folder_digest(precious) == before


def test_a_hard_link_backup_of_a_run_keeps_its_content_when_the_run_goes_on(one_epoch, tmp_path):
    """``cp -al run backup``: every file of the backup shares its content with the run's."""
    results, run = resumable(one_epoch, tmp_path)
    backup = tmp_path / "backup"
    os.makedirs(backup / "run")
    for name in os.listdir(run.folder):
        os.link(os.path.join(run.folder, name), backup / "run" / name)
    os.link(run.log, backup / "run.txt")
    before = folder_digest(backup)
    r = run_main("--resume", run.folder, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert load_checkpoint(run.checkpoint)["epoch"] == 2
    assert folder_digest(backup) == before, "the backup changed with the run"
    assert load_checkpoint(backup / "run" / CHECKPOINT)["epoch"] == 1


def test_resume_leaves_temporary_looking_files_of_the_users(one_epoch, tmp_path):
    results, run = resumable(one_epoch, tmp_path)
    for name in ("config.json.mybackup.tmp", "metrics.csv.old.tmp", ".checkpoint.pth.tar.mine.tmp"):
        with open(os.path.join(run.folder, name), "w") as f:
            f.write("mine\n")
    r = run_main("--resume", run.folder, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    for name in ("config.json.mybackup.tmp", "metrics.csv.old.tmp", ".checkpoint.pth.tar.mine.tmp"):
        assert read_text(os.path.join(run.folder, name)) == "mine\n"


def test_a_run_of_an_earlier_version_without_a_record_is_resumed(one_epoch, tmp_path):
    """Its log and checkpoint carry the same run id: that, and nothing less, makes its files its own."""
    results, run = resumable(one_epoch, tmp_path)
    os.remove(os.path.join(run.folder, RECORD))
    with open(run.config, "w") as f:  # the settings of its checkpoint (resumable sets it to go on)
        json.dump(load_checkpoint(run.checkpoint)["config"], f)
    r = run_main("--resume", run.folder, "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert os.path.exists(os.path.join(run.folder, RECORD))
    os.remove(os.path.join(run.folder, RECORD))  # and no log to show that the files belong together
    os.remove(run.log)
    refused(["--resume", run.folder, "--gpus", "cpu"], "checkpoint.pth.tar exists and was not written by a run",
            watched=[results])


@pytest.mark.parametrize("name", [BEST, "config.json"])
def test_in_a_run_without_a_record_a_file_that_only_looks_like_the_runs_is_foreign(one_epoch, cifar10_root, tmp_path,
                                                                                 name):
    """A copy made without hidden files (cp -r run/* there) has no record: a checkpoint is
    the run's only if it carries the run's id, its settings only if they are its
    checkpoint's."""
    results, run = resumable(one_epoch, tmp_path)
    os.remove(os.path.join(run.folder, RECORD))
    mine = os.path.join(run.folder, name)
    if name == BEST:
        torch.save({"w": torch.randn(10)}, mine)
    else:
        with open(mine, "w") as f:
            json.dump({"my": "settings"}, f)
    refused([*TINY, "--epochs", 1, "--data_root", cifar10_root, "--results_dir", results, "--save", "run",
             "--overwrite"], f"{name} exists and was not written by a run", watched=[results])


# ---- 4, 5: the one-file outputs ---------------------------------------------------------------------------

def test_a_new_file_is_never_written_over_one_that_appeared_meanwhile(tmp_path):
    from utils.files import FileError, write_atomic
    path = tmp_path / "out.bin"
    write_atomic(str(path), lambda f: f.write(b"new"), new_only=True)
    assert path.read_bytes() == b"new"
    path.write_bytes(b"the user's")
    with pytest.raises(FileError, match="File exists"):
        write_atomic(str(path), lambda f: f.write(b"newer"), new_only=True)
    assert path.read_bytes() == b"the user's" and sorted(os.listdir(tmp_path)) == ["out.bin"]


def test_a_users_file_that_appears_while_an_export_works_is_kept(one_epoch, tmp_path, monkeypatch):
    """--out is checked at the start and again when the network is written: an export
    recalibrates for minutes, and a file may appear there meanwhile."""
    import evaluate
    import factory
    out = tmp_path / "model.bnn"
    made = factory.exported_network

    def while_it_works(*args, **kwargs):
        out.write_bytes(b"the user's model")
        return made(*args, **kwargs)
    monkeypatch.setattr(factory, "exported_network", while_it_works)
    with pytest.raises(NotOurs, match="model.bnn exists: choose another --out"):
        evaluate.export(evaluate.Export(str(one_epoch / "run" / BEST), str(out)))
    assert out.read_bytes() == b"the user's model" and os.listdir(tmp_path) == ["model.bnn"]


def test_no_output_goes_into_the_tensorboard_folder_of_a_run(one_epoch, tmp_path):
    """A run replaces the event files in its tb/: a file of another command there would be lost."""
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    os.makedirs(results / "run" / "tb")
    refused(["--export", results / "run" / BEST, "--out", results / "run" / "tb" / "events.out.tfevents.000030.vispa",
             "--gpus", "cpu"], "is in the TensorBoard folder of the run", watched=[results])
    os.symlink(results / "run" / "tb", tmp_path / "link")  # nor through a link to it
    refused(["--export", results / "run" / BEST, "--out", tmp_path / "link" / "x.bnn", "--gpus", "cpu"],
            "is in the TensorBoard folder of the run", watched=[results])


def test_predictions_never_replace_a_users_torch_file(one_epoch, tmp_path):
    user = tmp_path / "user.pt"
    torch.save({"weight": torch.ones(3)}, user)
    refused(["--evaluate", one_epoch / "run" / BEST, "--gpus", "cpu", "--predictions", user, "--overwrite"],
            "user.pt exists and is not a file of predictions", watched=[tmp_path, one_epoch])


def test_predictions_replace_predictions_with_overwrite(one_epoch, tmp_path):
    out = tmp_path / "p.pt"
    for extra in ([], ["--overwrite"]):
        r = run_main("--evaluate", one_epoch / "run" / BEST, "--gpus", "cpu", "-L", 1, "--predictions", out, *extra)
        assert r.returncode == 0, r.stderr
    refused(["--evaluate", one_epoch / "run" / BEST, "--gpus", "cpu", "--predictions", out], "p.pt exists",
            "add --overwrite", watched=[tmp_path])


def plot(*args):
    return subprocess.run([sys.executable, "-m", "utils.plot", *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=120)


def plot_refused(*args, fragments, watched):
    before = folder_digest(*watched)
    result = plot(*args)
    assert folder_digest(*watched) == before, "a file was changed, added or removed"
    return assert_clear_error(result, *fragments)


def test_a_plot_never_writes_through_a_link_or_over_a_users_image(one_epoch, tmp_path):
    pytest.importorskip("matplotlib")
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG\r\n\x1a\n a picture of the user's")
    os.symlink(mine, tmp_path / "link.png")
    run = one_epoch / "run"
    plot_refused(run, "--out", tmp_path / "link.png", fragments=["is a symbolic link"], watched=[tmp_path])
    plot_refused(run, "--out", mine, fragments=["mine.png exists", "add --overwrite"], watched=[tmp_path])
    plot_refused(run, "--out", mine, "--overwrite", fragments=["mine.png exists and is not a plot"],
                 watched=[tmp_path])
    out = tmp_path / "curves.png"
    for extra in ([], ["--overwrite"]):  # its own plot it replaces, when asked to
        result = plot(run, "--out", out, *extra)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("extension", [".png", ".pdf", ".svg"])
def test_a_plot_is_ours_only_as_drawn_not_by_a_word_it_contains(one_epoch, tmp_path, extension):
    """A plot's metadata carries the digest of the image itself: a file that merely
    contains the words of the mark, or a plot of ours changed since, is never replaced."""
    pytest.importorskip("matplotlib")
    run, out = one_epoch / "run", tmp_path / f"curves{extension}"
    assert plot(run, "--out", out).returncode == 0
    drawn = out.read_bytes()
    if extension == ".png":  # still an image every reader opens: the seal's chunk has its CRC
        from PIL import Image
        with Image.open(out) as image:
            image.load()
            assert image.text["Software"].startswith("vispa utils.plot sha256=")
    mark = re.search(rb"vispa utils\.plot sha256=[0-9a-f]{64}", drawn).group(0)
    words = tmp_path / f"notes{extension}"
    words.write_bytes(b"my notes quote the mark: " + mark)
    plot_refused(run, "--out", words, "--overwrite", fragments=["is not a plot"], watched=[tmp_path])
    changed = bytearray(drawn)
    changed[len(changed) // 2] ^= 1
    out.write_bytes(bytes(changed))
    plot_refused(run, "--out", out, "--overwrite", fragments=["is not a plot", "changed since"], watched=[tmp_path])
    out.write_bytes(drawn)
    assert plot(run, "--out", out, "--overwrite").returncode == 0


@pytest.mark.parametrize("out, fragment", [
    ("run/.lock", "is a file of a run"), ("", "needs a file name"), ("curves.jpg", "give one of these extensions"),
    ("curves", "give one of these extensions"), ("missing/curves.png", "does not exist"),
    ("run/metrics.csv", "is a file of a run")],
    ids=["the run's lock", "empty", "an unsupported format", "no extension", "a missing folder", "a run's file"])
def test_a_plot_to_a_wrong_place_is_one_line_and_writes_nothing(one_epoch, tmp_path, out, fragment):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results"
    shutil.copytree(one_epoch, results)
    plot_refused(results / "run", "--out", str(results / out) if out else "", fragments=[fragment],
                 watched=[results])


def exported_network(tmp_path):
    from models import build_model, is_binary, packed
    model = build_model("resnet18", 10, 4)
    means = {name: p.detach().clone() for name, p in model.named_parameters() if is_binary(p)}
    path = str(tmp_path / "model.bnn")
    packed.save(packed.pack(model, means, "resnet18", 4, 10, 32, "cifar10", (0.5,) * 3, (0.25,) * 3, "a test"), path)
    return path


def predictions_like(tmp_path, **changes):
    from utils import predictions
    content = {"probs": torch.full((4, 3), 1 / 3), "mean_probs": torch.full((4, 3), 1 / 3),
               "labels": torch.tensor([0, 1, 2, 0])}
    content.update(changes)
    path = tmp_path / "made.pt"
    predictions.write(content, str(path))
    return path


@pytest.mark.parametrize("make, fragment", [
    (lambda t, run: t / "missing.pt", "not found"),
    (lambda t, run: (t / "text.pt").write_text("hello\n") and t / "text.pt", "cannot read"),
    (lambda t, run: run / CHECKPOINT, "is not a file of predictions"),
    (lambda t, run: exported_network(t), "is not a file of predictions"),
    (lambda t, run: predictions_like(t, probs=torch.full((4, 3), float("nan"))), "non-finite values"),
    (lambda t, run: predictions_like(t, labels=torch.tensor([0, 1, 7, 0])), "labels outside the 3 classes"),
    (lambda t, run: predictions_like(t, mean_probs=torch.full((5, 3), 1 / 3)), "do not match"),
    (lambda t, run: predictions_like(t, probs=torch.tensor([[1.001, 0, 0]] * 4)), "not probabilities"),
], ids=["missing", "text", "a checkpoint", "an exported network", "NaN probabilities", "labels outside the classes",
        "lengths", "above one"])
def test_predictions_a_plot_cannot_draw_are_one_line(one_epoch, tmp_path, make, fragment):
    pytest.importorskip("matplotlib")
    predictions = make(tmp_path, one_epoch / "run")
    plot_refused(one_epoch / "run", "--predictions", predictions, "--out", tmp_path / "c.png", fragments=[fragment],
                 watched=[tmp_path, one_epoch])


def test_an_average_of_float32_probabilities_a_rounding_above_one_is_still_drawn(one_epoch, tmp_path):
    """The L-sample predictive of near-certain samples, averaged in float32, may read
    1.0000002: that is rounding, not a wrong file."""
    pytest.importorskip("matplotlib")
    above_one = torch.nextafter(torch.nextafter(torch.tensor(1.0), torch.tensor(2.0)), torch.tensor(2.0))
    assert f"{above_one.item():.7f}" == "1.0000002"
    probs = torch.zeros(4, 3)
    probs[:, 0] = above_one
    predictions = predictions_like(tmp_path, probs=probs)
    result = plot(one_epoch / "run", "--predictions", predictions, "--out", tmp_path / "c.png")
    assert result.returncode == 0, result.stderr


def test_a_pickle_that_carries_code_is_refused_by_the_plot_in_one_line(one_epoch, tmp_path):
    pytest.importorskip("matplotlib")
    torch.save({"probs": torch.ones(1, 1), "hook": subprocess.Popen}, tmp_path / "code.pt")
    plot_refused(one_epoch / "run", "--predictions", tmp_path / "code.pt", "--out", tmp_path / "c.png",
                 fragments=["could run code"], watched=[tmp_path])


def test_a_run_given_twice_is_one_run_and_a_log_names_its_run(one_epoch, tmp_path):
    from utils.plot import groups_of
    run = one_epoch / "run"
    groups = groups_of([str(run), str(run) + ".txt", str(run) + "/"])
    assert [len(runs) for runs in groups.values()] == [1]


def test_a_run_without_a_finished_epoch_is_skipped_with_a_word(one_epoch, tmp_path):
    pytest.importorskip("matplotlib")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metrics.csv").write_text((one_epoch / "run" / "metrics.csv").read_text().splitlines()[0] + "\n")
    result = plot(empty, one_epoch / "run", tmp_path / "notes.md", "--out", tmp_path / "c.png")
    assert result.returncode == 0, result.stderr
    assert f"skipping {empty}: no finished epoch yet" in result.stderr
    assert f"skipping {tmp_path / 'notes.md'}: not a run" in result.stderr
    alone = plot(empty, "--out", tmp_path / "d.png")
    assert alone.returncode == 1 and alone.stderr.splitlines()[-1] == "error: no run with a finished epoch to draw"
    assert not os.path.exists(tmp_path / "d.png")


# ---- 10: the thread count of a resumed run is its own ----------------------------------------------------

def test_an_inherited_thread_count_does_not_change_a_resumed_run(cifar10_root, tmp_path):
    whole = tmp_path / "whole"
    r = run_main(*new_run(cifar10_root, whole, "run", "--threads", 1, epochs=2))
    assert r.returncode == 0, r.stderr
    parts = tmp_path / "parts"
    r = run_main(*new_run(cifar10_root, parts, "run", "--threads", 1, epochs=1))
    assert r.returncode == 0, r.stderr
    state = load_checkpoint(parts / "run" / CHECKPOINT)
    rewrite_as_the_run(dict(state, config=dict(state["config"], epochs=2)), parts / "run" / CHECKPOINT)
    r = run_main("--resume", parts / "run", "--gpus", "cpu", env=dict(ENV, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr
    assert metrics_without_seconds(parts / "run" / "metrics.csv") == metrics_without_seconds(whole / "run" /
                                                                                           "metrics.csv")
