"""The commands that read a trained network without training it: ``--evaluate`` (on the
test set) and ``--export`` (the network to deploy, packed). main.py makes the typed
request (``Evaluation``, ``Export``) from the command line; a notebook makes it the same
way:

    from config import Config
    from evaluate import Evaluation, evaluate
    evaluate(Evaluation("results/run/model_best.pth.tar", asked=Config(L=16), typed={"L"}))

A checkpoint is evaluated three ways:
- the L-sample predictive: the logits of L sampled networks averaged (the released
  code's accuracy), and the mean of their softmaxes (its calibration);
- the mean network sign(M), with the BatchNorm statistics of training (gathered on the
  sampled networks): the authors' mean network;
- the deployed network: sign(M) with BatchNorm statistics of its own, recomputed on
  ``--recalibrate`` training images (``optim.recalibrate``): what ``--export`` writes,
  one network instead of L, and the one a user ships.
Each with its calibration (NLL, ECE in percent over 15 bins, Brier). Optionally:
- ``--predictions FILE``: the per-image probabilities (``utils/predictions.py``);
- ``--ood DATASET``: the test set of the network's dataset against another's, by the
  predictive entropy, the mutual information between the prediction and the weights
  (the entropy of the predictive minus the mean entropy of the L networks: what only a
  distribution over networks has), and the maximum probability of the mean and of the
  deployed network: AUROC and FPR at 95% TPR.
An exported network (``.bnn``) is one network: its own figures.
"""
import os
import sys
from dataclasses import dataclass

import torch

import engine
import factory
from config import Config, UsageError
from data import DATASETS, DatasetError, InMemory
from models import packed
from optim import recalibrate
from utils import distributed, predictions
from utils.ood import auroc, fpr_at_tpr
from utils.progress import progress
from utils.run_dir import EXIT_OK, calibration, check_output, deployed_line


@dataclass(frozen=True)
class Evaluation:
    """``--evaluate path``: ``asked`` is the Config of the command line and ``typed`` the
    settings typed on it (they must agree with the file's network; the evaluation
    settings among them, such as L, replace the file's)."""
    path: str
    asked: Config = Config()
    typed: frozenset = frozenset()
    data_root: str = None          # default: the folder the run was trained on, else the dataset's
    predictions: str = None        # write the per-image probabilities here
    ood: str = None                # tell this dataset's test images from the network's own
    ood_data_root: str = None
    overwrite: bool = False        # --predictions may replace a file of predictions


@dataclass(frozen=True)
class Export:
    """``--export path --out out``: the deployed network (BatchNorm statistics recomputed
    on ``--recalibrate`` training images; with 0, those of training) of a checkpoint."""
    path: str
    out: str
    asked: Config = Config()
    typed: frozenset = frozenset()
    data_root: str = None
    overwrite: bool = False


# ---- --evaluate ------------------------------------------------------------------------------------

def evaluate(request: Evaluation, device=torch.device("cpu"), world=distributed.World()) -> int:
    """Print the results of the file's network on the test set; with torchrun the ranks
    share the images."""
    if request.predictions:
        check_predictions(request)
    loaded = factory.open_network(request.path, request.asked, request.typed, device)
    cfg = loaded.cfg
    if loaded.kind == factory.EXPORTED and (request.ood or request.predictions):
        raise UsageError("--ood and --predictions need the distribution of a checkpoint; an exported network is "
                         "one network")
    folder = factory.DataFolder.of(request.data_root, cfg.dataset, loaded.trained_on)
    factory.classes_in(cfg, folder, loaded.classes)
    test = factory.test_batches(cfg, folder, device, world)
    outside = ood_batches(request, cfg, folder, device, world) if request.ood else None
    problem = factory.class_problem(cfg, folder)
    if problem and loaded.kind == factory.RELEASED:
        raise DatasetError(f"{problem}: the released network's classes are the full dataset's")
    if problem and world.main:
        print(f"warning: {problem}", file=sys.stderr)
    total = distributed.summing(world)
    if loaded.kind == factory.EXPORTED:
        return report_exported(request, loaded, engine.evaluate_deterministic(loaded.model, test, False, total), world)
    recalibration = factory.recalibration_batches(cfg, folder, device, world) if cfg.recalibrate else None

    keep = bool(request.predictions or request.ood)
    factory.evaluation_draws(loaded.opt, cfg, loaded.epoch, world.rank)
    val = engine.evaluate(loaded.model, loaded.opt, progress(test, f"eval L={cfg.L}"), cfg.L, cfg.bf16, total, keep)
    mean = engine.evaluate_mean(loaded.model, loaded.opt, test, cfg.bf16, total, keep)
    deployed = engine.evaluate_deployed(loaded.model, loaded.opt, progress(recalibration, "recalibrate"), test,
                                        cfg.bf16, total, keep) if recalibration is not None else None
    if world.main:
        method = f"K={cfg.K}" if cfg.method == "vispa" else f"--method {cfg.method}"
        print(f"Evaluated {request.path} ({cfg.model}, {cfg.dataset}, {method}; {loaded.source})")
        print(f"Calibration, L={cfg.L} predictive: {calibration(val['nll'], val['ece'], val['brier'])}  |  "
              f"mean network: {calibration(mean['nll'], mean['ece'], mean['brier'])}")
        print(loaded.note + f"Test: loss {val['loss']:.4f}  Prec@1 {val['prec1']:.2f}  Prec@5 {val['prec5']:.2f}  "
              f"(L={cfg.L})  |  mean network Prec@1 {mean['prec1']:.2f}")
        if deployed is not None:
            print(deployed_line(deployed))
    if request.predictions:
        write_predictions(request, val, mean, deployed, world)
    if outside is not None:
        far = engine.evaluate(loaded.model, loaded.opt, progress(outside, f"{request.ood} L={cfg.L}"), cfg.L, cfg.bf16,
                              None, keep=True)
        far_mean = engine.evaluate_mean(loaded.model, loaded.opt, outside, cfg.bf16, None, keep=True)
        far_deployed = engine.evaluate_deployed(loaded.model, loaded.opt, recalibration, outside, cfg.bf16, None,
                                                keep=True) if deployed is not None else None
        report_ood(request.ood, cfg, {name: gathered(result, world) if result is not None else None
                                      for name, result in (("val", val), ("mean", mean), ("deployed", deployed),
                                                           ("far", far), ("far_mean", far_mean),
                                                           ("far_deployed", far_deployed))}, world)
    return EXIT_OK


def report_exported(request, loaded, result, world):
    if world.main:
        print(f"Evaluated {request.path} ({loaded.cfg.model}, {loaded.cfg.dataset}; {loaded.source}, with "
              f"{packed.describe_statistics(loaded.statistics)})")
        print(f"Calibration: {calibration(result['nll'], result['ece'], result['brier'])}")
        what = "the deployed network" if loaded.statistics.get("source") == "recomputed" else "the mean network"
        print(f"Test: loss {result['loss']:.4f}  Prec@1 {result['prec1']:.2f}  Prec@5 {result['prec5']:.2f}  "
              f"({what} sign(M))")
    return EXIT_OK


# ---- the per-image outputs ---------------------------------------------------------------------------

def gathered(result, world):
    """The per-image outputs of every rank, in rank order (the shards are the test set in
    order), on every rank."""
    keys = [k for k, v in result.items() if isinstance(v, torch.Tensor)]
    parts = distributed.gather({k: result[k] for k in keys}, world)
    return {k: torch.cat([part[k] for part in parts]) for k in keys}


def check_predictions(request) -> bool:
    """``--predictions`` may be written (``check_output``): when the command starts, and
    again when the file is written."""
    return check_output(request.predictions, request.overwrite, predictions.is_predictions, "--predictions",
                        "a file of predictions")


def write_predictions(request, val, mean, deployed, world):
    """``--predictions``: the probabilities of the predictive, the mean network and the
    deployed network, and the labels, as plain data (rank 0 writes the whole test set's)."""
    path = request.predictions
    val, mean = gathered(val, world), gathered(mean, world)
    deployed = gathered(deployed, world) if deployed is not None else None
    if world.main:
        content = {"probs": val["probs"], "mean_probs": mean["probs"], "labels": val["labels"],
                   "logits": val["logits"], "nll": val["image_nll"], "mean_nll": mean["image_nll"]}
        if deployed is not None:
            content.update(deployed_probs=deployed["probs"], deployed_nll=deployed["image_nll"])
        predictions.write(content, path, new_only=check_predictions(request))  # still free?
        print(f"Predictions of the {len(val['labels'])} test images written to {path}")


# ---- images of another dataset -----------------------------------------------------------------------

def ood_batches(request, cfg, folder, device, world):
    """This rank's part of the test set of ``request.ood``, normalised as the network's own
    dataset is (the network knows no other input), with no labels that mean anything
    (images of one's own: the class folders of ``val/`` alone)."""
    inside, outside = DATASETS[cfg.dataset], DATASETS[request.ood]
    root = request.ood_data_root or outside.default_root
    if request.ood == cfg.dataset and (not request.ood_data_root or _same_folder(root, folder.path)):
        raise UsageError(f"--ood {request.ood} {'in ' + root + ' ' if request.ood_data_root else ''}is the "
                         f"network's own test set: name another dataset, or another folder of it with "
                         f"--ood-data-root")
    if not isinstance(outside, InMemory) or not isinstance(inside, InMemory):
        raise UsageError(f"--ood compares datasets held in memory (CIFAR-10, CIFAR-100, Tiny-ImageNet), not "
                         f"{request.ood if not isinstance(outside, InMemory) else cfg.dataset}")
    size = cfg.image_size if outside.own_images else outside.image_size
    if size != cfg.image_size:
        raise UsageError(f"--ood {request.ood} has images of {size} pixels; {cfg.model} on {cfg.dataset} "
                         f"takes {cfg.image_size}")
    try:
        images, labels = outside.read_other(root, cfg.image_size)
    except DatasetError as error:
        raise DatasetError(f"--ood {request.ood} --ood-data-root {root}: {error}") from None
    if len(labels) == 0:
        raise DatasetError(f"--ood {request.ood}: the test set in {root} has no images to tell apart")
    return inside.loader(images, torch.zeros_like(labels), cfg.eval_batch_size, False, device, [world.rank],
                         world.size)


def _same_folder(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def report_ood(name, cfg, results, world):
    """The table of ``--ood``: AUROC and FPR at 95% TPR of each score (higher: in)."""
    if not world.main:
        return
    val, mean, deployed = results["val"], results["mean"], results["deployed"]
    far, far_mean, far_deployed = results["far"], results["far_mean"], results["far_deployed"]
    rows = [(f"predictive entropy (L={cfg.L})", -val["entropy"], -far["entropy"]),
            (f"mutual information (L={cfg.L})", -val["mutual_information"], -far["mutual_information"]),
            ("max probability, mean network sign(M)", mean["max_prob"], far_mean["max_prob"])]
    if deployed is not None:
        rows.append(("max probability, deployed network", deployed["max_prob"], far_deployed["max_prob"]))
    print(f"Out-of-distribution: the test set of the network ({cfg.dataset}, {len(val['entropy'])} images, in) "
          f"against that of --ood {name} ({len(far['entropy'])} images, out)")
    print(f"  {'score':<40}{'AUROC':>8}{'FPR@95%TPR':>12}")
    for label, inside, outside in rows:
        one = cfg.method == "ste" or (cfg.method == "vispa" and cfg.K == 0)
        if (one or cfg.L == 1) and label.startswith("mutual"):  # one network: zero, up to rounding
            why = f"{'K = 0' if cfg.method == 'vispa' else cfg.method}: one network" if one else \
                "L = 1: one sampled network"
            print(f"  {label:<40}{'n/a':>8}{'n/a':>12}   ({why}, no mutual information)")
            continue
        print(f"  {label:<40}{auroc(inside, outside):>8.2f}{fpr_at_tpr(inside, outside):>12.2f}")


# ---- --export ----------------------------------------------------------------------------------------

def is_exported_network(path) -> bool:
    """Whether ``path`` is a whole exported network (format, digest and fields checked)."""
    try:
        packed.read_packed(path)
        return True
    except packed.PackedError:
        return False


def check_out(request) -> bool:
    """``--out`` may be written (``check_output``): when the export starts, and again
    when the network is written."""
    return check_output(request.out, request.overwrite, is_exported_network, "--out", "an exported network")


def export(request: Export) -> int:
    """The deployed network of a checkpoint, packed: its binary weights sign(M) at one bit
    each, everything else float32, the BatchNorm statistics recomputed for sign(M) on
    ``--recalibrate`` training images (0: those of training), on the CPU."""
    if os.path.exists(request.out) and os.path.exists(request.path) and os.path.samefile(request.out, request.path):
        raise UsageError(f"--out {request.out} is the checkpoint being exported: choose another --out")
    check_out(request)
    cpu = torch.device("cpu")
    loaded = factory.open_network(request.path, request.asked, request.typed, cpu)
    if loaded.kind == factory.EXPORTED:
        raise UsageError(f"{request.path} is an exported network already: export a checkpoint")
    cfg = loaded.cfg
    statistics = packed.TRAINING_STATISTICS
    folder = factory.DataFolder.of(request.data_root, cfg.dataset, loaded.trained_on)
    if cfg.recalibrate:
        factory.classes_in(cfg, folder, loaded.classes)  # the images of the classes it was trained on
        try:
            images = factory.recalibration_batches(cfg, folder, cpu, distributed.World())
        except DatasetError as error:
            raise DatasetError(f"{error}; --export recomputes the deployed network's BatchNorm statistics on "
                               f"training images (--recalibrate 0 keeps those of training instead)") from None
        used = recalibrate(loaded.model, loaded.opt, progress(images, "recalibrate"))
        statistics = {"source": "recomputed", "images": used}
    source = f"{request.path} ({loaded.source})"
    data_root = os.path.abspath(folder.path) if loaded.trained_on or request.data_root else None
    content = factory.exported_network(loaded, source, statistics, data_root)
    packed.save(content, request.out, new_only=check_out(request))  # still free?
    size = os.path.getsize(request.out)
    full = sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
               for t in loaded.model.state_dict().values())
    bits = sum(p.numel() for p in loaded.model.parameters() if getattr(p, "binary", False))
    print(f"Exported the deployed network sign(M) of {request.path} ({cfg.model}, {cfg.dataset}; {loaded.source}; "
          f"{packed.describe_statistics(statistics)}) to {request.out}: {size / 1e6:.2f} MB, 1/{full / size:.1f} of "
          f"its float32 state_dict ({full / 1e6:.1f} MB); {bits / 1e6:.2f} M binary weights in {bits / 8e6:.2f} MB "
          f"of bits")
    return EXIT_OK
