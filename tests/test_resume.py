"""No run is lost: a run killed at any point (SIGKILL, even in the middle of a
checkpoint write) or stopped by SIGTERM / SIGINT resumes from its last checkpoint
and ends exactly where the uninterrupted run ends - same log numbers, same
metrics.csv, bit-identical network, VISPA state and random-number states. All
through main.py in subprocesses, on the CPU."""
import os
import random
import re
import shlex
import signal
import time

import pytest

from helpers import (BEST, CHECKPOINT, TINY, CheckpointWatcher, tiny_for, assert_bit_identical, epoch_lines,
                     load_checkpoint, metrics_without_seconds, read_text, run_main,
                     send_when_logged, start_main, temporary_files, tensors_of, watch,
                     without_seconds)

EPOCHS = 8


def run_once(data, results, *extra, epochs=EPOCHS):
    """An uninterrupted run; returns what the interrupted ones are compared with."""
    r = run_main(*tiny_for(*extra), "--epochs", epochs, "--data_root", data, "--results_dir", results,
                 "--save", "run", *extra)
    assert r.returncode == 0, r.stdout + r.stderr
    return finished_run(results)


def finished_run(results):
    run_dir = os.path.join(results, "run")
    log = read_text(os.path.join(results, "run.txt"))
    return {"epoch_lines": epoch_lines(log), "best_line": log.splitlines()[-1],
            "metrics": metrics_without_seconds(os.path.join(run_dir, "metrics.csv")),
            "checkpoint": load_checkpoint(os.path.join(run_dir, CHECKPOINT)),
            "best": load_checkpoint(os.path.join(run_dir, BEST))}


def assert_same_run(run, reference):
    """The resumed run ended exactly where the uninterrupted one ended."""
    epochs = reference["checkpoint"]["config"]["epochs"]
    assert len(reference["epoch_lines"]) == epochs
    assert run["epoch_lines"] == reference["epoch_lines"]
    assert run["best_line"] == reference["best_line"]
    assert run["metrics"] == reference["metrics"]
    ours, theirs = run["checkpoint"], reference["checkpoint"]
    assert ours["epoch"] == theirs["epoch"] == epochs
    assert (ours["best_prec1"], ours["best_epoch"]) == (theirs["best_prec1"], theirs["best_epoch"])
    assert without_seconds(ours["history"]) == without_seconds(theirs["history"])
    assert ours["config"] == theirs["config"]
    assert_bit_identical(ours["model"], theirs["model"], "network")
    assert_bit_identical(ours["optimizer"], theirs["optimizer"], "VISPA state (M, Z, momenta, generator)")
    assert_bit_identical(ours["ranks"], theirs["ranks"], "random-number states of the rank")
    assert run["best"]["epoch"] == reference["best"]["epoch"]
    assert_bit_identical(run["best"]["model"], reference["best"]["model"], "model_best network")
    assert_bit_identical(run["best"]["optimizer"], reference["best"]["optimizer"], "model_best M, Z")


@pytest.fixture(scope="module")
def data(cifar10_root):
    return cifar10_root


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    return run_once(data, str(tmp_path_factory.mktemp("reference")))


# ---- when to kill ----------------------------------------------------------------------------

def after_training_starts(delay):
    """``delay`` seconds after the process said it starts training (fresh or resumed)."""
    started = []

    def condition(output, run_dir):
        if "Device:" in output or "Resumed from" in output:
            started[:1] = started[:1] or [time.monotonic()]
            return time.monotonic() - started[0] >= delay
        return False
    return condition


def while_writing(name):
    """As soon as a write of ``name`` shows in the run folder: its temporary file exists,
    or the file itself has changed since the first look (a file written in place)."""
    first = []

    def condition(output, run_dir):
        if any(t.startswith(f".{name}.") for t in temporary_files(run_dir)):
            return True
        try:
            st = os.stat(os.path.join(run_dir, name))
            now = (st.st_ino, st.st_size, st.st_mtime_ns)
        except FileNotFoundError:
            now = None
        first[:1] = first[:1] or [now]
        return now != first[0]
    return condition


def after_an_epoch_line(output, run_dir):
    """Right after the process logged an epoch, before (or while) its checkpoint is written."""
    return re.search(r"^Epoch \d+/", output, re.M) is not None


def test_kill_9_anywhere_then_resume_ends_exactly_like_the_uninterrupted_run(data, reference, tmp_path):
    epoch_seconds = max(float(row["seconds"]) for row in reference["checkpoint"]["history"])
    rng = random.Random(2024)
    at_random = lambda: ("at a random time", after_training_starts(rng.uniform(0, 2 * epoch_seconds)))
    plan = [("while writing " + CHECKPOINT, while_writing(CHECKPOINT)),  # the epoch-0 save
            ("while writing " + BEST, while_writing(BEST)),
            ("right after an epoch line", after_an_epoch_line),
            at_random(),
            ("while writing " + CHECKPOINT, while_writing(CHECKPOINT)),
            at_random(), at_random(), at_random()]

    results = str(tmp_path / "results")
    run_dir = os.path.join(results, "run")
    fresh = [*TINY, "--epochs", EPOCHS, "--data_root", data, "--results_dir", results, "--save", "run"]
    resume = ["--resume", run_dir, "--gpus", "cpu"]  # after a crash: the checkpoint knows the data folder
    watcher = CheckpointWatcher(run_dir)
    events, last_epoch, torn_writes = [], -1, 0
    for i, (kind, condition) in enumerate(plan + [("to the end", None)]):
        resuming = os.path.exists(os.path.join(run_dir, CHECKPOINT))
        output = str(tmp_path / f"output{i}.txt")
        process = start_main(*(resume if resuming else fresh), output=output)
        killed = watch(process, run_dir, output, watcher, condition, fast=kind.startswith("while"))
        assert not watcher.failures, f"a checkpoint did not load: {watcher.failures} after {events}"
        if not killed:
            assert process.returncode == 0, read_text(output)
            assert condition is None or kind == "at a random time", \
                f"the run ended before the kill {kind!r}; events so far: {events}"
            events.append(f"{'resumed' if resuming else 'started'}, ran to the end")
            break
        left = temporary_files(run_dir)
        torn_writes += kind.startswith("while") and bool(left)
        epoch = (load_checkpoint(os.path.join(run_dir, CHECKPOINT))["epoch"]
                 if os.path.exists(os.path.join(run_dir, CHECKPOINT)) else None)
        assert epoch is None or epoch >= last_epoch, f"checkpoint went back to epoch {epoch}"
        last_epoch = -1 if epoch is None else epoch
        last_line = (read_text(output).strip().splitlines() or [""])[-1][:40]
        events.append(f"{'resumed' if resuming else 'started'}, killed {kind} (last output: "
                      f"{last_line!r}): checkpoint at epoch {epoch}, temporary files left: {left}")
    print("\n".join(events))

    assert torn_writes >= 1, f"no kill hit a checkpoint write in progress: {events}"
    assert sum("killed" in e for e in events) >= 6, events
    assert temporary_files(run_dir) == [], "the temporary files of killed writes were not cleaned up"
    assert len(watcher.seen) > EPOCHS, "the watcher saw too few checkpoint versions"
    assert_same_run(finished_run(results), reference)


# ---- SIGTERM / SIGINT ------------------------------------------------------------------------

STOP_LINE = re.compile(r"^Stopped by (SIG\w+) during epoch (\d+)/\d+; the checkpoint of epoch (\d+) "
                       r"is (\S+)\. Resume with: (.+)$", re.M)


@pytest.mark.parametrize("signum, extra, epochs, after", [
    (signal.SIGTERM, (), EPOCHS, 2),
    # the released code's input pipeline with a worker process: its augmentation
    # draws too must continue exactly
    (signal.SIGINT, ("--loader", "torchvision", "-j", "1"), 3, 1),
    # the deployed network evaluated after every epoch leaves the training as it is
    (signal.SIGTERM, ("--deployed-every-epoch",), 3, 1),
    # the rivals: their state, draws and memory go on exactly too
    (signal.SIGTERM, ("--method", "bayesbinn"), 3, 1),
    (signal.SIGTERM, ("--method", "ste"), 3, 1),
], ids=["SIGTERM", "SIGINT-torchvision-loader", "SIGTERM-deployed-every-epoch", "SIGTERM-bayesbinn", "SIGTERM-ste"])
def test_signal_stops_with_a_resume_line_and_the_resumed_run_ends_exactly(
        data, reference, tmp_path, signum, extra, epochs, after):
    expected = (reference if not extra else
                run_once(data, str(tmp_path / "reference"), *extra, epochs=epochs))
    results = str(tmp_path / "results")
    output = str(tmp_path / "stopped.txt")
    process = start_main(*tiny_for(*extra), "--epochs", epochs, "--data_root", data, "--results_dir", results,
                         "--save", "run", *extra, output=output)
    send_when_logged(process, output, rf"^Epoch {after}/", signum)

    assert process.returncode == 128 + signum, read_text(output)
    log = read_text(os.path.join(results, "run.txt"))
    stops = STOP_LINE.findall(log)
    assert len(stops) == 1 and STOP_LINE.findall(read_text(output)) == stops, log
    name, during, ckpt_epoch, path, command = stops[0]
    assert name == signal.Signals(signum).name
    assert int(ckpt_epoch) == int(during) - 1 >= after
    assert os.path.samefile(path, os.path.join(results, "run", CHECKPOINT))
    assert load_checkpoint(path)["epoch"] == int(ckpt_epoch)
    assert temporary_files(os.path.join(results, "run")) == []

    words = shlex.split(command)
    assert words[:2] == ["python", "main.py"], command
    r = run_main(*words[2:])  # exactly what the log says, nothing added
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Resumed from" in read_text(os.path.join(results, "run.txt"))
    assert_same_run(finished_run(results), expected)


# ---- divergence ------------------------------------------------------------------------------

DIVERGED = re.compile(r"error: training diverged in epoch (\d+) \(train loss \S+, val loss \S+\): stopped\. "
                      r"The last good checkpoint \(epoch (\d+)\) is (\S+); try a lower --lr or another --scale")


def test_a_stop_while_the_deployed_network_is_evaluated_ends_the_run_as_stopped_and_a_resume_evaluates_it(
        data, tmp_path):
    """The last epoch is on disk; the deployed network of the best epoch is not yet: a
    SIGTERM then (a scheduler's) stops at the next test batch, and the resume owes only it."""
    results = str(tmp_path / "results")
    output = str(tmp_path / "out.txt")
    process = start_main(*TINY, "--epochs", 1, "--data_root", data, "--results_dir", results, "--save", "run",
                         "--eval-batch-size", 1, output=output)  # many small batches: the evaluation takes a while
    send_when_logged(process, output, r"^Epoch 1/1", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, read_text(output)
    log = read_text(os.path.join(results, "run.txt"))
    assert "Stopped by SIGTERM while the deployed network of the best epoch was evaluated" in log
    assert metrics_without_seconds(os.path.join(results, "run", "metrics.csv"))[0]["deployed_prec1"] == ""
    r = run_main("--resume", os.path.join(results, "run"), "--gpus", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert metrics_without_seconds(os.path.join(results, "run", "metrics.csv"))[0]["deployed_prec1"] != ""
    assert read_text(os.path.join(results, "run.txt")).splitlines()[-2].startswith("Deployed network of epoch 1")


def test_a_diverging_run_stops_with_one_error_line_and_keeps_the_last_good_checkpoint(data, tmp_path):
    results = str(tmp_path / "results")
    run_dir = os.path.join(results, "run")
    # an absurd peak learning rate, reached over 3 epochs of warm-up
    r = run_main(*TINY, "--epochs", 3, "--warmup_epochs", 3, "--lr", 30, "--data_root", data,
                 "--results_dir", results, "--save", "run")
    assert r.returncode == 3, r.stdout + r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and DIVERGED.fullmatch(lines[0]), r.stderr
    diverged, good, path = DIVERGED.fullmatch(lines[0]).groups()
    assert int(good) == int(diverged) - 1
    assert os.path.samefile(path, os.path.join(run_dir, CHECKPOINT))
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == int(good) and len(ckpt["history"]) == int(good)
    tensors = tensors_of({"model": ckpt["model"], "optimizer": ckpt["optimizer"]})
    assert all(t.isfinite().all() for t in tensors.values() if t.is_floating_point())
    assert len(metrics_without_seconds(os.path.join(run_dir, "metrics.csv"))) == int(good)
    log = read_text(os.path.join(results, "run.txt"))
    assert "Stopped: " + lines[0][len("error: "):] in log.splitlines()
    assert log.splitlines()[-1].startswith("Best Prec@1: ")
    assert temporary_files(run_dir) == []
