"""A training run of main.py: open it (new, resumed, rewound or forked), train it epoch by
epoch, keep its files. main.py parses the command line and calls ``train``.

An epoch: ``engine.train_one_epoch``, then the L-sample evaluation and the
mean-network evaluation, one log line, one row of metrics.csv, one checkpoint
(``utils/run_dir.py`` describes the files). Everything that can fail on bad input
fails before the first file is written; a kill at any moment loses at most the
current epoch.

With torchrun every rank runs this same program on its shard of the data (its own
weight samples, its own batches); the ranks average their gradients at every step
(engine.Ranks), agree on when to stop, and rank 0 alone writes. A checkpoint holds
every rank's random state, so a resumed run goes on as the uninterrupted one.
"""
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field, replace

import torch

import engine
from config import IMAGENET_RANKS, Config
from data import DATASETS, DatasetError
from models import build_model
from optim import VISPA, learning_rate
from utils import checkpoint, distributed, seeds, threads
from utils.checkpoint import CheckpointError
from utils.run_dir import EXIT_DIVERGED, EXIT_OK, RunDir, RunInUse, epoch_line, exit_stopped, run_dir_of
from utils.progress import progress
from utils.runlog import RunLog, best_line

STOP_CHECK_EVERY = 10  # steps between the ranks' agreements on a stop (one all-reduce each)


class UsageError(Exception):
    """A request this run cannot carry out; the message says what to do instead."""


# ---- the network, its data --------------------------------------------------------------------

def memory_format(device):
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def build(cfg, device):
    """The network and its optimizer for a run config. The optimizer's own generator
    draws the evaluation's samples (``evaluation_draws`` seeds it); training draws come
    from the generators of engine.Ranks."""
    model = build_model(cfg.model, cfg.num_classes, cfg.width, cfg.image_size)
    model = model.to(device, memory_format=memory_format(device))
    opt = VISPA(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.wd, K=cfg.K,
                S=cfg.scale, projection=None if cfg.projection == "none" else cfg.projection, seed=0)
    return model, opt


def evaluation_draws(opt, cfg, epoch, rank):
    """Seed the draws of the L-sample evaluation after ``epoch`` on ``rank`` from the run's
    seed: ``--evaluate`` of that epoch's checkpoint draws the same networks, and so gives
    the number the log gives (with the run's test batch size, ranks and device type)."""
    opt.generator.manual_seed(seeds.derived_seed(cfg.seed or 0, "evaluation draws", epoch, rank))


def loader(cfg, images, labels, train, device, shards=(0,), world=1):
    """Training or test batches of the ``shards`` among ``world``, from the device-resident
    loader or torchvision's (one process only)."""
    dataset = DATASETS[cfg.dataset]
    batch_size = cfg.batch_size if train else cfg.eval_batch_size
    if cfg.loader == "torchvision":
        return dataset.reference_loader(images, labels, batch_size, train, cfg.workers)
    return dataset.loader(images, labels, batch_size, train, device, memory_format(device), shards, world,
                          cfg.seed or 0)


def batches(cfg, data_root, device, world, shards):
    """(training batches of this process's ``shards``, its test batches): from the dataset
    held on the device, or read from its files (ImageNet). DatasetError before anything is
    written if the data cannot serve the run."""
    dataset = DATASETS[cfg.dataset]
    if dataset.folder_loaders is None:
        train_images, train_labels = dataset.read(data_root, "train")
        test_images, test_labels = dataset.read(data_root, "test")
        check_sizes(cfg, train_labels, test_labels, data_root, world)
        return (loader(cfg, train_images, train_labels, True, device, shards, world.size * cfg.virtual_ranks),
                loader(cfg, test_images, test_labels, False, device, [world.rank], world.size))
    backend, decoder = folder_backend(cfg)
    made = [dataset.folder_loaders(data_root, cfg.batch_size, cfg.workers, device, g, world.size * cfg.virtual_ranks,
                                   backend, decoder, cfg.seed or 0, memory_format(device), cfg.eval_batch_size)
            for g in shards]
    if cfg.virtual_ranks == 1:
        return made[0][0], made[0][1]
    test = dataset.folder_loaders(data_root, cfg.batch_size, cfg.workers, device, world.rank, world.size, backend,
                                  decoder, cfg.seed or 0, memory_format(device), cfg.eval_batch_size)[1]
    return Interleaved([m[0] for m in made]), test


def test_batches(cfg, data_root, device, world):
    """The test batches of this rank (all of them on one process), for an evaluation."""
    dataset = DATASETS[cfg.dataset]
    if dataset.folder_loaders is None:
        images, labels = dataset.read(data_root, "test")
        if len(labels) == 0:
            raise DatasetError(f"the test set of {cfg.dataset} in {data_root} has no images")
        return loader(replace(cfg, loader="device"), images, labels, False, device, [world.rank], world.size)
    backend, decoder = folder_backend(replace(cfg, loader="torchvision" if cfg.loader == "device" else cfg.loader,
                                              virtual_ranks=1))
    return dataset.folder_loaders(data_root, cfg.eval_batch_size, cfg.workers, device, world.rank, world.size,
                                  backend, decoder, cfg.seed or 0, memory_format(device))[1]


def folder_backend(cfg):
    """(backend, decoder) of the --loader of a dataset read from its files."""
    if cfg.loader == "device":
        raise UsageError(f"{cfg.dataset} is read from its files, batch by batch: --loader torchvision, "
                         f"dali-gpu or dali-cpu")
    if cfg.loader.startswith("dali") and cfg.virtual_ranks > 1:
        raise UsageError("--virtual-ranks reads every rank's shard with a loader of its own: use --loader "
                         "torchvision, or torchrun with one GPU per rank")
    return ("dali", cfg.loader[len("dali-"):]) if cfg.loader.startswith("dali") else ("torchvision", "cpu")


class Interleaved:
    """The batches of several loaders in turn, step by step: the virtual ranks of one
    process, each with its shard of a dataset read from its files."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self):
        for step in zip(*self.loaders):
            yield from step

    def state_dict(self):
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, states):
        for loader, state in zip(self.loaders, states):
            loader.load_state_dict(state)


def scaled_lr_note(cfg, world):
    """What --scale-lr made of --lr, and whether the run has the ranks of the authors'
    ImageNet runs (with fewer, it takes fewer samples per step and a smaller peak lr)."""
    ranks = world.size * cfg.virtual_ranks
    note = f"Peak lr {peak_lr(cfg, world):g} = lr {cfg.lr:g} x batch {cfg.batch_size} x {ranks} rank(s) / 256"
    if cfg.dataset == "imagenet" and ranks != IMAGENET_RANKS:
        note += (f"; the authors' ImageNet runs have {IMAGENET_RANKS} (torchrun --nproc_per_node "
                 f"{IMAGENET_RANKS}; on fewer GPUs, --virtual-ranks makes up the {IMAGENET_RANKS})")
    return note


def peak_lr(cfg, world):
    """--lr, or with --scale-lr (the authors' ImageNet program) --lr x batch x ranks / 256."""
    ranks = world.size * cfg.virtual_ranks
    return cfg.lr * cfg.batch_size * ranks / 256 if cfg.scale_lr else cfg.lr


# ---- checkpoints of this program --------------------------------------------------------------

RESUME_KEYS = ("config", "run", "epoch", "model", "optimizer", "best_prec1", "best_epoch", "history",
               "ranks", "log_offset")


def require(ckpt, path, keys):
    """CheckpointError naming what a checkpoint of ours lacks (a damaged or hand-made file)."""
    missing = [key for key in keys if key not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint of this program: it has no "
                              f"{', '.join(repr(k) for k in missing)}")


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


def load_ours(model, opt, ckpt, path):
    """Fill the network and the distribution from one of our checkpoints, strictly."""
    try:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} does not fit this network: {error}") from None


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


def has_momenta(optimizer_state):
    return any("M_momentum" in entry for entry in optimizer_state["state"].values())


def checkpoint_epoch(path):
    """The epoch a checkpoint file records, read without loading its tensors (None if unreadable)."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"])
    except Exception:
        return None


# ---- which run, from which file ----------------------------------------------------------------

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
    if latest == resumed["epoch"]:
        lacks = ("; it holds no momenta (model_best.pth.tar keeps the network and its distribution only), so "
                 "the run could not go on from it exactly" if not has_momenta(resumed["optimizer"]) else "")
        raise CheckpointError(f"{path} is at the run's latest epoch ({latest}) but is not its checkpoint{lacks}: "
                              f"resume with --resume {run.folder}, which goes on exactly from {run.checkpoint}")
    later = f"its checkpoint.pth.tar is at epoch {latest}" if latest is not None else "it has no checkpoint.pth.tar"
    raise CheckpointError(f"{path} is not the latest checkpoint of the run {run.name!r} (it is at epoch "
                          f"{resumed['epoch']}; {later}): resuming from it would discard what came after. "
                          f"Add --rewind to go back to it, or --fork --save NAME to start a new run from it")


def refuse_to_start_over(args, run):
    if run.holds_run() and not args.overwrite:
        raise UsageError(f"{run.folder} already holds a run: continue it with --resume {run.folder}, "
                         f"start it over with --overwrite, or choose another --save")


def open_run(args, cfg, typed, device, world):
    """The run to train: (its config, its folder, the checkpoint it continues from and
    that file's path, or None, None for a new run). Refuses what would lose a run."""
    if args.resume is None:
        if cfg.seed is None:  # every rank the same: rank 0's
            cfg = replace(cfg, seed=distributed.gather(int.from_bytes(os.urandom(4), "little"), world)[0])
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
    if len(resumed["ranks"]) != world.size:
        raise CheckpointError(f"{path} was trained on {len(resumed['ranks'])} rank(s), and this run has "
                              f"{world.size}: resume it with as many (torchrun --nproc_per_node "
                              f"{len(resumed['ranks'])}), so that every rank goes on with its own samples")
    if args.fork:  # a new run: the settings given change those of the file
        return replace(saved, **{key: getattr(cfg, key) for key in typed}), run, resumed, path
    different = conflicts(cfg, saved, typed, sorted(typed))
    if different:
        raise CheckpointError("the checkpoint belongs to another run: " + ", ".join(different) +
                              "; a resumed run keeps its settings (leave these options out)")
    return saved, run, resumed, path


def check_sizes(cfg, train_labels, test_labels, root, world):
    """What would fail only once the run is under way (an empty split, a training set
    smaller than two images, a loader that cannot be shared by ranks) fails here,
    before anything is written."""
    if len(train_labels) < 2:
        raise DatasetError(f"the training set of {cfg.dataset} in {root} has {len(train_labels)} "
                           f"image{'s' if len(train_labels) != 1 else ''}: BatchNorm needs batches of at least "
                           f"2 (download the dataset again?)")
    if len(test_labels) == 0:
        raise DatasetError(f"the test set of {cfg.dataset} in {root} has no images (download the dataset again?)")
    if cfg.loader == "torchvision" and (world.several or cfg.virtual_ranks > 1):
        raise UsageError("--loader torchvision serves one rank: use the device loader with torchrun or "
                         "--virtual-ranks")


# ---- the log of rank 0, nothing on the others --------------------------------------------------

class Silent:
    """What the ranks other than 0 have instead of the log: they write nothing."""
    offset = 0

    def write(self, message="", echo=None):
        pass

    def set_best(self, best_prec1, best_epoch):
        pass

    def close(self):
        pass


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


def open_log(run, cfg, resumed, path, device, steps, world):
    """The run's log and Progress: new, or cut back to where the checkpoint was written."""
    progress = Progress() if resumed is None else Progress(list(resumed["history"]), resumed["best_prec1"],
                                                           resumed["best_epoch"])
    if not world.main:
        return Silent(), progress
    if resumed is None or resumed.get("run") != run.name:  # new, or --fork: a new log
        log = RunLog(run.log, cfg.epochs)
        log.write(f"VISPA run {run.name}: {' '.join(sys.argv)}")
        if resumed is None:
            log.write("Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
            ranks = f"{world.size} ranks x {cfg.virtual_ranks} virtual" if world.several else \
                f"{cfg.virtual_ranks} virtual ranks" if cfg.virtual_ranks > 1 else "one rank"
            on = f"{device} ({threads.describe(torch.get_num_threads())})" if device.type == "cpu" else device
            log.write(f"Device: {on}; {ranks}; {steps} training steps per epoch")
            if cfg.scale_lr:
                log.write(scaled_lr_note(cfg, world))
            return log, progress
        how = f"Forked from {path} (run {resumed.get('run')}) at epoch {resumed['epoch']}/{cfg.epochs}"
    else:
        log_size = os.path.getsize(run.log) if os.path.exists(run.log) else 0
        log = RunLog(run.log, cfg.epochs, offset=min(resumed["log_offset"], log_size))
        how = (f"Resumed from {path} at epoch {resumed['epoch']}/{cfg.epochs}"
               if os.path.abspath(path) == run.checkpoint else
               f"Rewound to epoch {resumed['epoch']}/{cfg.epochs} from {path}")
    if resumed["epoch"] > 0 and not has_momenta(resumed["optimizer"]):
        how += " (it holds no momenta: they start again from zero)"
    if device.type == "cpu":
        how += f"; {threads.describe(torch.get_num_threads())}"
    log.set_best(progress.best_prec1, progress.best_epoch)
    log.write(how)
    return log, progress


def take_the_folder(args, run, resumed, world, device):
    """Rank 0 locks the run's folder (held until the process ends: a second writer of
    this run is refused) and prepares it; every rank learns whether it could."""
    failure = None
    if world.main:
        try:
            run.lock()
            if resumed is None:
                refuse_to_start_over(args, run)  # again, now that no one else can start it
            run.prepare(start_over=args.overwrite and resumed is None)
        except OSError as error:
            failure = UsageError(f"cannot write to {run.folder}: {error.strerror or error}")
        except (UsageError, RunInUse) as error:
            failure = error
    if distributed.maximum(int(failure is not None), world, device):
        raise failure or UsageError("rank 0 could not start the run (its error says why)")


# ---- stopping ----------------------------------------------------------------------------------

class StopRequest:
    """SIGINT / SIGTERM set ``signum``; the loops check it and stop cleanly. A second
    SIGINT interrupts at once. With several ranks, a stop on any of them stops them all
    at the same step: they agree every STOP_CHECK_EVERY training steps, and once more
    after each evaluation."""

    def __init__(self, world, device):
        self.world, self.device = world, device
        self.signum = None   # this process's signal
        self.agreed = None   # the signal the ranks stop for
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def agree(self):
        """Whether any rank was asked to stop; the same answer on every rank (a collective
        call: every rank makes it at the same point)."""
        if self.agreed is None:
            self.agreed = distributed.maximum(self.signum or 0, self.world, self.device) or None
        return self.agreed is not None

    def watch(self, batches, description, collective=True):
        """The batches with a progress bar, ending early once the ranks agree to stop.
        ``collective=False`` (the evaluation, whose shards may differ in length by a
        batch): this rank stops on its own signal, and ``agree`` follows."""
        every = STOP_CHECK_EVERY if self.world.several else 1
        for i, batch in enumerate(progress(batches, description)):
            if collective and i % every == 0 and self.agree():
                return
            if not collective and (self.signum is not None or self.agreed is not None):
                return
            yield batch


def data_folder(args, dataset, trained_on=None):
    """Where the dataset is read from: ``--data_root``, else the folder the resumed or
    evaluated run was trained on (its checkpoints remember it), else the dataset's
    default folder (./datasets; ImageNet: ./datasets/imagenet)."""
    return args.data_root or trained_on or DATASETS[dataset].default_root


def dataset_moved(error, args, trained_on):
    """A DatasetError that says, where it was read from the folder a checkpoint names,
    that this is where the run was trained."""
    if args.data_root or not trained_on:
        return error
    return DatasetError(f"{error} ({trained_on} is where the run was trained; give --data_root to read "
                        f"the dataset from elsewhere)")


def resume_command(args, run, world, data_root, dataset):
    """The command line that continues this run (with the data and device it used)."""
    words = ["python", "main.py"]
    if world.several:
        words = ["torchrun", "--nproc_per_node", str(world.size), "main.py"]
    words += ["--resume", run.folder]
    if os.path.normpath(data_root) != os.path.normpath(DATASETS[dataset].default_root):
        words += ["--data_root", data_root]
    if args.gpus is not None:
        words += ["--gpus", args.gpus]
    return " ".join(shlex.quote(word) for word in words)


# ---- the run ----------------------------------------------------------------------------------

def train(args, cfg, typed, device, world=distributed.World()):
    cfg, run, resumed, path = open_run(args, cfg, typed, device, world)
    if resumed is not None and resumed["epoch"] >= cfg.epochs:
        if world.main:
            print(f"{path}: the run is finished; "
                  f"{best_line(resumed['best_prec1'], resumed['best_epoch'], cfg.epochs)}")
        return EXIT_OK

    if resumed is not None and args.threads is None and "OMP_NUM_THREADS" not in os.environ:
        threads.use(resumed.get("threads", torch.get_num_threads()))  # the sums of the run so far, in their order

    # Everything that can fail on bad input fails before the first file is written.
    seeds.seed_everything(cfg.seed)  # the same network on every rank
    shards = [world.rank * cfg.virtual_ranks + k for k in range(cfg.virtual_ranks)]
    trained_on = None if resumed is None else resumed.get("data_root")
    data_root = data_folder(args, cfg.dataset, trained_on)
    try:
        train_batches, test_batches = batches(cfg, data_root, device, world, shards)
    except DatasetError as error:
        raise dataset_moved(error, args, trained_on) from None
    model, opt = build(cfg, device)
    ranks = engine.Ranks(generators=[seeds.generator(device, cfg.seed, "draws", g) for g in shards],
                         average=lambda grads: distributed.average_(grads, world) if world.several else None,
                         total=lambda sums: distributed.sum_(sums, world))
    if resumed is not None:
        load_ours(model, opt, resumed, path)
    steps = len(train_batches) // len(shards)
    peak = peak_lr(cfg, world)
    lr_at = lambda it: learning_rate(it, peak, cfg.warmup_epochs * steps, cfg.epochs * steps, cfg.lr_decay)
    take_the_folder(args, run, resumed, world, device)

    if resumed is not None:
        restore_rank(resumed["ranks"][world.rank], train_batches, ranks, device)
    start = 0 if resumed is None else resumed["epoch"]
    log, progress_ = open_log(run, cfg, resumed, path, device, steps, world)
    if world.main:
        run.write_config(cfg.to_dict())

    def snapshot(epoch):
        """The checkpoints of the moment, made on every rank (their random states are
        gathered), written by rank 0: everything the run needs to go on, and model_best
        (the distribution without its momenta)."""
        rank_states = distributed.gather(rank_state(train_batches, ranks, device), world)
        optimizer = opt.state_dict()
        state = {"format": checkpoint.FORMAT, "version": checkpoint.VERSION, "config": cfg.to_dict(),
                 "run": run.name, "epoch": epoch, "model": model.state_dict(), "optimizer": optimizer,
                 "best_prec1": progress_.best_prec1, "best_epoch": progress_.best_epoch,
                 "history": progress_.history, "ranks": rank_states, "log_offset": log.offset,
                 "data_root": os.path.abspath(data_root), "threads": torch.get_num_threads()}
        return state, dict(state, optimizer=without_momenta(optimizer))

    fresh = resumed is None or os.path.abspath(path) != run.checkpoint  # new, forked or rewound
    if fresh or progress_.best_epoch == start > 0:
        latest, best = snapshot(start)
        if world.main and fresh:
            checkpoint.save_atomic(latest, run.checkpoint)  # this is the run's latest state
        if world.main and progress_.best_epoch == start > 0:  # the stop may have come before model_best was written
            checkpoint.save_atomic(best, run.best)
    del resumed
    if world.main:
        run.write_metrics(progress_.history)

    saver = checkpoint.BackgroundSaver()  # the per-epoch checkpoints are written while training goes on
    stop = StopRequest(world, device)
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            began = time.time()
            trained = engine.train_one_epoch(model, opt, stop.watch(train_batches, "train"), lr_at,
                                             (epoch - 1) * steps, cfg.bf16, ranks)
            distributed.broadcast_(list(model.buffers()), world)  # rank 0's running statistics
            evaluation_draws(opt, cfg, epoch, world.rank)
            val = engine.evaluate(model, opt, stop.watch(test_batches, f"eval L={cfg.L}", collective=False),
                                  cfg.L, cfg.bf16, ranks.total)
            if stop.agree():
                saver.wait()
                log.write(f"Stopped by {signal.Signals(stop.agreed).name} during epoch {epoch}/{cfg.epochs}; "
                          f"the checkpoint of epoch {epoch - 1} is {run.checkpoint}. Resume with: "
                          f"{resume_command(args, run, world, data_root, cfg.dataset)}")
                return exit_stopped(stop.agreed)
            mean = engine.evaluate_mean(model, opt, test_batches, cfg.bf16, ranks.total)
            saver.wait()  # the last epoch's checkpoint is on disk (or its failure raised) before this one is logged
            diverged = diverged_because(trained, val, model, opt)
            if diverged:
                message = (f"training diverged in epoch {epoch} ({diverged}): stopped. The last good checkpoint "
                           f"(epoch {epoch - 1}) is {run.checkpoint}; try a lower --lr or another --scale")
                log.write(f"Stopped: {message}", echo=False)
                if world.main:
                    print(f"error: {message}", file=sys.stderr)
                return EXIT_DIVERGED
            is_best = progress_.record(epoch, lr_at(epoch * steps - 1), trained, val, mean, time.time() - began)
            log.write(epoch_line(progress_.history[-1], cfg.epochs, cfg.L))
            log.set_best(progress_.best_prec1, progress_.best_epoch)
            latest, best = snapshot(epoch)
            if world.main:
                run.write_metrics(progress_.history)
                saver.submit([(latest, run.checkpoint)] + [(best, run.best)] * is_best)
        saver.wait()
        if world.main:
            print(best_line(progress_.best_prec1, progress_.best_epoch, cfg.epochs))
        return EXIT_OK
    except CheckpointError as error:  # a checkpoint could not be written: the log and metrics go back to the last one
        if world.main:
            back_to_last_checkpoint(run, log, progress_)
            log.write(f"Stopped: {error}", echo=False)
        raise
    finally:
        stop.restore()
        try:
            saver.wait()  # a checkpoint is complete (or its error raised) before the run ends
        finally:
            log.close()


def rank_state(train_batches, ranks, device):
    """What one rank draws from: its global generators, its shards' augmentation and
    order, its training draws (the evaluation's draws are seeded by the epoch)."""
    data = train_batches.state_dict() if hasattr(train_batches, "state_dict") else None  # else: the rng, or none
    return {"rng": checkpoint.rng_states(device), "data": data,
            "draws": [g.get_state() for g in ranks.generators]}


def restore_rank(state, train_batches, ranks, device):
    checkpoint.set_rng_states(state["rng"], device)
    if state["data"] is not None:
        train_batches.load_state_dict(state["data"])
    for generator, saved in zip(ranks.generators, state["draws"]):
        generator.set_state(saved.cpu())


def diverged_because(trained, val, model, opt):
    """Why the run cannot go on (a non-finite loss, or non-finite values in the network
    or in VISPA's state), or None."""
    if not (math.isfinite(trained["loss"]) and math.isfinite(val["loss"])):
        return f"train loss {trained['loss']}, val loss {val['loss']}"
    if not engine.state_is_finite(model, opt):
        return "non-finite values in the network or in VISPA's M, Z or momenta"
    return None


def back_to_last_checkpoint(run, log, progress_):
    """After a failed checkpoint write: metrics.csv and the log's best line say what the
    checkpoint on disk holds, so that nothing claims epochs a resume would not find."""
    kept = checkpoint_epoch(run.checkpoint) or 0
    del progress_.history[kept:]
    last = progress_.history[-1] if progress_.history else {"best_prec1": 0.0, "best_epoch": 0}
    progress_.best_prec1, progress_.best_epoch = last["best_prec1"], last["best_epoch"]
    log.set_best(progress_.best_prec1, progress_.best_epoch)
    try:
        run.write_metrics(progress_.history)
    except OSError:
        pass  # the disk that refused the checkpoint may refuse this too; the error says so
