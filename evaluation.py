"""The commands that read a trained network without training it: ``--evaluate`` (on the
test set: accuracy, calibration, optionally the per-image predictions and the detection of
another dataset's images) and ``--export`` (the mean network sign(M), packed).

What a Bayesian network owes beyond top-1 (``utils/meters.py``, ``utils/ood.py``):
- calibration of the L-sample predictive distribution (the mean of the L networks'
  softmaxes) and of the mean network sign(M): NLL, ECE (15 bins, percent), Brier;
- ``--predictions FILE.pt``: ``probs`` (N x C, the L-sample predictive), ``mean_probs``
  (the mean network's), ``labels`` (N), ``logits`` (N x C, the L passes' logits
  averaged, whose top-1 and top-5 the released code reports) and ``nll``, ``mean_nll`` (N,
  float64: -log of the label's probability, computed in log space, where a float32
  probability may have rounded to 0), loadable with
  ``torch.load(weights_only=True)``, from which the printed accuracies and calibration
  can be computed again;
- ``--ood DATASET``: the test set of the network's dataset against another's, by the
  predictive entropy, by the mutual information between the prediction and the weights
  (what only a distribution over networks has: the entropy of the predictive minus the
  mean entropy of the L networks) and, as the baseline, by the mean network's maximum
  probability: AUROC and FPR at 95% TPR.
"""
import os
import sys

import torch

import engine
import factory
from config import UsageError
from data import DATASETS, DatasetError, InMemory
from models import packed
from utils import distributed, predictions
from utils.ood import auroc, fpr_at_tpr
from utils.progress import progress
from utils.run_dir import EXIT_OK, calibration, check_output


def evaluate_file(args, cfg, on_command_line, device, world):
    """``--evaluate``: print the L-sample and mean-network results of a checkpoint, or the
    results of an exported network. With torchrun the ranks share the test set."""
    if factory.is_exported(args.evaluate):
        if args.ood or args.predictions:
            raise UsageError("--ood and --predictions need the distribution of a checkpoint; an exported network "
                             "is the mean network alone")
        return evaluate_exported(args, cfg, on_command_line, device, world)
    if args.predictions:
        check_output(args.predictions, args.overwrite, predictions.is_predictions, "--predictions",
                     "a file of predictions")
    loaded = factory.load_network(args.evaluate, cfg, on_command_line, device)
    cfg = loaded.cfg
    folder = factory.DataFolder.of(args.data_root, cfg.dataset, loaded.trained_on)
    test = factory.test_batches(cfg, folder, device, world)
    outside = ood_batches(args, cfg, device, world) if args.ood else None
    problem = factory.class_problem(cfg, folder)
    if problem and loaded.released:
        raise DatasetError(f"{problem}: the released network's classes are the full dataset's")
    if problem and world.main:
        print(f"warning: {problem}", file=sys.stderr)

    keep = bool(args.predictions or args.ood)
    factory.evaluation_draws(loaded.opt, cfg, loaded.epoch, world.rank)
    total = distributed.summing(world)
    val = engine.evaluate(loaded.model, loaded.opt, progress(test, f"eval L={cfg.L}"), cfg.L, cfg.bf16, total, keep)
    mean = engine.evaluate_mean(loaded.model, loaded.opt, test, cfg.bf16, total, keep)
    if world.main:
        print(f"Evaluated {args.evaluate} ({cfg.model}, {cfg.dataset}, K={cfg.K}; {loaded.source})")
        print(f"Calibration, L={cfg.L} predictive: {calibration(val['nll'], val['ece'], val['brier'])}  |  "
              f"mean network: {calibration(mean['nll'], mean['ece'], mean['brier'])}")
        print(loaded.note + f"Test: loss {val['loss']:.4f}  Prec@1 {val['prec1']:.2f}  Prec@5 {val['prec5']:.2f}  "
              f"(L={cfg.L})  |  mean network Prec@1 {mean['prec1']:.2f}")
    if args.predictions:
        write_predictions(args.predictions, val, mean, world)
    if outside is not None:
        far = engine.evaluate(loaded.model, loaded.opt, progress(outside, f"{args.ood} L={cfg.L}"), cfg.L, cfg.bf16,
                              None, keep=True)
        far_mean = engine.evaluate_mean(loaded.model, loaded.opt, outside, cfg.bf16, None, keep=True)
        report_ood(args.ood, cfg, gathered(val, world), gathered(mean, world), gathered(far, world),
                   gathered(far_mean, world), world)
    return EXIT_OK


def evaluate_exported(args, cfg, on_command_line, device, world):
    """``--evaluate OUT.bnn``: the exported network's loss, accuracy and calibration."""
    model, cfg, source = factory.load_exported(args.evaluate, cfg, on_command_line, device)
    test = factory.test_batches(cfg, factory.DataFolder.of(args.data_root, cfg.dataset), device, world)
    result = engine.evaluate_deterministic(model, test, False, distributed.summing(world))
    if world.main:
        print(f"Evaluated {args.evaluate} ({cfg.model}, {cfg.dataset}; the exported network sign(M) of {source})")
        print(f"Calibration: {calibration(result['nll'], result['ece'], result['brier'])}")
        print(f"Test: loss {result['loss']:.4f}  Prec@1 {result['prec1']:.2f}  Prec@5 {result['prec5']:.2f}  "
              f"(the mean network sign(M))")
    return EXIT_OK


# ---- the per-image outputs ---------------------------------------------------------------------------

def gathered(result, world):
    """The per-image outputs of every rank, in rank order (the shards are the test set in
    order), on every rank."""
    keys = [k for k, v in result.items() if isinstance(v, torch.Tensor)]
    parts = distributed.gather({k: result[k] for k in keys}, world)
    return {k: torch.cat([part[k] for part in parts]) for k in keys}


def write_predictions(path, val, mean, world):
    """``--predictions``: the predictive and mean-network probabilities and the labels, as
    plain data (rank 0 writes the whole test set's)."""
    val, mean = gathered(val, world), gathered(mean, world)
    if world.main:
        predictions.write({"probs": val["probs"], "mean_probs": mean["probs"], "labels": val["labels"],
                           "logits": val["logits"], "nll": val["image_nll"], "mean_nll": mean["image_nll"]}, path)
        print(f"Predictions of the {len(val['labels'])} test images written to {path}")


# ---- images of another dataset -----------------------------------------------------------------------

def ood_batches(args, cfg, device, world):
    """This rank's part of the test set of ``args.ood``, normalised as the network's own
    dataset is (the network knows no other input), with no labels that mean anything."""
    inside, outside = DATASETS[cfg.dataset], DATASETS[args.ood]
    if args.ood == cfg.dataset:
        raise UsageError(f"--ood {args.ood} is the network's own dataset: name another")
    if not isinstance(outside, InMemory) or not isinstance(inside, InMemory):
        raise UsageError(f"--ood compares datasets held in memory (CIFAR-10, CIFAR-100, Tiny-ImageNet), not "
                         f"{args.ood if not isinstance(outside, InMemory) else cfg.dataset}")
    if outside.image_size != inside.image_size:
        raise UsageError(f"--ood {args.ood} has images of {outside.image_size} pixels; {cfg.model} on {cfg.dataset} "
                         f"takes {inside.image_size}")
    root = args.ood_data_root or outside.default_root
    images, labels = outside.read(root, "test")
    if len(labels) == 0:
        raise DatasetError(f"--ood {args.ood}: the test set in {root} has no images to tell apart")
    return inside.loader(images, torch.zeros_like(labels), cfg.eval_batch_size, False, device, [world.rank],
                         world.size)


def report_ood(name, cfg, val, mean, far, far_mean, world):
    """The table of ``--ood``: AUROC and FPR at 95% TPR of three scores."""
    if not world.main:
        return
    rows = [(f"predictive entropy (L={cfg.L})", -val["entropy"], -far["entropy"]),
            (f"mutual information (L={cfg.L})", -val["mutual_information"], -far["mutual_information"]),
            ("max probability, mean network sign(M)", mean["max_prob"], far_mean["max_prob"])]
    print(f"Out-of-distribution: the {cfg.dataset} test set ({len(val['entropy'])} images, in) against the {name} "
          f"test set ({len(far['entropy'])} images, out)")
    print(f"  {'score':<40}{'AUROC':>8}{'FPR@95%TPR':>12}")
    for label, inside, outside in rows:
        if (cfg.K == 0 or cfg.L == 1) and label.startswith("mutual"):  # one network: zero, up to rounding
            why = "K = 0: one network" if cfg.K == 0 else "L = 1: one sampled network"
            print(f"  {label:<40}{'n/a':>8}{'n/a':>12}   ({why}, no mutual information)")
            continue
        print(f"  {label:<40}{auroc(inside, outside):>8.2f}{fpr_at_tpr(inside, outside):>12.2f}")


# ---- exporting ---------------------------------------------------------------------------------------

def is_exported_network(path) -> bool:
    """Whether ``path`` is a whole exported network (format, digest and fields checked)."""
    try:
        packed.read_packed(path)
        return True
    except packed.PackedError:
        return False


def export_file(args, cfg, on_command_line):
    """``--export FILE --out OUT``: the mean network sign(M) of a checkpoint, packed."""
    if os.path.exists(args.out) and os.path.exists(args.export) and os.path.samefile(args.out, args.export):
        raise UsageError(f"--out {args.out} is the checkpoint being exported: choose another --out")
    check_output(args.out, args.overwrite, is_exported_network, "--out", "an exported network")
    loaded = factory.load_network(args.export, cfg, on_command_line, torch.device("cpu"))
    cfg = loaded.cfg
    packed.save(factory.exported_network(loaded, f"{args.export} ({loaded.source})"), args.out)
    size = os.path.getsize(args.out)
    full = sum(t.numel() * (4 if t.is_floating_point() else t.element_size())
               for t in loaded.model.state_dict().values())
    bits = sum(p.numel() for p in loaded.model.parameters() if getattr(p, "binary", False))
    print(f"Exported the mean network sign(M) of {args.export} ({cfg.model}, {cfg.dataset}; {loaded.source}) to "
          f"{args.out}: {size / 1e6:.2f} MB, 1/{full / size:.1f} of its float32 state_dict ({full / 1e6:.1f} MB); "
          f"{bits / 1e6:.2f} M binary weights in {bits / 8e6:.2f} MB of bits")
    return EXIT_OK
