"""What a Bayesian network owes beyond top-1: calibration (NLL, ECE, Brier) of the L-sample
predictive and of the mean network in every evaluation, the per-image predictions, the
detection of another dataset's images (AUROC, FPR at 95% TPR of the predictive entropy,
the mutual information and the mean network's maximum probability), TensorBoard scalars
and plots. The figures are checked against independent computations: torchmetrics as an
oracle for ECE and the ROC, float64 definitions for the rest."""
import contextlib
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import engine
from data.synthetic import write_structured_cifar
from helpers import ENV, REPO, TINY, assert_clear_error, folder_digest, metrics_without_seconds, run_main, train_tiny
from utils.meters import Accumulator
from utils.ood import auroc, fpr_at_tpr

torchmetrics = pytest.importorskip("torchmetrics")


def random_batch(n, classes, generator, sharp=3.0):
    logits = torch.randn(n, classes, generator=generator, dtype=torch.float64) * sharp
    labels = torch.randint(0, classes, (n,), generator=generator)
    return logits, labels


def test_ece_brier_and_nll_agree_with_independent_computations():
    """Batches accumulated (on two 'ranks' summed, as torchrun sums them) against
    torchmetrics' CalibrationError (15 bins, L1) and the float64 definitions."""
    generator = torch.Generator().manual_seed(0)
    batches = [random_batch(n, 7, generator) for n in (50, 33, 64, 1)]
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    ranks = [Accumulator("cpu"), Accumulator("cpu")]
    for i, (x, y) in enumerate(batches):
        log_p = F.log_softmax(x, dim=1)
        ranks[i % 2].add(F.nll_loss(log_p, y), x, y, log_p)
    other = ranks[1].sums
    result = ranks[0].result(total=lambda sums: sums.add_(other))

    probs = logits.softmax(1)
    ece = torchmetrics.functional.classification.multiclass_calibration_error(
        probs.float(), labels, num_classes=7, n_bins=15, norm="l1").item()
    assert result["ece"] == pytest.approx(100 * ece, abs=1e-4)
    brier = ((probs - F.one_hot(labels, 7).double()) ** 2).sum(1).mean().item()
    assert result["brier"] == pytest.approx(brier, rel=1e-12)
    assert result["nll"] == pytest.approx(-probs[torch.arange(len(labels)), labels].log().mean().item(), rel=1e-12)
    assert result["prec1"] == pytest.approx(100 * (logits.argmax(1) == labels).double().mean().item())


def test_ece_of_a_hand_made_case():
    """Four images in two bins: confidences 0.9, 0.9 (one right) and 0.6, 0.6 (both right):
    ECE = 2/4 |0.9 - 0.5| + 2/4 |0.6 - 1| = 0.4, Brier and NLL by hand."""
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1])
    meter = Accumulator("cpu")
    meter.add(torch.tensor(0.0), probs.log(), labels, probs.log())
    result = meter.result()
    assert result["ece"] == pytest.approx(40.0)
    assert result["brier"] == pytest.approx((0.02 + 1.62 + 0.32 + 0.32) / 4)
    assert result["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.1) + 2 * math.log(0.6)) / 4)


class Replayed(torch.nn.Module):
    """A 'network' whose body gives, pass after pass, the logits it was made with: the L
    sampled networks of a test, by hand."""

    def __init__(self, passes):
        super().__init__()
        self.passes, self.calls = passes, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def stem(self, x):
        return x

    def body(self, x):
        out = self.passes[self.calls % len(self.passes)]
        self.calls += 1
        return out


class NoDraws:
    @contextlib.contextmanager
    def sampled_params(self):
        yield


def test_the_predictive_and_the_mutual_information_are_their_definitions():
    """L = 3 hand-made passes: the predictive is the mean of the softmaxes, and the mutual
    information between the prediction and the weights is the mean KL divergence of the
    passes from the predictive (float64, from the definition)."""
    generator = torch.Generator().manual_seed(1)
    passes = [torch.randn(5, 4, generator=generator, dtype=torch.float64) * 2 for _ in range(3)]
    labels = torch.tensor([0, 1, 2, 3, 0])
    prediction = engine.predict(Replayed(passes), NoDraws(), torch.zeros(5, 1), labels, 3)
    softmaxes = torch.stack([p.softmax(1) for p in passes])
    predictive = softmaxes.mean(0)
    torch.testing.assert_close(prediction.log_probs.exp(), predictive, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(prediction.logits, torch.stack(passes).mean(0))
    kl = (softmaxes * (softmaxes.log() - predictive.log())).sum(2).mean(0)  # the mean KL(p_l || p̄)
    result = engine.evaluate(Replayed(passes), NoDraws(), [(torch.zeros(5, 1), labels)], 3, keep=True)
    torch.testing.assert_close(result["mutual_information"], kl, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result["entropy"], -(predictive * predictive.log()).sum(1), rtol=1e-12, atol=1e-14)
    assert (result["mutual_information"] >= 0).all()
    same = engine.evaluate(Replayed([passes[0]] * 3), NoDraws(), [(torch.zeros(5, 1), labels)], 3, keep=True)
    assert same["mutual_information"].abs().max() < 1e-12  # one network: no epistemic part


def test_auroc_and_fpr_at_95_agree_with_torchmetrics():
    generator = torch.Generator().manual_seed(2)
    inside = (torch.randn(300, generator=generator) + 1.0).round(decimals=1)  # ties too
    outside = torch.randn(200, generator=generator).round(decimals=1)
    scores = torch.cat([inside, outside])
    truth = torch.cat([torch.ones(300), torch.zeros(200)]).long()
    assert auroc(inside, outside) == pytest.approx(100 * torchmetrics.functional.auroc(
        scores, truth, task="binary").item(), abs=1e-4)
    fpr, tpr, _ = torchmetrics.functional.roc(scores, truth, task="binary")
    assert fpr_at_tpr(inside, outside) == pytest.approx(100 * fpr[tpr >= 0.95][0].item(), abs=1e-4)
    assert auroc(inside, inside) == pytest.approx(50.0)


# ---- through main.py -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(cifar10_root, tmp_path_factory):
    results = tmp_path_factory.mktemp("calibrated")
    train_tiny(cifar10_root, results, "run", epochs=2)
    return results


def test_the_log_and_metrics_hold_the_calibration_of_both_networks(trained):
    log = open(trained / "run.txt").read()
    line = re.compile(r"^Epoch \d/2 .*\(L=2\) NLL \d+\.\d{4}  ECE \d+\.\d\d  Brier \d\.\d{4}  \|  mean-net Prec@1 \S+ "
                      r"NLL \d+\.\d{4}  ECE \d+\.\d\d  Brier \d\.\d{4}  \|", re.M)
    assert len(line.findall(log)) == 2, log
    rows = metrics_without_seconds(trained / "run" / "metrics.csv")
    assert all(row[key] for row in rows for key in ("val_nll", "val_ece", "val_brier", "mean_nll", "mean_ece",
                                                   "mean_brier"))


def test_predictions_recompute_every_printed_accuracy_and_calibration(trained, tmp_path):
    out = run_main("--evaluate", trained / "run" / "checkpoint.pth.tar", "--gpus", "cpu", "-L", 2,
                   "--predictions", tmp_path / "p.pt")
    assert out.returncode == 0, out.stderr
    p = torch.load(tmp_path / "p.pt", weights_only=True)
    assert set(p) == {"probs", "mean_probs", "deployed_probs", "labels", "logits", "nll", "mean_nll", "deployed_nll",
                      "format", "version", "digest"}
    assert p["format"] == "vispa-predictions"
    helped = " ".join(run_main("--help").stdout.split())  # --help names every key a user reads
    helped = helped[helped.index("--predictions FILE with --evaluate"):helped.index("--ood DATASET with")]
    assert set(re.findall(r"'(\w+)'", helped)) == set(p) - {"format", "version", "digest"}
    assert p["probs"].dtype == torch.float32 and p["probs"].shape == (len(p["labels"]), 10)
    labels = p["labels"]
    test = re.search(r"Prec@1 (\S+)  Prec@5 (\S+)  \(L=2\)  \|  mean network Prec@1 (\S+)", out.stdout).groups()
    top5 = p["logits"].topk(5, 1).indices.eq(labels.view(-1, 1)).any(1)
    accuracy = lambda hits: f"{100 * hits.double().mean():.2f}"  # noqa: E731
    assert test == (accuracy(p["logits"].argmax(1) == labels), accuracy(top5),
                    accuracy(p["mean_probs"].argmax(1) == labels))
    printed = re.search(r"predictive: NLL (\S+)  ECE (\S+)  Brier (\S+)  \|  mean network: NLL (\S+)  ECE (\S+)  "
                        r"Brier (\S+)", out.stdout).groups()
    printed += re.search(r"Deployed network, .*: Prec@1 (\S+)  Prec@5 \S+  NLL (\S+)  ECE (\S+)  Brier (\S+)",
                         out.stdout).groups()
    figures = []
    for name, probs, nll in (("predictive", p["probs"], p["nll"]), ("mean", p["mean_probs"], p["mean_nll"]),
                             ("deployed", p["deployed_probs"], p["deployed_nll"])):
        probs = probs.double()
        if name == "deployed":
            figures.append(accuracy(probs.argmax(1) == labels))
        ece = torchmetrics.functional.classification.multiclass_calibration_error(
            probs.float(), labels, num_classes=probs.shape[1], n_bins=15, norm="l1").item()
        of_label = probs[torch.arange(len(labels)), labels]
        representable = of_label > 1e-30  # else the float32 probability rounded to 0
        torch.testing.assert_close(nll[representable], -of_label[representable].log(), rtol=1e-5, atol=1e-6)
        nll = nll.mean().item()
        brier = ((probs - F.one_hot(labels, probs.shape[1]).double()) ** 2).sum(1).mean().item()
        figures += [f"{nll:.4f}", f"{100 * ece:.2f}", f"{brier:.4f}"]
    assert list(printed) == figures
    # the log's epoch line says the same of that epoch
    row = metrics_without_seconds(trained / "run" / "metrics.csv")[-1]
    assert list(printed[:6]) == [row[k] for k in ("val_nll", "val_ece", "val_brier", "mean_nll", "mean_ece",
                                                   "mean_brier")]


def test_another_datasets_images_are_told_apart(trained, tmp_path):
    ood = tmp_path / "ood"
    write_structured_cifar(str(ood), "cifar100", 10, 120, seed=3)
    out = run_main("--evaluate", trained / "run" / "model_best.pth.tar", "--gpus", "cpu", "-L", 2, "--ood",
                   "cifar100", "--ood_data_root", ood)
    assert out.returncode == 0, out.stderr
    assert ("Out-of-distribution: the test set of the network (cifar10, 100 images, in) against that of --ood "
            "cifar100 (120 images, out)") in out.stdout
    rows = re.findall(r"^  (predictive entropy \(L=2\)|mutual information \(L=2\)|max probability, mean network "
                      r"sign\(M\)|max probability, deployed network) +(\d+\.\d\d) +(\d+\.\d\d)$", out.stdout, re.M)
    assert len(rows) == 4 and all(0 <= float(a) <= 100 and 0 <= float(f) <= 100 for _, a, f in rows), out.stdout


@pytest.mark.parametrize("command, message", [
    (["--ood", "cifar10"], "--ood cifar10 is the network's own test set"),
    (["--ood", "imagenet"], "--ood compares datasets held in memory"),
    (["--ood", "tiny-imagenet"], "--ood tiny-imagenet has images of 64 pixels"),
    (["--ood", "cifar10", "--ood-data-root", "the run's own"], "is the network's own test set"),
])
def test_an_ood_dataset_that_cannot_be_compared_is_refused(trained, cifar10_root, tmp_path, command, message):
    command = [cifar10_root if word == "the run's own" else word for word in command]
    assert_clear_error(run_main("--evaluate", trained / "run" / "model_best.pth.tar", "--gpus", "cpu", *command),
                       message)


def test_predictions_never_replace_a_checkpoint(trained):
    before = folder_digest(trained)
    r = run_main("--evaluate", trained / "run" / "model_best.pth.tar", "--gpus", "cpu", "--predictions",
                 trained / "run" / "checkpoint.pth.tar", "--overwrite")
    assert_clear_error(r, "is a file of a run")
    assert folder_digest(trained) == before


def test_tensorboard_holds_every_column_of_metrics(cifar10_root, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from utils.tensorboard import scalar_name
    r = run_main(*TINY, "--epochs", 2, "--data_root", cifar10_root, "--results_dir", tmp_path, "--save", "tb",
                 "--tensorboard")
    assert r.returncode == 0, r.stderr
    events = EventAccumulator(str(tmp_path / "tb" / "tb"))
    events.Reload()
    rows = metrics_without_seconds(tmp_path / "tb" / "metrics.csv")
    assert set(events.Tags()["scalars"]) == {scalar_name(key) for key in set(rows[0]) - {"epoch"} | {"seconds"}} | \
        {"step/lr", "step/loss"}
    assert {"val/prec1", "mean_net/ece", "train/loss", "lr", "deployed/prec1"} <= set(events.Tags()["scalars"])
    steps = [e.step for e in events.Scalars("step/loss")]
    assert steps == list(range(len(steps))) and len(steps) == 2 * 5  # every step of the 2 epochs (5 each)
    assert [e.step for e in events.Scalars("step/lr")] == steps
    for key in ("val_prec1", "val_ece", "mean_brier", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(scalar_name(key))]
        assert [step for step, _ in logged] == [1, 2]
        assert [f"{value:.2f}" for _, value in logged] == [f"{float(row[key]):.2f}" for row in rows]


def test_without_tensorboard_the_option_is_one_line(cifar10_root, tmp_path, monkeypatch):
    if torch.get_num_threads() > 1:
        pytest.skip("main.py runs forked from this process only with one thread")
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    r = run_main(*TINY, "--data_root", cifar10_root, "--results_dir", tmp_path, "--save", "x", "--tensorboard")
    assert_clear_error(r, "--tensorboard needs the tensorboard package", "pip install tensorboard")
    assert os.listdir(tmp_path) == []


def test_curves_and_a_reliability_diagram_are_drawn(cifar10_root, tmp_path):
    """Two seeds of one configuration (one band), and the reliability of one's predictions."""
    pytest.importorskip("matplotlib")
    for seed in (1, 2):
        r = run_main(*TINY, "--seed", seed, "--epochs", 2, "--data_root", cifar10_root, "--results_dir", tmp_path,
                     "--save", f"run_seed={seed}")
        assert r.returncode == 0, r.stderr
    p = run_main("--evaluate", tmp_path / "run_seed=2" / "checkpoint.pth.tar", "--gpus", "cpu", "-L", 2,
                 "--predictions", tmp_path / "p.pt")
    assert p.returncode == 0, p.stderr
    runs = [str(tmp_path / "run_seed=1"), str(tmp_path / "run_seed=2")]
    out = subprocess.run([sys.executable, "-m", "utils.plot", *runs, "--predictions", str(tmp_path / "p.pt"),
                          "--out", str(tmp_path / "c.png")], cwd=REPO, env=ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    with open(tmp_path / "c.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    from utils.plot import band, groups_of
    groups = groups_of(runs)
    assert list(groups) == ["run_seed=*"] and len(groups["run_seed=*"]) == 2  # two seeds, one band
    epochs, mean, std = band(groups["run_seed=*"], "val_prec1")
    rows = [metrics_without_seconds(os.path.join(run, "metrics.csv")) for run in runs]
    values = [float(r[0]["val_prec1"]) for r in rows]
    assert epochs == [1, 2] and mean[0] == pytest.approx(sum(values) / 2)
    assert std[0] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))


def test_without_matplotlib_plotting_is_one_line(tmp_path):
    probe = "import sys, runpy; sys.modules['matplotlib'] = None; sys.argv = ['plot', 'x', '--out', 'y.png']; " \
            "runpy.run_module('utils.plot', run_name='__main__')"
    os.makedirs(tmp_path / "x")
    (tmp_path / "x" / "metrics.csv").write_text("epoch,lr,train_loss,train_prec1,train_prec5,val_loss,val_prec1,"
                                                "val_prec5,mean_prec1,best_prec1,best_epoch,seconds\n")
    out = subprocess.run([sys.executable, "-c", probe.replace("'x'", repr(str(tmp_path / "x")))], cwd=REPO, env=ENV,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and out.stderr.strip() == "error: plotting needs matplotlib, which is not installed: " \
                                                          "pip install matplotlib"
