"""VISPA's rivals go through the whole pipeline a user runs, as VISPA does: the benchmark
script with METHOD, the summary table, an evaluation with its predictions and another
dataset's images, the export of the network to deploy and its evaluation, and the plot.
(VISPA's own pipeline: test_benchmark_scripts, test_calibration, test_export.)"""
import re
import subprocess
import sys

import pytest

from data.synthetic import write_structured_cifar
from helpers import ENV, REPO, run_main, run_results, run_script

TINY = dict(EPOCHS=2, WIDTH=4, L=2, BATCH=64, WARMUP_EPOCHS=1)  # no K: VISPA's rank, which the rivals refuse


def module(name, *args):
    return subprocess.run([sys.executable, "-m", name, *map(str, args)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=300)


def the_test_line(stdout):
    return next(line for line in stdout.splitlines() if line.startswith("Test: "))


@pytest.mark.parametrize("method", ["bayesbinn", "ste"])
def test_a_rival_runs_the_whole_pipeline(cifar100_root, tmp_path, method):
    results = tmp_path / "results"
    trained = run_script("benchmark_cifar100_resnet18_1W32A.sh", METHOD=method, GPUS="cpu", SEEDS="11",
                         DATA_ROOT=cifar100_root, RESULTS_DIR=results, **TINY)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    name, = [p.name for p in results.iterdir() if p.is_dir()]
    assert f"method={method}" in name and "over 1 of 1 seed)" in trained.stdout
    log = (results / f"{name}.txt").read_text().splitlines()
    _, status = run_results(results, name)
    assert log[-1] == f"Best Prec@1: {status.best_prec1:.2f} (epoch {status.best_epoch}/2)"

    summary = module("utils.summarize", results)
    assert summary.returncode == 0, summary.stderr
    assert f"method={method}" in summary.stdout and f"{status.best_prec1:.2f}" in summary.stdout

    ood = tmp_path / "ood"
    write_structured_cifar(str(ood), "cifar10", 10, 120, seed=3)
    best = results / name / "model_best.pth.tar"
    evaluated = run_main("--evaluate", best, "--gpus", "cpu", "--predictions", tmp_path / "p.pt", "--ood", "cifar10",
                         "--ood_data_root", ood)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "Out-of-distribution:" in evaluated.stdout
    deployed = [line for line in evaluated.stdout.splitlines() if line.startswith("Deployed network")]
    assert len(deployed) == 1, evaluated.stdout
    deployed_top1 = re.search(r"Prec@1 (\d+\.\d\d)", deployed[0]).group(1)

    exported = run_main("--export", best, "--gpus", "cpu", "--out", tmp_path / "m.bnn")
    assert exported.returncode == 0, exported.stderr
    deployed_alone = run_main("--evaluate", tmp_path / "m.bnn", "--gpus", "cpu")
    assert deployed_alone.returncode == 0, deployed_alone.stderr
    assert f"Prec@1 {deployed_top1}  " in the_test_line(deployed_alone.stdout)

    pytest.importorskip("matplotlib")
    drawn = module("utils.plot", results / name, "--predictions", tmp_path / "p.pt", "--out", tmp_path / "c.png")
    assert drawn.returncode == 0, drawn.stderr
    assert (tmp_path / "c.png").stat().st_size > 0
