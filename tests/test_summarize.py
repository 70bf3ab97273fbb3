"""python -m utils.summarize on run folders as main.py writes them (utils/run_dir.py):
runs grouped by configuration, mean ± std (ddof=1), min and max, running runs marked,
unreadable runs named without stopping the others."""
import os
import re
import statistics
import subprocess
import sys

from helpers import REPO, script_env
from utils.run_dir import RunDir
from utils.runlog import RunLog
from utils.summarize import TAIL_BYTES, read_tail


def write_run(results, name, val_prec1, epochs):
    """A run folder with one metrics row per value of ``val_prec1`` (the epochs done so
    far), its config and its log, as main.py leaves them."""
    run = RunDir(str(results), name)
    os.makedirs(run.folder)
    run.write_config({"epochs": epochs, "model": "resnet18"})
    history, best = [], (0.0, 0)
    log = RunLog(run.log, epochs, echo=False)
    for epoch, prec1 in enumerate(val_prec1, 1):
        best = max(best, (prec1, -epoch))
        history.append(dict(epoch=epoch, lr=0.1, train_loss=1.0, train_prec1=50.0, train_prec5=90.0,
                            val_loss=1.0, val_prec1=prec1, val_prec5=95.0, mean_prec1=prec1 - 1,
                            best_prec1=best[0], best_epoch=-best[1], seconds=1.0))
        log.write(f"Epoch {epoch}/{epochs} ...")
        log.set_best(best[0], -best[1])
    log.close()
    run.write_metrics(history)
    return best[0]


def summarize(results):
    return subprocess.run([sys.executable, "-m", "utils.summarize", str(results)], cwd=REPO,
                          env=script_env(), capture_output=True, text=True, timeout=60)


def test_groups_statistics_running_runs_and_unreadable_ones(tmp_path):
    results = tmp_path / "results"
    bests = [write_run(results, "resnet18_seed=1_w4", [41.5, 63.25], 2),
             write_run(results, "resnet18_seed=2_w4", [55.0, 52.0], 2)]
    write_run(results, "resnet18_seed=3_w4_long", [12.0], 30)
    write_run(results, "resnet18_seed=4_w4_long", [], 30)  # started, no epoch finished yet
    write_run(results, "resnet18_seed=5_w4", [50.0], 2)
    metrics = RunDir(str(results), "resnet18_seed=5_w4").metrics
    with open(metrics) as f:
        text = f.read()
    with open(metrics, "w") as f:  # a damaged file: the others are summarised all the same
        f.write(text.replace("50.00", "abc", 1))
    (results / "notes.txt").write_text("not a run\n")

    result = summarize(results)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "mean ± sample std (ddof=1)" in lines[0]
    mean, std = statistics.mean(bests), statistics.stdev(bests)
    assert bests == [63.25, 55.0]
    group = lines.index("resnet18_seed=*_w4")
    assert lines[group + 1].split() == ["n=2", "best", "top-1", f"{mean:.2f}", "±", f"{std:.2f}",
                                        "min", f"{min(bests):.2f}", "max", f"{max(bests):.2f}"]
    assert lines[group + 2].split()[:8] == ["at", "the", "best", "epoch:", "mean", "network", "top-1",
                                            f"{statistics.mean([62.25, 54.0]):.2f}"]
    assert not any(line.strip().startswith("running") for line in lines[group + 1:group + 4])  # both finished

    long_group = lines.index("resnet18_seed=*_w4_long")
    assert lines[long_group + 1].split()[:4] == ["n=1", "best", "top-1", "12.00"]
    assert "one run, no std" in lines[long_group + 1]
    assert lines[long_group + 3] == ("    running or stopped (2 of 2): seed=3 at epoch 1/30, "
                                     "seed=4 at epoch 0/30")
    assert lines[-1] == "(cannot be read, left out: resnet18_seed=5_w4)"


def test_reads_only_the_end_of_a_log(tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("".join(f"line {i}\n" for i in range(200_000)))
    lines = read_tail(str(path))
    assert lines[-1] == "line 199999"
    assert sum(len(line) + 1 for line in lines) <= TAIL_BYTES
    assert all(re.fullmatch(r"line \d+", line) for line in lines)  # no cut first line
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], 200_000))


def test_no_runs_is_an_error(tmp_path):
    result = summarize(tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: no runs (folders with a readable metrics.csv) in {tmp_path}"


def test_values_no_run_computes_are_left_out_as_unreadable_not_summed_to_overflow(tmp_path):
    """1e308 is finite, but no float32 computes it, and two of them overflow a sum."""
    results = tmp_path / "results"
    write_run(results, "r_seed=1", [50.0], 1)
    for seed in (2, 3):
        write_run(results, f"r_seed={seed}", [1e308], 1)
    result = summarize(results)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "(cannot be read, left out: r_seed=2, r_seed=3)"
