"""The benchmark scripts, run as a user runs them, on the CPU with tiny settings: log
names, the summary table against the logs, queueing on slots, a failed run, and
resuming or skipping existing runs."""
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess

import pytest

import config
from helpers import REPO, run_results, run_script, script_env, send_when_logged, start_main, wait_for
from utils.run_dir import RunDir

SCRIPTS = {"resnet18": "benchmark_cifar100_resnet18_1W32A.sh", "vgg16": "benchmark_cifar100_vgg16_1W32A.sh"}
TINY = dict(EPOCHS=2, WIDTH=4, L=2, K=2, BATCH=64, WARMUP_EPOCHS=1)
TABLE_ROW = re.compile(r"^  (\d+) +(\d+\.\d\d) +(\d+)/(\d+) +(\d+\.\d\d) +(\d+\.\d\d|-)$", re.M)


@pytest.fixture(scope="module")
def data_root(cifar100_root):
    return cifar100_root


def read_log(results, name):
    """{epoch: (val top-1, mean-net top-1)} and (best top-1, its epoch, epochs) of a run,
    from its metrics.csv, and the last line of its log, which must say the same."""
    epochs, status = run_results(results, name)
    last = open(os.path.join(results, name + ".txt")).read().splitlines()[-1]
    assert last == f"Best Prec@1: {status.best_prec1:.2f} (epoch {status.best_epoch}/{status.epochs})"
    return epochs, (status.best_prec1, status.best_epoch, status.epochs)


def tiny_name(model, seed, epochs=2):
    """The run name the scripts give the TINY settings."""
    return (f"{model}_1w32a_cifar100_seed={seed}_benchmark_K=2_S=100_L=2_wd=5e-4_lr=0.1_cos_"
            f"epochs={epochs}_width=4_batch=64_warmup=1")


def benchmark(model, results, data_root, *args, **settings):
    env = dict(TINY, DATA_ROOT=data_root, RESULTS_DIR=results)
    env.update(settings)
    return run_script(SCRIPTS[model], *args, **env)


def files_digest(folder):
    """{relative path: sha256} of every file under ``folder``."""
    digest = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                digest[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return digest


def test_smoke_run_logs_table_and_skip_when_run_again(tmp_path, data_root):
    """(The scripts differ only in the recipe they show: test_the_settings_a_script_shows_are_its_recipe.)"""
    model = "resnet18"
    results = tmp_path / "results"
    result = benchmark(model, results, data_root, GPUS="cpu cpu", SEEDS="11 12")
    assert result.returncode == 0, result.stdout + result.stderr

    names = [tiny_name(model, seed) for seed in (11, 12)]
    assert sorted(os.listdir(results)) == sorted(names + [n + ".txt" for n in names])
    rows = {int(r[0]): r[1:] for r in TABLE_ROW.findall(result.stdout)}
    assert sorted(rows) == [11, 12], result.stdout
    bests = []
    for seed, name in zip((11, 12), names):
        epochs, best = read_log(results, name)
        assert best is not None and best[2] == 2 and sorted(epochs) == [1, 2]
        best_prec1, best_epoch, _ = best
        # the best line is the best val top-1 of the epoch lines, first epoch on ties
        assert best_prec1 == max(v for v, _ in epochs.values())
        assert best_epoch == min(e for e, (v, _) in epochs.items() if v == best_prec1)
        prec1, epoch, total, mean_net, deployed = rows[seed]
        assert (float(prec1), int(epoch), int(total)) == (best_prec1, best_epoch, 2)
        assert float(mean_net) == epochs[best_epoch][1]
        at_best = next(row for row in RunDir(str(results), name).read_metrics() if row["epoch"] == best_epoch)
        assert float(deployed) == at_best["deployed_prec1"]  # evaluated at the end of the run
        bests.append(best_prec1)
    mean, std = statistics.mean(bests), statistics.stdev(bests)
    assert f"best top-1 {mean:.2f} ± {std:.2f}" in result.stdout
    assert "sample std, ddof=1, over 2 of 2 seeds" in result.stdout

    # run again: both runs are finished, nothing is run or written, the table is the same
    before = files_digest(results)
    again = benchmark(model, results, data_root, GPUS="cpu cpu", SEEDS="11 12")
    assert again.returncode == 0, again.stdout + again.stderr
    for seed in (11, 12):
        assert re.search(rf"seed {seed}: finished already \(epoch 2/2 in .*\), skipped", again.stdout)
    assert "started" not in again.stdout
    assert files_digest(results) == before
    assert TABLE_ROW.findall(again.stdout) == TABLE_ROW.findall(result.stdout)


def test_a_finished_run_made_with_other_settings_is_not_taken_for_the_one_asked(tmp_path, data_root):
    """RECALIBRATE is not in the run's name: the table would show the other setting's figures."""
    results = tmp_path / "results"
    first = benchmark("resnet18", results, data_root, GPUS="cpu", SEEDS="11", RECALIBRATE="100")
    assert first.returncode == 0, first.stdout + first.stderr
    before = files_digest(results)
    again = benchmark("resnet18", results, data_root, GPUS="cpu", SEEDS="11", RECALIBRATE="0")
    assert again.returncode == 1
    assert "seed 11: finished already with other settings (recalibrate=100 (asked: 0)): it is not redone" in \
        again.stdout
    assert "FAILED: seed 11: finished already with other settings" in again.stdout
    assert files_digest(results) == before


def test_a_run_stopped_while_its_deployed_network_was_evaluated_is_resumed_for_it(tmp_path, data_root):
    """Every epoch of the run is done, the deployed network of its best epoch is not: the
    runner resumes it for that, rather than skipping a finished run."""
    results = tmp_path / "results"
    name, output = tiny_name("resnet18", 11), tmp_path / "out.txt"
    process = start_main("--recipe", "resnet18_1w32a_cifar100", "--gpus", "cpu", "--epochs", 2, "--width", 4,
                         "-L", 2, "-K", 2, "-b", 64, "--warmup-epochs", 1, "--seed", 11, "--data-root", data_root,
                         "--results-dir", results, "--save", name, "--eval-batch-size", 1, output=output)
    send_when_logged(process, output, r"^Epoch 2/2", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, open(output).read()
    result = benchmark("resnet18", results, data_root, GPUS="cpu", SEEDS="11")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "seed 11: every epoch done; resuming" in result.stdout
    row, = TABLE_ROW.findall(result.stdout)
    assert row[-1] != "-"


def test_settings_that_give_too_long_a_run_name_are_refused_before_anything_starts(tmp_path, data_root):
    result = benchmark("resnet18", tmp_path / "results", data_root, GPUS="cpu", SEEDS="12345678", K="", EPOCHS=20,
                       BATCH=128, WARMUP_EPOCHS=10, LR="0.000123456789", WD="0.000123456789", METHOD="bayesbinn",
                       METHOD_LR="0.000123456789", TEMPERATURE="1.234567e-10", LR_DECAY="constant")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "these settings give run names of" in result.stderr and "more than 200" in result.stderr
    assert not os.path.exists(tmp_path / "results") or os.listdir(tmp_path / "results") == []


def test_paper_recipe_names_and_failed_runs(tmp_path, data_root):
    """The paper's recipe and seeds: the runs are named as the authors name theirs, and each
    fails at once here (its folder holds a config.json of the user's, which no run
    replaces), before it writes a log; the script says so for each run, shows why, and
    exits non-zero."""
    results = tmp_path / "results"
    names = [f"resnet18_1w32a_cifar100_seed={seed}_benchmark_K=8_S=100_L=40_wd=5e-4_lr=0.1_cos_epochs=500"
             for seed in (2020, 2024, 1314, 512, 2333)]
    for name in names:
        (results / name).mkdir(parents=True)
        (results / name / "config.json").write_text('{"mine": true}\n')
    result = run_script(SCRIPTS["resnet18"], DATA_ROOT=data_root, RESULTS_DIR=results, GPUS="cpu cpu cpu cpu cpu")
    assert result.returncode == 1
    for seed, name in zip((2020, 2024, 1314, 512, 2333), names):
        assert f"FAILED: seed {seed} (exit status 1), it wrote no log;" in result.stdout
        assert not os.path.exists(f"{results}/{name}.txt")
        assert (results / name / "config.json").read_text() == '{"mine": true}\n'
    assert result.stdout.count("config.json exists and was not written by a run") == 5  # shown for each run


def test_a_run_that_fails_after_its_start_is_named_with_its_log(tmp_path, data_root):
    """A run that diverges in its first epoch (an lr of 1e6) has written its log: the
    report names it."""
    results = tmp_path / "results"
    result = benchmark("resnet18", results, data_root, GPUS="cpu", SEEDS="4", EPOCHS=1, LR="1e6")
    assert result.returncode == 1
    name = tiny_name("resnet18", 4, epochs=1).replace("lr=0.1", f"lr={config.number(1e6)}")
    assert f"FAILED: seed 4 (exit status 3), log {results}/{name}.txt;" in result.stdout
    assert "training diverged in epoch 1" in result.stdout


def test_seeds_queue_on_one_slot(tmp_path, data_root):
    """Three seeds, one CPU slot given as the argument: they run one after another."""
    results = tmp_path / "results"
    result = benchmark("vgg16", results, data_root, "cpu", GPUS="0 1 2", SEEDS="5 6 7", EPOCHS=1)
    assert result.returncode == 0, result.stdout + result.stderr
    events = re.findall(r"seed (\d+): (started|finished)\b", result.stdout)
    assert events == [("5", "started"), ("5", "finished"), ("6", "started"), ("6", "finished"),
                      ("7", "started"), ("7", "finished")]
    for seed in (5, 6, 7):
        assert read_log(results, tiny_name('vgg16', seed, epochs=1))[1][2] == 1


def test_one_failed_run_is_named(tmp_path, data_root):
    """Seed 9's folder holds a file of the user's where its run would write: it fails, seed 8 finishes."""
    results = tmp_path / "results"
    failed = tiny_name("resnet18", 9, epochs=1)
    (results / failed).mkdir(parents=True)
    (results / failed / "metrics.csv").write_text("mine\n")
    result = benchmark("resnet18", results, data_root, GPUS="cpu cpu", SEEDS="8 9", EPOCHS=1)
    assert result.returncode == 1
    assert "FAILED: seed 9 (exit status 1), it wrote no log;" in result.stdout
    assert not os.path.exists(f"{results}/{failed}.txt")
    assert "metrics.csv exists and was not written by a run" in result.stdout
    assert "FAILED: seed 8" not in result.stdout
    assert read_log(results, tiny_name('resnet18', 8, epochs=1))[1][2] == 1
    assert "over 1 of 2 seeds" in result.stdout


def test_stopped_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, data_root):
    """SIGTERM to the script: the run writes its checkpoint and stops; the same command
    resumes it, says so, and the run ends with the numbers of a run never stopped."""
    settings = dict(TINY, EPOCHS=3, GPUS="cpu", SEEDS="4", DATA_ROOT=data_root)
    name = tiny_name("resnet18", 4, epochs=3)
    stopped = tmp_path / "stopped"
    process = subprocess.Popen(["bash", os.path.join(REPO, SCRIPTS["resnet18"])],
                               env=script_env(RESULTS_DIR=stopped, **settings),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = stopped / f"{name}.txt"
    wait_for(lambda: log.exists() and "Epoch 1/3" in log.read_text())
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "run the same command again to resume" in output
    stopped_at = max(read_log(stopped, name)[0])
    assert stopped_at < 3 and "Stopped by SIGTERM" in log.read_text()

    resumed = run_script(SCRIPTS["resnet18"], RESULTS_DIR=stopped, **settings)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"seed 4: resuming {stopped}/{name} from its checkpoint (epoch {stopped_at}/3)" in resumed.stdout
    assert log.read_text().count("Resumed from") == 1

    straight = run_script(SCRIPTS["resnet18"], RESULTS_DIR=tmp_path / "straight", **settings)
    assert straight.returncode == 0
    assert read_log(stopped, name) == read_log(tmp_path / "straight", name)
    assert TABLE_ROW.findall(resumed.stdout) == TABLE_ROW.findall(straight.stdout)


def test_bad_slot_is_refused(tmp_path, data_root):
    result = benchmark("resnet18", tmp_path, data_root, GPUS="cuda:0")
    assert result.returncode == 2
    assert "GPU slots are CUDA device indices or 'cpu', got cuda:0" in result.stderr
    assert os.listdir(tmp_path) == []


def test_vispas_settings_with_a_rival_are_refused_before_anything_starts(tmp_path, data_root):
    result = benchmark("resnet18", tmp_path, data_root, METHOD="ste", GPUS="cpu")  # TINY sets K
    assert result.returncode == 2
    assert "K: the rank and scale of VISPA's covariance factor, which METHOD=ste does not have" in result.stderr
    assert os.listdir(tmp_path) == []


ALL_SCRIPTS = {"benchmark_cifar100_resnet18_1W32A.sh": "resnet18_1w32a_cifar100",
               "benchmark_cifar100_vgg16_1W32A.sh": "vgg16_1w32a_cifar100",
               "benchmark/Benchmark_cifar10_resnet18_1w32a.sh": "resnet18_1w32a_cifar10",
               "benchmark/Benchmark_cifar10_vgg16_1w32a.sh": "vgg16_1w32a_cifar10",
               "benchmark/Benchmark_cifar10_resnet18_1w1a.sh": "resnet18_1w1a_cifar10",
               "benchmark/Benchmark_cifar10_vggsmall_1w1a.sh": "vgg_small_1w1a_cifar10",
               "benchmark/Benchmark_tiny_imagenet_resnet18_1w32a.sh": "resnet18_1w32a_tiny-imagenet",
               "benchmark/Benchmark_imagenet_alexnet1w1a.sh": "alexnet_1w1a_imagenet",
               "benchmark/Benchmark_imagenet_alexnet1w32a.sh": "alexnet_1w32a_imagenet",
               "benchmark/Benchmark_imagenet_birealnet_1w1a.sh": "birealnet18_1w1a_imagenet",
               "benchmark/Benchmark_imagenet_resnet18_1w32a.sh": "resnet18_1w32a_imagenet"}


@pytest.mark.parametrize("script", list(ALL_SCRIPTS))
def test_a_script_names_its_recipe_and_changes_only_the_runners_defaults(script):
    """config.py holds every recipe once: a script names its recipe, and sets only what
    it changes of the runner's defaults (ImageNet: one run, seed 2020, on 4 GPUs)."""
    text = open(os.path.join(REPO, script)).read()
    exported = dict(re.findall(r"^export ([A-Z_]+)=(.*)$", text, re.M))
    assert exported.pop("RECIPE") == ALL_SCRIPTS[script]
    if config.RECIPES[ALL_SCRIPTS[script]].dataset == "imagenet":
        assert exported == {"NPROC": "${NPROC:-4}", "GPUS": '${GPUS:-"0 1 2 3"}', "SEEDS": "${SEEDS:-2020}"}
    else:
        assert exported == {}


def test_a_1w1a_script_runs_the_fully_binary_recipe(tmp_path, cifar10_root):
    """VGG-Small 1W1A at a small width, one seed on the CPU: the run is named after the
    authors' recipe and trains with its settings (K=4, lr 0.5, weight decay 1e-5)."""
    results = tmp_path / "results"
    result = run_script("benchmark/Benchmark_cifar10_vggsmall_1w1a.sh", GPUS="cpu", SEEDS="3", EPOCHS=1,
                        WARMUP_EPOCHS=1, WIDTH=8, L=2, BATCH=100, DATA_ROOT=cifar10_root, RESULTS_DIR=results)
    assert result.returncode == 0, result.stdout + result.stderr
    name = ("vgg_small_1w1a_cifar10_seed=3_benchmark_K=4_S=100_L=2_wd=1e-5_lr=0.5_cos_epochs=1"
            "_width=8_batch=100_warmup=1")
    settings = json.load(open(results / name / "config.json"))
    assert (settings["model"], settings["K"], settings["lr"], settings["wd"], settings["width"]) == \
        ("vgg_small", 4, 0.5, 1e-5, 8)
    assert read_log(results, name)[1][2] == 1


@pytest.mark.parametrize("value, folder", [("", "./results"), ("elsewhere", "elsewhere")])
def test_an_empty_results_dir_is_the_default_folder_like_every_other_empty_variable(value, folder):
    """``RESULTS_DIR=`` (set but empty) must not put the runs in the current folder."""
    import run_seeds
    *_, results_dir, _ = run_seeds.parse([], dict(RECIPE="resnet18_1w32a_cifar100", RESULTS_DIR=value))
    assert results_dir == folder


def test_a_machine_without_a_gpu_is_told_in_the_scripts_terms_before_anything_starts(data_root, tmp_path):
    """The default GPUS on a machine without a GPU (or GPUs it does not have): one line that
    says which variable to set, and no run folder is made."""
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    results = tmp_path / "results"
    for gpus in (None, "0 1"):
        extra = {} if gpus is None else {"GPUS": gpus}
        result = benchmark("resnet18", results, data_root, **extra)
        assert result.returncode == 1, result.stdout + result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: GPUS='{gpus or '0 1 2 3 4'}': this machine has no GPU; run on the CPU with GPUS=cpu "
            f"(GPUS=\"cpu cpu\" for two runs at a time)"]
        assert not results.exists()


def test_a_missing_dataset_is_one_line_before_anything_starts(tmp_path):
    results = tmp_path / "results"
    result = benchmark("resnet18", results, tmp_path / "nowhere", GPUS="cpu cpu")
    assert result.returncode == 1
    line, = result.stderr.strip().splitlines()
    assert line.startswith("error: cifar100 not found") and "download_data.sh cifar100" in line
    assert "set DATA_ROOT to the folder that holds it" in line
    assert not results.exists()
