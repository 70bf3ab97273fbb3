"""Train a binary network with VISPA, or evaluate one.

    python main.py --demo                              # twenty seconds, generated data, CPU
    python main.py --model resnet18 --dataset cifar100 --save my_run
    python main.py --recipe vgg16_1w32a_cifar10 --seed 2020 --save my_vgg
    python main.py --resume results/my_run             # continue a stopped run exactly
    python main.py --evaluate results/my_run/model_best.pth.tar

An epoch: ``engine.train_one_epoch``, then the L-sample evaluation and the
mean-network evaluation, one log line, one row of metrics.csv, one checkpoint.
The run's files are described in ``utils/run_dir.py``: the log is
``results/<save>.txt`` and ends with the best accuracy; checkpoints and
``metrics.csv`` are in ``results/<save>/``.

A kill at any moment loses at most the current epoch: checkpoints are replaced
atomically, and ``--resume`` continues from the last one exactly as if the run
had not stopped. Exit status: 0 done; 1 an error (one line on stderr, nothing
overwritten); 2 bad command line; 3 the training diverged (the checkpoint of the
last good epoch stays); 128 + signal number after SIGINT / SIGTERM (the log says
how to resume).
"""
import argparse
import hashlib
import math
import os
import random
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

import engine
from config import DEFAULT_RECIPE, RECIPES, Config, add_arguments, from_args, typed_settings
from data import DATASETS, DatasetError
from models import build_model, is_binary, packed, released
from optim import VISPA, learning_rate
from utils import checkpoint
from utils.checkpoint import CheckpointError
from utils.run_dir import (EXIT_DIVERGED, EXIT_ERROR, EXIT_OK, RunDir, RunInUse, epoch_line,
                           exit_stopped, run_dir_of)
from utils.runlog import RunLog, best_line


class UsageError(Exception):
    """A request this run cannot carry out; the message says what to do instead."""


# ---- command line ------------------------------------------------------------------------

def build_parser(defaults=RECIPES[DEFAULT_RECIPE]):
    p = argparse.ArgumentParser(
        description="Train binary networks on CIFAR with VISPA: Gaussian variational inference over "
                    "the binary weights with a rank-K covariance factor. The defaults are the paper's "
                    "recipe (ResNet18, CIFAR-100, 1W32A).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from one of the authors' configurations (options given too override it)")
    add_arguments(p, defaults)
    a = p.add_argument
    a("--data_root", default="./datasets", help="folder holding cifar-100-python/ or cifar-10-batches-py/")
    a("--gpus", default=None, help="CUDA device index, or 'cpu' (default: GPU 0 if there is one)")
    a("--save", default=None, help="run name: log results/<save>.txt, checkpoints results/<save>/ "
      "(default: <model>_<dataset>_<date>)")
    a("--results_dir", default="./results")
    a("-e", "--evaluate", metavar="FILE", default=None,
      help="evaluate a checkpoint on the test set (ours, or the authors' released layout with "
           "--model/--dataset naming the network; K is read from the file), or an exported network "
           "(.bnn), and exit")
    a("--export", metavar="FILE", default=None,
      help="export the mean network sign(M) of a checkpoint (ours, or the authors' with --model/--dataset) "
           "to --out: binary weights packed 8 per byte, the rest float32; then exit")
    a("--out", metavar="FILE", default=None, help="where --export writes the network (e.g. model.bnn)")
    a("--resume", nargs="?", const="", default=None, metavar="PATH",
      help="continue a run from its latest checkpoint: the run folder, its checkpoint.pth.tar, or "
           "nothing for the folder of --save")
    a("--rewind", action="store_true",
      help="with --resume FILE: go back to the epoch of FILE (the run's model_best.pth.tar, say), "
           "discarding the run's later epochs")
    a("--fork", action="store_true",
      help="with --resume FILE --save NAME: start the new run NAME from the state in FILE, with its "
           "settings except those given; nothing outside NAME's own files is written")
    a("--overwrite", action="store_true", help="start over in a --save folder that already holds a run")
    a("--demo", action="store_true",
      help="a twenty-second run of the whole pipeline on a small generated dataset, on the CPU")
    return p


def parse_args(argv):
    """(options, the run config they describe, the names of the settings typed out)."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    chosen = recipe.parse_known_args(argv)[0].recipe
    args = build_parser(RECIPES[chosen or DEFAULT_RECIPE]).parse_args(argv)
    return args, from_args(args), typed_settings(argv)


def check_combinations(args, typed):
    """Options that contradict each other are refused before anything is read or written."""
    if args.evaluate is not None and args.resume is not None:
        raise UsageError("--evaluate and --resume exclude each other: evaluate a checkpoint, or resume a run")
    if (args.export is None) != (args.out is None):
        raise UsageError("--export FILE and --out FILE go together: the checkpoint, and where its network goes")
    if args.export is not None and (args.evaluate is not None or args.resume is not None):
        raise UsageError("--export excludes --evaluate and --resume: export a checkpoint, then evaluate the file")
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start it over")
    if args.resume is not None and args.recipe is not None:
        raise UsageError("a resumed run keeps the settings of its checkpoint: leave --recipe out")
    if args.save is not None and (not args.save.strip(". ") or "/" in args.save or args.save.startswith(".")):
        raise UsageError(f"--save takes a run name (a folder name in --results_dir, without '/' and not "
                         f"starting with '.'), got {args.save!r}")
    if (args.rewind or args.fork) and not args.resume:
        raise UsageError("--rewind and --fork go with --resume FILE, the checkpoint to start from")
    if args.rewind and args.fork:
        raise UsageError("--rewind and --fork exclude each other: go back in the same run, or start a new one")
    if args.fork and args.save is None:
        raise UsageError("--fork needs --save NAME, the name of the new run")


DEMO = Config(model="resnet18", dataset="cifar10", width=8, epochs=6, batch_size=64,
              eval_batch_size=500, lr=0.1, warmup_epochs=1, K=4, L=4, seed=0)


def demo(args):
    """A small setting that trains in twenty seconds on a CPU, on a generated dataset
    in the CIFAR-10 format (written once into the results folder)."""
    from data.synthetic import write_structured_cifar
    args.gpus, args.save, args.overwrite = "cpu", "demo", True
    args.data_root = os.path.join(args.results_dir, "demo_data")
    if not os.path.isdir(os.path.join(args.data_root, "cifar-10-batches-py")):
        write_structured_cifar(args.data_root, "cifar10", num_train=2000, num_test=500, seed=0)
    return DEMO


# ---- devices, seeds, the network -----------------------------------------------------------

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


def draws_seed(seed):
    """The seed of VISPA's generator of draws: made from the run seed, but another
    stream than the one that initialises the network and shuffles the data."""
    return int.from_bytes(hashlib.sha256(f"vispa-draws:{seed}".encode()).digest()[:8], "little") >> 2


def memory_format(device):
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def build(cfg, device):
    """The network and its optimizer for a run config."""
    model = build_model(cfg.model, cfg.num_classes, cfg.width, cfg.image_size)
    model = model.to(device, memory_format=memory_format(device))
    opt = VISPA(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, K=cfg.K,
                S=cfg.scale, projection=None if cfg.projection == "none" else cfg.projection,
                seed=draws_seed(cfg.seed if cfg.seed is not None else 0))
    return model, opt


def loader(cfg, images, labels, train, device):
    """Training or test batches, from the device-resident loader or torchvision's."""
    dataset = DATASETS[cfg.dataset]
    batch_size = cfg.batch_size if train else cfg.eval_batch_size
    if cfg.loader == "torchvision":
        return dataset.reference_loader(images, labels, batch_size, train, cfg.workers)
    return dataset.loader(images, labels, batch_size, train, device, memory_format(device))


# ---- checkpoints -----------------------------------------------------------------------------

def load_ours(model, opt, ckpt, path):
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


def saved_config(ckpt, path, purpose):
    """The Config of one of our checkpoints. Format 1 files hold a ResNet18 trained with
    a ReLU after the stem, which the authors' network (and this one, now) does not have:
    refused. VGG16 files of format 1 compute the same function and may be evaluated, but
    their draws came from another generator: they cannot be resumed exactly."""
    version = ckpt.get("version", 1)
    if not isinstance(version, int):
        raise CheckpointError(f"{path}: its format version {version!r} is not a number")
    require(ckpt, path, ("config",))
    if version > checkpoint.VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this program "
                              f"(checkpoint format {version}; this one reads up to {checkpoint.VERSION})")
    if not isinstance(ckpt["config"], dict):
        raise CheckpointError(f"{path}: its settings are not a dict")
    settings = dict(ckpt["config"])
    if version == 1:
        settings.pop("save", None)
        if settings.get("model") == "resnet18":
            raise CheckpointError(f"{path} holds a ResNet18 of checkpoint format 1, trained with a ReLU "
                                  f"after the stem that the authors' network does not have: it cannot be "
                                  f"{purpose} by this version, which computes the authors' network")
        if purpose == "resumed":
            raise CheckpointError(f"{path} was written in checkpoint format 1, whose random draws this "
                                  f"version cannot continue exactly: it can be evaluated, not resumed")
    try:
        return Config.from_dict(settings)
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its settings cannot be read: {error}") from None


def conflicts(cfg, saved, typed, keys):
    """The settings among ``keys`` typed on the command line with another value than
    the checkpoint's."""
    return [f"{key}={getattr(cfg, key)} (checkpoint: {getattr(saved, key)})" for key in keys
            if key in typed and getattr(cfg, key) != getattr(saved, key)]


def without_momenta(optimizer_state):
    """The optimizer state a checkpoint for evaluation needs: the distribution, no momenta."""
    state = {index: {k: v for k, v in entry.items() if "momentum" not in k}
             for index, entry in optimizer_state["state"].items()}
    return dict(optimizer_state, state=state)


# ---- evaluating a file -------------------------------------------------------------------------

def load_network(path, cfg, typed, device):
    """The network and its distribution in a file of ours or of the authors' (any of
    their layouts): (model, VISPA, the config it was trained with, where it comes from,
    a note for the reader)."""
    ckpt = checkpoint.load(path)
    note = ""
    if ckpt.get("format") == checkpoint.FORMAT:
        saved = saved_config(ckpt, path, "evaluated")
        require(ckpt, path, ("epoch", "model", "optimizer"))
        different = conflicts(cfg, saved, typed, ("model", "dataset", "width", "K"))
        if different:
            raise CheckpointError(f"{path} holds another network than the one asked for: " +
                                  ", ".join(different))
        model, opt = build(saved, device)
        load_ours(model, opt, ckpt, path)
        source = f"epoch {ckpt['epoch']} of run {ckpt.get('run', ckpt['config'].get('save'))}"
        return model, opt, replace(saved, L=cfg.L, bf16=cfg.bf16), source, note
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is neither one of our checkpoints nor in the released layout "
                              f"(no 'state_dict' key; keys: {sorted(ckpt)[:8]})")
    try:
        K = released.rank_of(ckpt["state_dict"])
    except released.LayoutError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if "K" in typed and cfg.K != K:
        raise CheckpointError(f"{path} holds K={K} (the first dimension of its Z), not the -K {cfg.K} "
                              f"asked for; leave -K out")
    cfg = replace(cfg, K=K)
    model, opt = build(cfg, device)
    try:
        found = released.from_released(ckpt["state_dict"], model)
    except released.LayoutError as error:
        raise CheckpointError(f"{path}: {error}") from None
    load_released(model, opt, found)
    source = f"released checkpoint, epoch {ckpt.get('epoch')}, best_prec1 {ckpt.get('best_prec1')}"
    if found.dropped:
        source += f"; its {len(found.dropped)} unused .sample tensors (zeros) were left out"
    if K == 0:
        note = ("The file has no Z (the 'without Z' layer): K=0, a deterministic network, so "
                "every one of the L samples is sign(M) and both results are the same network's.\n")
    return model, opt, cfg, source, note


def test_batches(cfg, data_root, device):
    images, labels = DATASETS[cfg.dataset].read(data_root, "test")
    return loader(replace(cfg, loader="device"), images, labels, False, device)


def evaluate_file(args, cfg, typed, device):
    """``--evaluate``: print the L-sample and mean-network results of a checkpoint, or the
    results of an exported network."""
    if packed_file(args.evaluate):
        return evaluate_packed(args, cfg, typed, device)
    model, opt, cfg, source, note = load_network(args.evaluate, cfg, typed, device)
    test = test_batches(cfg, args.data_root, device)
    val = engine.evaluate(model, opt, progress(test, f"eval L={cfg.L}"), cfg.L, cfg.bf16)
    mean = engine.evaluate_mean(model, opt, test, cfg.bf16)
    print(f"Evaluated {args.evaluate} ({cfg.model}, {cfg.dataset}, K={cfg.K}; {source})")
    print(note + f"Test: loss {val['loss']:.4f}  Prec@1 {val['prec1']:.2f}  Prec@5 {val['prec5']:.2f}  "
          f"(L={cfg.L})  |  mean network Prec@1 {mean['prec1']:.2f}")
    return EXIT_OK


# ---- the exported network --------------------------------------------------------------------

def packed_file(path):
    """Whether ``path`` is meant as an exported network (by its content, or its name)."""
    if path.endswith(".bnn"):
        return True
    try:
        return checkpoint_field(path, "format") == checkpoint.PACKED
    except Exception:
        return False


def checkpoint_field(path, key):
    """One plain value of a file, read without loading its tensors."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)


def export_file(args, cfg, typed, device):
    """``--export FILE --out OUT``: the mean network sign(M) of a checkpoint, packed."""
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists: choose another --out, or add --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {args.out}: the folder {folder} does not exist")
    model, opt, cfg, source, _ = load_network(args.export, cfg, typed, torch.device("cpu"))
    means = {name: opt.state[p]["M"] for name, p in model.named_parameters() if is_binary(p)}
    dataset = DATASETS[cfg.dataset]
    exported = packed.pack(model, means, cfg.model, cfg.width, cfg.num_classes, cfg.image_size, cfg.dataset,
                           dataset.mean, dataset.std, f"{args.export} ({source})")
    checkpoint.save_atomic(exported, args.out)
    size = os.path.getsize(args.out)
    full = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())
    bits = sum(p.numel() for p in means.values())
    print(f"Exported the mean network sign(M) of {args.export} ({cfg.model}, {cfg.dataset}; {source}) to "
          f"{args.out}: {size / 1e6:.2f} MB, 1/{full / size:.1f} of its float32 state_dict ({full / 1e6:.1f} MB); "
          f"{bits / 1e6:.2f} M binary weights in {bits / 8e6:.2f} MB of bits")
    return EXIT_OK


def evaluate_packed(args, cfg, typed, device):
    """``--evaluate OUT.bnn``: the exported network's loss and accuracy on the test set."""
    try:
        content = packed.read_packed(args.evaluate)
        model = packed.network_of(content, device)
    except packed.PackedError as error:
        raise CheckpointError(str(error)) from None
    if "dataset" in typed and cfg.dataset != content["dataset"]:
        raise CheckpointError(f"{args.evaluate} is a network for {content['dataset']}, not --dataset {cfg.dataset}")
    cfg = Config(model=content["model"], dataset=content["dataset"], width=content["width"])
    result = engine.evaluate_deterministic(model, test_batches(cfg, args.data_root, device))
    print(f"Evaluated {args.evaluate} ({cfg.model}, {cfg.dataset}; the exported network sign(M) of "
          f"{content.get('source')})")
    print(f"Test: loss {result['loss']:.4f}  Prec@1 {result['prec1']:.2f}  Prec@5 {result['prec5']:.2f}  "
          f"(the mean network sign(M))")
    return EXIT_OK


# ---- training ----------------------------------------------------------------------------------

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

    def watch(self, batches, description):
        """The batches with a progress bar, ending early once a stop is requested."""
        for batch in progress(batches, description):
            if self.signum is not None:
                return
            yield batch


def progress(batches, description):
    return tqdm(batches, desc=description, leave=False, dynamic_ncols=True, disable=not sys.stderr.isatty())


def resume_target(args):
    """The checkpoint file and run folder of ``--resume [PATH]``."""
    if not args.resume and not args.save:
        raise UsageError("--resume without a path needs --save <run name> (or give the run folder)")
    target = args.resume or os.path.join(args.results_dir, args.save)
    if args.fork:
        return target, RunDir(args.results_dir, args.save)
    run = run_dir_of(target)
    if args.save is not None and args.resume and args.save != run.name:
        raise UsageError(f"--resume {args.resume} continues the run {run.name!r}, not --save {args.save!r} "
                         f"(to start a new run from it, add --fork)")
    return (run.checkpoint if os.path.isdir(target) else target), run


def check_continuation(args, resumed, path, run):
    """Resume only from the run's own latest checkpoint. Another file (an earlier epoch,
    model_best, a copy kept elsewhere) would silently throw epochs away or write beside
    the copy: refused, unless --rewind or --fork says what is meant."""
    if args.fork:
        if run.holds_run():
            raise UsageError(f"{run.folder} already holds a run: --fork starts a new run; choose another --save")
        return
    owner = resumed.get("run")
    if owner != run.name:
        raise CheckpointError(f"{path} is a checkpoint of the run {owner!r}, kept in the folder {run.name!r}: a "
                              f"copy or a renamed folder, whose log would be {run.log}. To go on from it, start "
                              f"a new run with --fork --save NAME")
    if os.path.abspath(path) == os.path.abspath(run.checkpoint) or args.rewind:
        return
    latest = checkpoint_epoch(run.checkpoint)
    later = f"its checkpoint.pth.tar is at epoch {latest}" if latest is not None else "it has no checkpoint.pth.tar"
    raise CheckpointError(f"{path} is not the latest checkpoint of the run {run.name!r} (it is at epoch "
                          f"{resumed['epoch']}; {later}): resuming from it would discard what came after. "
                          f"Add --rewind to go back to it, or --fork --save NAME to start a new run from it")


def checkpoint_epoch(path):
    """The epoch a checkpoint file records, read without loading its tensors (None if unreadable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


def resume_command(args, run):
    """The command line that continues this run (with the data and device it used)."""
    words = ["python", "main.py", "--resume", run.folder]
    if os.path.normpath(args.data_root) != os.path.normpath(build_parser().get_default("data_root")):
        words += ["--data_root", args.data_root]
    if args.gpus is not None:
        words += ["--gpus", args.gpus]
    return " ".join(shlex.quote(word) for word in words)


@dataclass
class Progress:
    """What a run has reached: one row of metrics per finished epoch, and its best epoch."""
    history: list = field(default_factory=list)
    best_prec1: float = 0.0
    best_epoch: int = 0

    def record(self, epoch, lr, trained, val, mean, seconds) -> bool:
        """Add the epoch's row; True if its L-sample top-1 is the best so far."""
        is_best = self.best_epoch == 0 or val["prec1"] > self.best_prec1
        if is_best:
            self.best_prec1, self.best_epoch = val["prec1"], epoch
        self.history.append({
            "epoch": epoch, "lr": lr, "train_loss": trained["loss"], "train_prec1": trained["prec1"],
            "train_prec5": trained["prec5"], "val_loss": val["loss"], "val_prec1": val["prec1"],
            "val_prec5": val["prec5"], "mean_prec1": mean["prec1"], "best_prec1": self.best_prec1,
            "best_epoch": self.best_epoch, "seconds": seconds})
        return is_best


def open_run(args, cfg, typed, device):
    """The run to train: (its config, its folder, the checkpoint it continues from and
    that file's path, or None, None for a new run). Refuses what would lose a run."""
    if args.resume is None:
        if cfg.seed is None:
            cfg = replace(cfg, seed=int.from_bytes(os.urandom(4), "little"))
        run = RunDir(args.results_dir, args.save or f"{cfg.model}_{cfg.dataset}_{time.strftime('%Y%m%d-%H%M%S')}")
        refuse_to_start_over(args, run)
        return cfg, run, None, None
    path, run = resume_target(args)
    resumed = checkpoint.load(path, map_location=device)
    if resumed.get("format") != checkpoint.FORMAT:
        raise CheckpointError(f"{path} is not a checkpoint of this program; only our own "
                              f"checkpoints can be resumed")
    saved = saved_config(resumed, path, "resumed")
    require(resumed, path, RESUME_KEYS)
    check_continuation(args, resumed, path, run)
    if args.fork:  # a new run: the settings given change those of the file
        return replace(saved, **{key: getattr(cfg, key) for key in typed}), run, resumed, path
    different = conflicts(cfg, saved, typed, sorted(typed))
    if different:
        raise CheckpointError("the checkpoint belongs to another run: " + ", ".join(different) +
                              "; a resumed run keeps its settings (leave these options out)")
    return saved, run, resumed, path


def refuse_to_start_over(args, run):
    if run.holds_run() and not args.overwrite:
        raise UsageError(f"{run.folder} already holds a run: continue it with --resume {run.folder}, "
                         f"start it over with --overwrite, or choose another --save")


RESUME_KEYS = ("config", "run", "epoch", "model", "optimizer", "best_prec1", "best_epoch", "history",
               "rng", "log_offset")


def require(ckpt, path, keys):
    """CheckpointError naming what a checkpoint of ours lacks (a damaged or hand-made file)."""
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint of this program: it has no "
                              f"{', '.join(repr(k) for k in missing)}")


def open_log(run, cfg, resumed, path, device, steps):
    """The run's log and Progress: new, or cut back to where the checkpoint was written."""
    if resumed is None:
        log = RunLog(run.log, cfg.epochs)
        log.write(f"VISPA run {run.name}: {' '.join(sys.argv)}")
        log.write("Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
        log.write(f"Device: {device}; {steps} training steps per epoch")
        return log, Progress()
    progress = Progress(list(resumed["history"]), resumed["best_prec1"], resumed["best_epoch"])
    if resumed.get("run") != run.name:  # --fork: a new log
        log = RunLog(run.log, cfg.epochs)
        log.write(f"VISPA run {run.name}: {' '.join(sys.argv)}")
        how = f"Forked from {path} (run {resumed.get('run')}) at epoch {resumed['epoch']}/{cfg.epochs}"
    else:
        log_size = os.path.getsize(run.log) if os.path.exists(run.log) else 0
        log = RunLog(run.log, cfg.epochs, offset=min(resumed["log_offset"], log_size))
        how = (f"Resumed from {path} at epoch {resumed['epoch']}/{cfg.epochs}"
               if os.path.abspath(path) == run.checkpoint else
               f"Rewound to epoch {resumed['epoch']}/{cfg.epochs} from {path}")
    if resumed["epoch"] > 0 and not has_momenta(resumed["optimizer"]):
        how += " (it holds no momenta: they start again from zero)"
    log.set_best(progress.best_prec1, progress.best_epoch)
    log.write(how)
    return log, progress


def has_momenta(optimizer_state):
    return any("M_momentum" in entry for entry in optimizer_state["state"].values())


def check_sizes(cfg, train_labels, test_labels, root):
    """What would fail only once the run is under way (an empty split, a training set
    smaller than two images) fails here, before anything is written."""
    if len(train_labels) < 2:
        raise DatasetError(f"the training set of {cfg.dataset} in {root} has {len(train_labels)} "
                           f"image{'s' if len(train_labels) != 1 else ''}: BatchNorm needs batches of at least "
                           f"2 (download the dataset again?)")
    if len(test_labels) == 0:
        raise DatasetError(f"the test set of {cfg.dataset} in {root} has no images (download the dataset again?)")


def train(args, cfg, typed, device):
    cfg, run, resumed, path = open_run(args, cfg, typed, device)
    if resumed is not None and resumed["epoch"] >= cfg.epochs:
        print(f"{path}: the run is finished; "
              f"{best_line(resumed['best_prec1'], resumed['best_epoch'], cfg.epochs)}")
        return EXIT_OK

    # Everything that can fail on bad input fails before the first file is written.
    seed_everything(cfg.seed)
    dataset = DATASETS[cfg.dataset]
    train_images, train_labels = dataset.read(args.data_root, "train")
    test_images, test_labels = dataset.read(args.data_root, "test")
    check_sizes(cfg, train_labels, test_labels, args.data_root)
    train_batches = loader(cfg, train_images, train_labels, True, device)
    test_batches = loader(cfg, test_images, test_labels, False, device)
    model, opt = build(cfg, device)
    if resumed is not None:
        load_ours(model, opt, resumed, path)
    steps = len(train_batches)
    lr_at = lambda it: learning_rate(it, cfg.lr, cfg.warmup_epochs * steps, cfg.epochs * steps, cfg.lr_decay)
    try:
        run.lock()  # held until the process ends: a second writer of this run is refused
        if resumed is None:
            refuse_to_start_over(args, run)  # again, now that no one else can start it
        run.prepare(start_over=args.overwrite and resumed is None)
    except OSError as error:
        raise UsageError(f"cannot write to {run.folder}: {error.strerror or error}") from None

    if resumed is not None:
        checkpoint.set_rng_states(resumed["rng"], device)
    start = 0 if resumed is None else resumed["epoch"]
    log, progress = open_log(run, cfg, resumed, path, device, steps)
    run.write_config(cfg.to_dict())

    def snapshot(epoch, best=False):
        """The checkpoint of the moment: everything the run needs to go on (model_best:
        the distribution without its momenta)."""
        optimizer = opt.state_dict()
        return {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": cfg.to_dict(),
                "run": run.name, "epoch": epoch, "model": model.state_dict(),
                "optimizer": without_momenta(optimizer) if best else optimizer,
                "best_prec1": progress.best_prec1, "best_epoch": progress.best_epoch,
                "history": progress.history, "rng": checkpoint.rng_states(device), "log_offset": log.offset}

    if resumed is None or os.path.abspath(path) != run.checkpoint:  # new, forked or rewound:
        checkpoint.save_atomic(snapshot(start), run.checkpoint)    # this is the run's latest state
    if progress.best_epoch == start > 0:  # the stop may have come before model_best was written
        checkpoint.save_atomic(snapshot(start, best=True), run.best)
    del resumed
    run.write_metrics(progress.history)

    saver = checkpoint.BackgroundSaver()  # the per-epoch checkpoints are written while training goes on
    stop = StopRequest()
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            began = time.time()
            trained = engine.train_one_epoch(model, opt, stop.watch(train_batches, "train"), lr_at,
                                             (epoch - 1) * steps, cfg.bf16)
            val = engine.evaluate(model, opt, stop.watch(test_batches, f"eval L={cfg.L}"), cfg.L, cfg.bf16)
            if stop.signum is not None:
                saver.wait()
                log.write(f"Stopped by {signal.Signals(stop.signum).name} during epoch {epoch}/{cfg.epochs}; "
                          f"the checkpoint of epoch {epoch - 1} is {run.checkpoint}. Resume with: "
                          f"{resume_command(args, run)}")
                return exit_stopped(stop.signum)
            mean = engine.evaluate_mean(model, opt, test_batches, cfg.bf16)
            saver.wait()  # the last epoch's checkpoint is on disk (or its failure raised) before this one is logged
            diverged = diverged_because(trained, val, model, opt)
            if diverged:
                message = (f"training diverged in epoch {epoch} ({diverged}): stopped. The last good checkpoint "
                           f"(epoch {epoch - 1}) is {run.checkpoint}; try a lower --lr or another --scale")
                log.write(f"Stopped: {message}", echo=False)
                print(f"error: {message}", file=sys.stderr)
                return EXIT_DIVERGED
            is_best = progress.record(epoch, lr_at(epoch * steps - 1), trained, val, mean, time.time() - began)
            log.write(epoch_line(progress.history[-1], cfg.epochs, cfg.L))
            log.set_best(progress.best_prec1, progress.best_epoch)
            run.write_metrics(progress.history)
            saver.submit([(snapshot(epoch), run.checkpoint)] + [(snapshot(epoch, best=True), run.best)] * is_best)
        saver.wait()
        print(best_line(progress.best_prec1, progress.best_epoch, cfg.epochs))
        return EXIT_OK
    except CheckpointError as error:  # a checkpoint could not be written: the log and metrics go back to the last one
        back_to_last_checkpoint(run, log, progress)
        log.write(f"Stopped: {error}", echo=False)
        raise
    finally:
        stop.restore()
        try:
            saver.wait()  # a checkpoint is complete (or its error raised) before the run ends
        finally:
            log.close()


def diverged_because(trained, val, model, opt):
    """Why the run cannot go on (a non-finite loss, or non-finite values in the network
    or in VISPA's state), or None."""
    if not (math.isfinite(trained["loss"]) and math.isfinite(val["loss"])):
        return f"train loss {trained['loss']}, val loss {val['loss']}"
    if not engine.state_is_finite(model, opt):
        return "non-finite values in the network or in VISPA's M, Z or momenta"
    return None


def back_to_last_checkpoint(run, log, progress):
    """After a failed checkpoint write: metrics.csv and the log's best line say what the
    checkpoint on disk holds, so that nothing claims epochs a resume would not find."""
    kept = checkpoint_epoch(run.checkpoint) or 0
    del progress.history[kept:]
    last = progress.history[-1] if progress.history else {"best_prec1": 0.0, "best_epoch": 0}
    progress.best_prec1, progress.best_epoch = last["best_prec1"], last["best_epoch"]
    log.set_best(progress.best_prec1, progress.best_epoch)
    try:
        run.write_metrics(progress.history)
    except OSError:
        pass  # the disk that refused the checkpoint may refuse this too; the error says so


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, cfg, typed = parse_args(argv)
    try:
        check_combinations(args, typed)
        if args.demo:
            cfg = demo(args)
        device = select_device(args.gpus)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True
        if args.evaluate:
            return evaluate_file(args, cfg, typed, device)
        if args.export:
            return export_file(args, cfg, typed, device)
        return train(args, cfg, typed, device)
    except (UsageError, DatasetError, CheckpointError, RunInUse) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # a file the run writes: disk full, permissions, ...
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        print("error: interrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return exit_stopped(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
