"""Train a binary-weight ResNet18 or VGG16 (1W32A) on CIFAR with VISPA, or evaluate one.

    python main.py --demo                              # one minute, generated data, CPU
    python main.py --model resnet18 --dataset cifar100 --save my_run
    python main.py --resume results/my_run             # continue a stopped run exactly
    python main.py --evaluate results/my_run/model_best.pth.tar

One training step: a batch from data/ -> inside ``opt.sampled_params(train=True)``
the forward pass on one sign sample of the binary weights, the loss, backward ->
``opt.step()`` -> loss and accuracy accumulated on the device. Once per epoch:
the L-sample evaluation, the mean-network evaluation, one log line, one
checkpoint. The log is ``results/<save>.txt`` and ends with the best accuracy;
checkpoints and ``metrics.csv`` are in ``results/<save>/``.

A kill at any moment loses at most the current epoch: checkpoints are replaced
atomically, and ``--resume`` continues from the last one exactly as if the run
had not stopped. Exit status: 0 done; 1 an error (one line on stderr, nothing
overwritten); 2 bad command line; 3 the training diverged (the checkpoint of the
last good epoch stays); 128 + signal number after SIGINT / SIGTERM (the log says
how to resume).
"""
import argparse
import csv
import hashlib
import math
import os
import random
import shlex
import signal
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import NUM_CLASSES, DatasetError, DeviceLoader, read_cifar, read_split, torchvision_loader
from models import MODELS, ALIASES, build_model, canonical_name, released
from optim import VISPA, learning_rate
from utils import checkpoint
from utils.checkpoint import CheckpointError
from utils.meters import Accumulator
from utils.runlog import RunLog, best_line

# The settings that determine a run: a resumed run must have the same ones. (workers
# too: with --loader torchvision each worker process draws its own augmentations.)
RUN_SETTINGS = ("model", "dataset", "width", "epochs", "batch_size", "eval_batch_size", "lr",
                "momentum", "wd", "lr_decay", "warmup_epochs", "K", "L", "scale", "projection",
                "seed", "bf16", "loader", "workers")
CHECKPOINT, BEST = "checkpoint.pth.tar", "model_best.pth.tar"  # in results/<save>/
CSV_FIELDS = ("epoch", "lr", "train_loss", "train_prec1", "train_prec5", "val_loss", "val_prec1",
              "val_prec5", "mean_prec1", "best_prec1", "best_epoch", "seconds")


class UsageError(Exception):
    """A request this run cannot carry out; the message says what to do instead."""


# ---- command line ------------------------------------------------------------------------

def _bounded(kind, low, inclusive=True):
    """An argparse type: ``kind`` with a lower bound, and a message that says so."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (value >= low if inclusive else value > low) or (kind is float and math.isnan(value)):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        return value
    return parse


def _model_name(text):
    try:
        return canonical_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error))


def build_parser():
    p = argparse.ArgumentParser(
        description="Train binary-weight networks (1W32A) on CIFAR with VISPA: Gaussian variational "
                    "inference over the binary weights with a rank-K covariance factor.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--model", type=_model_name, default="resnet18",
      help=f"network: {', '.join(MODELS)} (also accepted: {', '.join(ALIASES)})")
    a("--dataset", choices=sorted(NUM_CLASSES), default="cifar100")
    a("--data_root", default="./datasets", help="folder holding cifar-100-python/ or cifar-10-batches-py/")
    a("--width", type=_bounded(int, 1), default=64,
      help="width of the first layer (64 = the paper's networks; smaller for quick experiments)")
    a("--epochs", type=_bounded(int, 1), default=500)
    a("-b", "--batch-size", dest="batch_size", type=_bounded(int, 1), default=256)
    a("--eval-batch-size", dest="eval_batch_size", type=_bounded(int, 1), default=1000,
      help="test batch size; evaluation uses BatchNorm's running statistics, so it computes "
           "the same function for any value")
    a("--lr", type=_bounded(float, 0), default=0.1, help="peak learning rate")
    a("--momentum", type=_bounded(float, 0), default=0.9)
    a("--wd", type=_bounded(float, 0), default=5e-4, help="weight decay (on M, Z and real parameters)")
    a("--lr_decay", choices=["cos", "constant"], default="cos",
      help="after warm-up: cosine to 0 per iteration, or constant")
    a("--warmup_epochs", type=_bounded(int, 0), default=5, help="linear warm-up from 0, per iteration")
    a("-K", type=_bounded(int, 0), default=8, help="rank of the covariance factor Z; 0 = plain "
      "latent weights with sign and straight-through (the 'without Z' ablation)")
    a("-L", type=_bounded(int, 1), default=40,
      help="samples per test image; the logits of the L passes are averaged")
    a("-scale", "--scale", type=_bounded(float, 0, inclusive=False), default=100.0,
      help="S: the draw is r ~ N(0, I_K / S); the Z gradient is scaled by sqrt(S)")
    a("--projection", choices=["none", "sphere"], default="none",
      help="'sphere' rescales every entry to M_i^2 + |Z_i|^2/S = 1 after each step, the paper's "
           "constraint; the released code (and the published numbers) do not")
    a("--seed", type=int, default=None, help="random seed (default: drawn at random and logged)")
    a("--gpus", default=None, help="CUDA device index, or 'cpu' (default: GPU 0 if there is one)")
    a("-j", "--workers", type=_bounded(int, 0), default=4,
      help="data-loading processes (only for --loader torchvision)")
    a("--loader", choices=["device", "torchvision"], default="device",
      help="'device': the dataset stays on the training device and batches are augmented there; "
           "'torchvision': the released code's DataLoader with PIL transforms (slower)")
    a("--bf16", action="store_true",
      help="bfloat16 autocast for the forward passes (faster on GPUs). The binary weights are "
           "exact in bf16; activations and BatchNorm inputs are rounded, so results differ "
           "slightly from the float32 reference")
    a("--save", default=None, help="run name: log results/<save>.txt, checkpoints results/<save>/ "
      "(default: <model>_<dataset>_<date>)")
    a("--results_dir", default="./results")
    a("-e", "--evaluate", metavar="FILE", default=None,
      help="evaluate a checkpoint on the test set (ours, or the authors' released format with "
           "--model/--dataset/-K naming the network) and exit")
    a("--resume", nargs="?", const="", default=None, metavar="PATH",
      help="continue a run from its checkpoint: a checkpoint file, a run folder, or nothing "
           "for the folder of --save")
    a("--overwrite", action="store_true", help="start over in a --save folder that already holds a run")
    a("--demo", action="store_true",
      help="a one-minute run of the whole pipeline on a small generated dataset, on the CPU")
    return p


DEMO = dict(model="resnet18", dataset="cifar10", width=16, epochs=6, batch_size=64,
            eval_batch_size=500, lr=0.05, warmup_epochs=1, K=4, L=4, seed=0, gpus="cpu",
            save="demo", overwrite=True)


def apply_demo(args):
    """Point the run at a generated CIFAR-10-format dataset (written once) and a small
    setting that finishes in about a minute on a CPU."""
    from data.synthetic import write_structured_cifar
    vars(args).update(DEMO)
    args.data_root = os.path.join(args.results_dir, "demo_data")
    if not os.path.isdir(os.path.join(args.data_root, "cifar-10-batches-py")):
        write_structured_cifar(args.data_root, "cifar10", num_train=2000, num_test=500, seed=0)


# ---- devices, seeds ------------------------------------------------------------------------

def select_device(gpus):
    if gpus is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if gpus.strip().lower() == "cpu":
        return torch.device("cpu")
    try:
        index = int(gpus)
    except ValueError:
        raise UsageError(f"--gpus takes one CUDA device index or 'cpu', got {gpus!r}") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= index < count:
        raise UsageError(f"--gpus {index}: no such CUDA device (this machine has "
                         f"{count or 'no'} GPU{'s' if count != 1 else ''}; use --gpus cpu)")
    return torch.device("cuda", index)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- training and evaluation ---------------------------------------------------------------

def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def full_precision(logits):
    """Losses and averages in at least float32, also when the forward pass ran in bf16."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def train_one_epoch(model, opt, loader, lr_at, first_iteration, device, bf16, stop, progress):
    """One pass over the training set; None if a stop was requested on the way."""
    model.train()
    meter = Accumulator(device)
    for i, (images, labels) in enumerate(progress(loader, "train")):
        if stop.signum is not None:
            return None
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        lr = lr_at(first_iteration + i)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        with opt.sampled_params(train=True):
            with autocast(device, bf16):
                logits = model(images)
            loss = F.cross_entropy(full_precision(logits), labels)
            loss.backward()
        opt.step()
        meter.add(loss, logits, labels)
    return meter.result()


@torch.no_grad()
def evaluate(model, opt, loader, L, device, bf16, stop=None, progress=None):
    """The released code's protocol: every batch through L networks, each with fresh
    draws for every binary tensor; accuracy from the averaged logits, loss = the mean
    of the L per-pass losses. The part before the first binary layer (``model.stem``)
    does not depend on the draws and is computed once per batch."""
    model.eval()
    meter = Accumulator(device)
    for images, labels in (progress(loader, f"eval L={L}") if progress else loader):
        if stop is not None and stop.signum is not None:
            return None
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with autocast(device, bf16):
            features = model.stem(images)
        logits_sum, loss_sum = 0.0, 0.0
        for _ in range(L):
            with opt.sampled_params(), autocast(device, bf16):
                logits = full_precision(model.body(features))
            logits_sum = logits_sum + logits
            loss_sum = loss_sum + F.cross_entropy(logits, labels)
        meter.add(loss_sum / L, logits_sum / L, labels)
    return meter.result()


@torch.no_grad()
def evaluate_mean(model, opt, loader, device, bf16):
    """The deterministic network b = sign(M): the one binary network to deploy."""
    model.eval()
    meter = Accumulator(device)
    with opt.mean_params():
        for images, labels in loader:
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with autocast(device, bf16):
                logits = full_precision(model(images))
            meter.add(F.cross_entropy(logits, labels), logits, labels)
    return meter.result()


class StopRequest:
    """SIGINT / SIGTERM set ``signum``; the loops check it at every step and stop
    cleanly. A second SIGINT interrupts at once."""

    def __init__(self):
        self.signum = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def progress_bars(enabled):
    def wrap(iterable, description):
        return tqdm(iterable, desc=description, leave=False, dynamic_ncols=True, disable=not enabled)
    return wrap


# ---- building a run ------------------------------------------------------------------------

def build(settings, device):
    """The network and its optimizer for a dict of run settings."""
    model = build_model(settings["model"], NUM_CLASSES[settings["dataset"]], settings["width"])
    if device.type == "cuda":
        model = model.to(device, memory_format=torch.channels_last)
    opt = VISPA(model.parameters(), lr=settings["lr"], momentum=settings["momentum"],
                weight_decay=settings["wd"], K=settings["K"], S=settings["scale"],
                projection=None if settings["projection"] == "none" else settings["projection"],
                seed=draws_seed(settings["seed"] if settings["seed"] is not None else 0))
    return model, opt


def draws_seed(seed):
    """The seed of VISPA's generator of draws: made from the run seed, but another
    stream than the one that initialises the network and shuffles the data."""
    return int.from_bytes(hashlib.sha256(f"vispa-draws:{seed}".encode()).digest()[:8], "little") >> 2


def loaders(settings, images, device, workers):
    """Training and test batches, from the device-resident loader or torchvision's."""
    train_x, train_y, test_x, test_y = images
    if settings["loader"] == "torchvision":
        return (torchvision_loader(train_x, train_y, settings["batch_size"], True, workers),
                torchvision_loader(test_x, test_y, settings["eval_batch_size"], False, workers))
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    return (DeviceLoader(train_x, train_y, settings["batch_size"], True, device, fmt),
            DeviceLoader(test_x, test_y, settings["eval_batch_size"], False, device, fmt))


def load_into(model, opt, ckpt, path):
    """Fill the network and the distribution from one of our checkpoints, strictly."""
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit this network: {error}") from None


def load_released(model, opt, found):
    """Fill the network and the distribution from a released state_dict, mapped by
    ``models.released.from_released``."""
    model.load_state_dict(found.model_state)
    params = dict(model.named_parameters())
    for name, (M, Z) in found.distributions.items():
        opt.set_distribution(params[name], M, Z)


def check_version(ckpt, path, purpose):
    """Checkpoints of format 1 hold a ResNet18 trained with a ReLU after the stem, which
    the authors' network (and this one, now) does not have: refused. VGG16 files of
    format 1 compute the same function and may be evaluated."""
    version = ckpt.get("version", 1)
    if version > checkpoint.VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this program "
                              f"(checkpoint format {version}; this one reads up to {checkpoint.VERSION})")
    if version == 1 and ckpt["config"]["model"] == "resnet18":
        raise CheckpointError(f"{path} holds a ResNet18 of checkpoint format 1, trained with a ReLU "
                              f"after the stem that the authors' network does not have: it cannot be "
                              f"{purpose} by this version, which computes the authors' network")
    if version == 1 and purpose == "resumed":
        raise CheckpointError(f"{path} was written in checkpoint format 1, whose random draws this "
                              f"version cannot continue exactly: it can be evaluated, not resumed")


def evaluate_file(args, device):
    """``--evaluate``: print the L-sample and mean-network results of a checkpoint."""
    ckpt = checkpoint.load(args.evaluate)
    note = ""
    if ckpt.get("format") == checkpoint.FORMAT:
        check_version(ckpt, args.evaluate, "evaluated")
        settings = dict(ckpt["config"])
        different = conflicts(args, settings, ("model", "dataset", "width", "K"))
        if different:
            raise CheckpointError(f"{args.evaluate} holds another network than the one asked "
                                  f"for: " + ", ".join(different))
        model, opt = build(settings, device)
        load_into(model, opt, ckpt, args.evaluate)
        source = f"epoch {ckpt['epoch']} of run {settings.get('save')}"
    elif "state_dict" in ckpt:
        try:
            K = released.rank_of(ckpt["state_dict"])
        except released.LayoutError as error:
            raise CheckpointError(f"{args.evaluate}: {error}") from None
        if "K" in args.given and args.K != K:
            raise CheckpointError(f"{args.evaluate} holds K={K} (the first dimension of its Z), "
                                  f"not the -K {args.K} asked for; leave -K out")
        settings = dict(vars(args), K=K)
        model, opt = build(settings, device)
        try:
            found = released.from_released(ckpt["state_dict"], model)
        except released.LayoutError as error:
            raise CheckpointError(f"{args.evaluate}: {error}") from None
        load_released(model, opt, found)
        source = f"released checkpoint, epoch {ckpt.get('epoch')}, best_prec1 {ckpt.get('best_prec1')}"
        if found.dropped:
            source += f"; its {len(found.dropped)} unused .sample tensors (zeros) were left out"
        if K == 0:
            note = ("The file has no Z (the 'without Z' layer): K=0, a deterministic network, so "
                    "every one of the L samples is sign(M) and both results are the same network's.\n")
    else:
        raise CheckpointError(f"{args.evaluate} is neither one of our checkpoints nor in the "
                              f"released layout (no 'state_dict' key; keys: {sorted(ckpt)[:8]})")
    del ckpt
    test_x, test_y = read_split(args.data_root, settings["dataset"], "test")
    batch_size = settings["eval_batch_size"]  # ours: the run's own, so results match its log
    test = DeviceLoader(test_x, test_y, batch_size, False, device,
                        torch.channels_last if device.type == "cuda" else torch.contiguous_format)
    seed_everything(args.seed if args.seed is not None else 0)
    val = evaluate(model, opt, test, args.L, device, args.bf16,
                   progress=progress_bars(sys.stderr.isatty()))
    mean = evaluate_mean(model, opt, test, device, args.bf16)
    print(f"Evaluated {args.evaluate} ({settings['model']}, {settings['dataset']}, K={settings['K']}; {source})")
    print(note + f"Test: loss {val['loss']:.4f}  Prec@1 {val['prec1']:.2f}  Prec@5 {val['prec5']:.2f}  "
          f"(L={args.L})  |  mean network Prec@1 {mean['prec1']:.2f}")
    return 0


# ---- the run folder ------------------------------------------------------------------------

def resolve_resume(args):
    """Turn ``--resume [PATH]`` into (checkpoint file, run name, results folder)."""
    target = args.resume or os.path.join(args.results_dir, args.save or "")
    if not args.resume and not args.save:
        raise UsageError("--resume without a path needs --save <run name> (or give the run folder)")
    path = os.path.join(target, "checkpoint.pth.tar") if os.path.isdir(target) else target
    folder = os.path.dirname(os.path.abspath(path))
    return path, os.path.basename(folder), os.path.dirname(folder)


def given_settings(argv):
    """The run settings typed on the command line, whatever their value: a default
    typed out counts too (``--resume run -K 8`` must not quietly resume a K=2 run)."""
    probe = build_parser()
    probe.set_defaults(**{key: None for key in RUN_SETTINGS})
    typed = vars(probe.parse_known_args(argv)[0])
    return {key for key in RUN_SETTINGS if typed[key] is not None}


def conflicts(args, saved, keys):
    """The settings among ``keys`` given on the command line with another value than
    the checkpoint's ``saved`` ones."""
    return [f"{key}={getattr(args, key)} (checkpoint: {saved[key]})" for key in keys
            if key in args.given and getattr(args, key) != saved[key]]


def check_same_run(args, saved):
    """A resumed run takes its settings from the checkpoint; a setting given on the
    command line with another value is an error, not a silent change of the run."""
    different = conflicts(args, saved, RUN_SETTINGS)
    if different:
        raise CheckpointError("the checkpoint belongs to another run: " + ", ".join(different) +
                              "; a resumed run keeps its settings (leave these options out)")
    for key in RUN_SETTINGS:
        setattr(args, key, saved[key])


def holds_run(run_dir):
    """A folder holds a run once a checkpoint is written: a start that failed before
    (a wrong path, a kill while starting) leaves nothing that must be kept."""
    return any(os.path.exists(os.path.join(run_dir, name)) for name in (CHECKPOINT, BEST))


def refuse_to_overwrite(args, run_dir):
    """Nothing is started over by accident; this check writes nothing."""
    if holds_run(run_dir) and args.resume is None and not args.overwrite:
        raise UsageError(f"{run_dir} already holds a run: continue it with --resume {run_dir}, "
                         f"start it over with --overwrite, or choose another --save")


def make_run_folder(args, run_dir, log_path):
    """Create the run folder (or take over an existing one): check that it can be
    written, remove what writes killed midway left (temporary files), and with
    ``--overwrite`` the previous run's files."""
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as error:
        raise UsageError(f"cannot write to {run_dir}: {error.strerror or error}") from None
    leftovers = [name for name in os.listdir(run_dir) if name.endswith(".tmp") and
                 (name == "metrics.csv.tmp" or name.startswith((f".{CHECKPOINT}.", f".{BEST}.")))]
    if args.overwrite and args.resume is None:
        leftovers += [name for name in (CHECKPOINT, BEST, "metrics.csv")
                      if os.path.exists(os.path.join(run_dir, name))]
        if os.path.exists(log_path):
            os.unlink(log_path)
    for name in leftovers:
        os.unlink(os.path.join(run_dir, name))


def write_csv(path, history):
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(history)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def without_momenta(optimizer_state):
    """The optimizer state a checkpoint for evaluation needs: the distribution, no momenta."""
    state = {index: {k: v for k, v in entry.items() if "momentum" not in k}
             for index, entry in optimizer_state["state"].items()}
    return {"state": state, "param_groups": optimizer_state["param_groups"]}


# ---- the run ---------------------------------------------------------------------------------

def train(args, device):
    ckpt = None
    if args.resume is not None:
        path, args.save, args.results_dir = resolve_resume(args)
        ckpt = checkpoint.load(path, map_location=device)
        if ckpt.get("format") != checkpoint.FORMAT:
            raise CheckpointError(f"{path} is not a checkpoint of this program; only our own "
                                  f"checkpoints can be resumed")
        check_version(ckpt, path, "resumed")
        check_same_run(args, ckpt["config"])
        if ckpt["epoch"] >= args.epochs:
            print(f"{path}: the run is finished; "
                  f"{best_line(ckpt['best_prec1'], ckpt['best_epoch'], args.epochs)}")
            return 0
    if args.seed is None:
        args.seed = int.from_bytes(os.urandom(4), "little")
    if args.save is None:
        args.save = f"{args.model}_{args.dataset}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = os.path.join(args.results_dir, args.save)
    log_path = run_dir + ".txt"
    refuse_to_overwrite(args, run_dir)
    settings = {key: getattr(args, key) for key in RUN_SETTINGS}
    settings["save"] = args.save

    # Everything that can fail on bad input fails before the first file is written.
    seed_everything(args.seed)
    images = read_cifar(args.data_root, args.dataset)
    model, opt = build(settings, device)
    train_loader, test_loader = loaders(settings, images, device, args.workers)
    steps = len(train_loader)
    lr_at = lambda it: learning_rate(it, args.lr, args.warmup_epochs * steps, args.epochs * steps,
                                     args.lr_decay)
    if ckpt is not None:
        load_into(model, opt, ckpt, path)
    make_run_folder(args, run_dir, log_path)

    if ckpt is not None:
        checkpoint.set_rng_states(ckpt["rng"], device)
        start, history = ckpt["epoch"], list(ckpt["history"])
        best_prec1, best_epoch = ckpt["best_prec1"], ckpt["best_epoch"]
        log = RunLog(log_path, args.epochs, offset=min(ckpt["log_offset"], _size(log_path)))
        log.set_best(best_prec1, best_epoch)
        log.write(f"Resumed from {path} at epoch {start}/{args.epochs}")
    else:
        start, history, best_prec1, best_epoch = 0, [], 0.0, 0
        log = RunLog(log_path, args.epochs)
        log.write(f"VISPA run {args.save}: {' '.join(sys.argv)}")
        log.write("Settings: " + ", ".join(f"{k}={settings[k]}" for k in RUN_SETTINGS))
        log.write(f"Device: {device}; {steps} training steps per epoch")

    def snapshot(epoch):
        return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": settings, "epoch": epoch,
                "model": model.state_dict(), "optimizer": opt.state_dict(),
                "best_prec1": best_prec1, "best_epoch": best_epoch, "history": history,
                "rng": checkpoint.rng_states(device), "log_offset": log.offset}

    ckpt_path = os.path.join(run_dir, CHECKPOINT)
    best_path = os.path.join(run_dir, BEST)
    if ckpt is None:
        checkpoint.save_atomic(snapshot(0), ckpt_path)  # a stop in epoch 1 can resume too
    elif best_epoch == start and start > 0:  # the stop may have come before model_best was written
        state = snapshot(start)
        checkpoint.save_atomic(dict(state, optimizer=without_momenta(state["optimizer"])), best_path)
    del ckpt

    write_csv(os.path.join(run_dir, "metrics.csv"), history)
    saver = checkpoint.BackgroundSaver()  # the per-epoch checkpoints are written while training goes on
    stop = StopRequest()
    progress = progress_bars(sys.stderr.isatty())
    try:
        for epoch in range(start + 1, args.epochs + 1):
            began = time.time()
            first_iteration = (epoch - 1) * steps
            trained = train_one_epoch(model, opt, train_loader, lr_at, first_iteration, device,
                                      args.bf16, stop, progress)
            val = None if trained is None else evaluate(model, opt, test_loader, args.L, device,
                                                        args.bf16, stop, progress)
            if stop.signum is not None:
                saver.wait()
                log.write(f"Stopped by {signal.Signals(stop.signum).name} during epoch {epoch}/{args.epochs}; "
                          f"the checkpoint of epoch {epoch - 1} is {ckpt_path}. Resume with: "
                          f"{resume_command(args, run_dir)}")
                return 128 + stop.signum
            mean = evaluate_mean(model, opt, test_loader, device, args.bf16)
            if not (math.isfinite(trained["loss"]) and math.isfinite(val["loss"])):
                saver.wait()
                message = (f"training diverged in epoch {epoch} (train loss {trained['loss']}, "
                           f"val loss {val['loss']}): stopped. The last good checkpoint (epoch "
                           f"{epoch - 1}) is {ckpt_path}; try a lower --lr")
                log.write(f"Stopped: {message}", echo=False)
                print(f"error: {message}", file=sys.stderr)
                return 3
            is_best = best_epoch == 0 or val["prec1"] > best_prec1
            if is_best:
                best_prec1, best_epoch = val["prec1"], epoch
            seconds = time.time() - began
            history.append({
                "epoch": epoch, "lr": f"{lr_at(epoch * steps - 1):.6f}",
                "train_loss": f"{trained['loss']:.4f}", "train_prec1": f"{trained['prec1']:.2f}",
                "train_prec5": f"{trained['prec5']:.2f}", "val_loss": f"{val['loss']:.4f}",
                "val_prec1": f"{val['prec1']:.2f}", "val_prec5": f"{val['prec5']:.2f}",
                "mean_prec1": f"{mean['prec1']:.2f}", "best_prec1": f"{best_prec1:.2f}",
                "best_epoch": best_epoch, "seconds": f"{seconds:.1f}"})
            row = history[-1]
            log.write(f"Epoch {epoch}/{args.epochs}  lr {row['lr']}  "
                      f"train loss {row['train_loss']} Prec@1 {row['train_prec1']} Prec@5 {row['train_prec5']}  |  "
                      f"val loss {row['val_loss']} Prec@1 {row['val_prec1']} Prec@5 {row['val_prec5']} (L={args.L})  |  "
                      f"mean-net Prec@1 {row['mean_prec1']}  |  best {row['best_prec1']} (epoch {best_epoch})  |  "
                      f"{row['seconds']} s")
            log.set_best(best_prec1, best_epoch)
            write_csv(os.path.join(run_dir, "metrics.csv"), history)
            state = snapshot(epoch)
            jobs = [(state, ckpt_path)]
            if is_best:
                jobs.append((dict(state, optimizer=without_momenta(state["optimizer"])), best_path))
            saver.submit(jobs)
        saver.wait()
        print(best_line(best_prec1, best_epoch, args.epochs))
        return 0
    finally:
        stop.restore()
        try:
            saver.wait()  # a checkpoint is complete (or its error raised) before the run ends
        finally:
            log.close()


def resume_command(args, run_dir):
    """The command line that continues this run (with the data and device it used)."""
    words = ["python", "main.py", "--resume", run_dir]
    if os.path.normpath(args.data_root) != os.path.normpath(build_parser().get_default("data_root")):
        words += ["--data_root", args.data_root]
    if args.gpus is not None:
        words += ["--gpus", args.gpus]
    return " ".join(shlex.quote(word) for word in words)


def _size(path):
    return os.path.getsize(path) if os.path.exists(path) else 0


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given = given_settings(argv)
    try:
        if args.demo:
            apply_demo(args)
        device = select_device(args.gpus)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True
        if args.evaluate:
            return evaluate_file(args, device)
        return train(args, device)
    except (UsageError, DatasetError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file the run writes: disk full, permissions, ...
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        print("error: interrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return 128 + signal.SIGINT


if __name__ == "__main__":
    sys.exit(main())
