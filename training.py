"""A training run of main.py: open it (new, resumed, rewound or forked), train it epoch by
epoch, keep its files. main.py makes the ``Request`` from the command line and calls
``train``.

An epoch: ``engine.train_one_epoch``, then the L-sample evaluation and the
mean-network evaluation, one log line, one row of metrics.csv, one checkpoint
(``utils/run_dir.py`` describes the files, ``checkpoint.py`` the checkpoint). Everything
that can fail on bad input fails before the first file is written; a kill at any moment
loses at most the current epoch.

With torchrun every rank runs this same program on its shard of the data (its own
weight samples, its own batches); the ranks average their gradients at every step
(engine.Ranks), agree on when to stop, and rank 0 alone writes. A checkpoint holds
every rank's random state, so a resumed run goes on as the uninterrupted one.
"""
import math
import os
import secrets
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field, replace

import torch

import checkpoint
import engine
import factory
from checkpoint import Checkpoint, CheckpointError
from config import IMAGENET_RANKS, Config, UsageError, conflicts, vispa_settings_for_a_rival
from data import DATASETS, DatasetError
from optim import learning_rate
from utils import distributed, seeds, tensorboard, threads
from utils.files import BackgroundSaver
from utils.stop import StopRequest
from utils.run_dir import (DEPLOYED_FIELDS, EXIT_DIVERGED, EXIT_OK, NotOurs, RunDir, RunInUse, deployed_line,
                           epoch_line, exit_stopped, log_header, run_dir_of)
from utils.runlog import RunLog, best_line

NEW, RESUME, REWIND, FORK = "new", "resume", "rewind", "fork"


@dataclass(frozen=True)
class Request:
    """What the command line asks of a run, decided once.

    ``mode``: NEW (a run named ``name``, or after the model, dataset and time), RESUME
    (the run of ``source``, a run folder or its checkpoint.pth.tar, or of ``name``),
    REWIND (back to the epoch of ``source``, a checkpoint of the run, discarding later
    epochs) or FORK (a new run ``name`` from the state in ``source``)."""
    mode: str
    name: str = None
    results_dir: str = "./results"
    source: str = None
    start_over: bool = False     # --overwrite: a new run replaces one already in its folder
    start_over_only_on: str = None  # --demo: ... only one trained on this data folder (the demo's own run)
    data_root: str = None
    gpus: str = None             # for the command line that resumes the run
    threads: int = None          # typed on the command line
    tensorboard: bool = False    # also write the metrics as TensorBoard scalars


# ---- which run, from which file ----------------------------------------------------------------

def source_and_run(request):
    """The checkpoint file to start from, and the run folder to write."""
    if not request.source and not request.name:
        raise UsageError("--resume without a path needs --save <run name> (or give the run folder)")
    target = request.source or os.path.join(request.results_dir, request.name)
    if request.mode == FORK:
        return target, RunDir(request.results_dir, request.name)
    run = run_dir_of(target)
    if request.name is not None and request.source and request.name != run.name:
        raise UsageError(f"--resume {request.source} continues the run {run.name!r}, not --save {request.name!r} "
                         f"(to start a new run from it, add --fork)")
    return (run.checkpoint if os.path.isdir(target) else target), run


def check_continuation(request, resumed, path, run):
    """Resume only from the run's own latest checkpoint. Another file (an earlier epoch,
    model_best, a copy kept elsewhere) would silently throw epochs away or write beside
    the copy: refused, unless --rewind or --fork says what is meant."""
    if request.mode == FORK:
        run.check_ours(writes_events(request, run))
        if run.holds_run():
            raise UsageError(f"{run.folder} already holds a run: --fork starts a new run; choose another --save")
        return
    logged = run.identity()
    if resumed.run_id and logged and logged != resumed.run_id:
        raise CheckpointError(f"{path} is a checkpoint of the run {resumed.run!r} with the id {resumed.run_id}, but "
                              f"{run.log} is the log of the run of that name with the id {logged}: a checkpoint "
                              f"copied from another run. To go on from it, start a new run with --fork --save NAME")
    if resumed.run != run.name:
        raise CheckpointError(f"{path} is a checkpoint of the run {resumed.run!r}, kept in the folder {run.name!r}: "
                              f"a copy or a renamed folder, whose log would be {run.log}. To go on from it, start "
                              f"a new run with --fork --save NAME")
    run.check_ours(writes_events(request, run))
    if os.path.abspath(path) == os.path.abspath(run.checkpoint) or request.mode == REWIND:
        return
    latest = (checkpoint.peek(run.checkpoint) or {}).get("epoch")
    if latest == resumed.epoch:
        lacks = ("; it holds no momenta (model_best.pth.tar keeps the network and its distribution only), so "
                 "the run could not go on from it exactly" if not resumed.has_momenta else "")
        raise CheckpointError(f"{path} is at the run's latest epoch ({latest}) but is not its checkpoint{lacks}: "
                              f"resume with --resume {run.folder}, which goes on exactly from {run.checkpoint}")
    later = f"its checkpoint.pth.tar is at epoch {latest}" if latest is not None else "it has no checkpoint.pth.tar"
    raise CheckpointError(f"{path} is not the latest checkpoint of the run {run.name!r} (it is at epoch "
                          f"{resumed.epoch}; {later}): resuming from it would discard what came after. "
                          f"Add --rewind to go back to it, or --fork --save NAME to start a new run from it")


def refuse_to_start_over(request, run):
    run.check_ours(writes_events(request, run))  # what the run did not write is never replaced, even with --overwrite
    if run.holds_run() and not request.start_over:
        raise UsageError(f"{run.folder} already holds a run: continue it with --resume {run.folder}, "
                         f"start it over with --overwrite, or choose another --save")
    if run.holds_run() and request.start_over_only_on:
        trained_on = next((fields["data_root"] for fields in map(checkpoint.peek, (run.checkpoint, run.best))
                           if fields and fields.get("data_root")), None)
        if not (trained_on and os.path.realpath(trained_on) == os.path.realpath(request.start_over_only_on)):
            where = trained_on or "data its checkpoints do not name"
            raise UsageError(f"{run.folder} holds a run that is not the demo's (trained on {where}): --demo replaces "
                             f"only its own earlier run; move that run, or give --results-dir another folder")


def writes_events(request, run) -> bool:
    """Whether the run writes TensorBoard events: asked for, or a resumed run that has them."""
    return request.tensorboard or (request.mode in (RESUME, REWIND) and os.path.isdir(run.tensorboard))


# What a fork cannot change: the network and the method whose state it goes on from.
NETWORK_SETTINGS = ("model", "dataset", "width", "method", "K", "folder_classes", "folder_image_size")


def open_run(request, cfg, on_command_line, device, world):
    """The run to train: (its config, its folder, the checkpoint it continues from and
    that file's path, or None, None for a new run). Refuses what would lose a run."""
    if request.mode == NEW:
        if cfg.seed is None:  # every rank the same: rank 0's
            cfg = replace(cfg, seed=distributed.gather(int.from_bytes(os.urandom(4), "little"), world)[0])
        run = RunDir(request.results_dir,
                     request.name or f"{cfg.model}_{cfg.dataset}_{time.strftime('%Y%m%d-%H%M%S')}")
        refuse_to_start_over(request, run)
        return cfg, run, None, None
    path, run = source_and_run(request)
    resumed = checkpoint.read(path, map_location=device, purpose="resumed")
    check_continuation(request, resumed, path, run)
    if len(resumed.ranks) != world.size:
        raise CheckpointError(f"{path} was trained on {len(resumed.ranks)} rank(s), and this run has "
                              f"{world.size}: resume it with as many (torchrun --nproc_per_node "
                              f"{len(resumed.ranks)}), so that every rank goes on with its own samples")
    if request.mode == FORK:  # a new run: the settings given change those of the file
        problem = vispa_settings_for_a_rival(resumed.config.method, on_command_line)
        if problem:
            raise UsageError(f"--fork from {path}: {problem}")
        fixed = conflicts(cfg, resumed.config, on_command_line, NETWORK_SETTINGS)
        if fixed:
            raise UsageError(f"--fork from {path}: {', '.join(fixed)}: a fork goes on from the checkpoint's network "
                             f"and its {resumed.config.method} state, which these settings would change; leave them "
                             f"out, or start a new run")
        forked = replace(resumed.config, **{key: getattr(cfg, key) for key in on_command_line})
        for problem in forked.contradictions():
            raise UsageError(f"--fork from {path}: {problem}")
        if forked.epochs <= resumed.epoch:
            raise UsageError(f"--fork from {path}, at epoch {resumed.epoch}, with --epochs {forked.epochs}: the new "
                             f"run would have nothing to train; give --epochs above {resumed.epoch}")
        return forked, run, resumed, path
    different = conflicts(cfg, resumed.config, on_command_line, sorted(on_command_line))
    if different:
        raise CheckpointError("the checkpoint belongs to another run: " + ", ".join(different) +
                              "; a resumed run keeps its settings (leave these options out)")
    return resumed.config, run, resumed, path


def take_the_folder(request, run, run_id, resumed, world, device):
    """Rank 0 locks the run's folder (held until the process ends: a second writer of
    this run is refused) and prepares it; every rank learns whether it could."""
    failure = None
    if world.main:
        try:
            run.lock()
            if resumed is None:
                refuse_to_start_over(request, run)  # again, now that no one else can start it
            run.check_ours(writes_events(request, run))
            run.prepare(run_id, start_over=request.start_over and resumed is None,
                        new=resumed is None or request.mode == FORK, tensorboard=writes_events(request, run))
        except OSError as error:
            inside = isinstance(error.filename, str) and error.filename.startswith(run.folder + os.sep)  # tb/
            failure = UsageError(f"cannot write to {error.filename if inside else run.folder}: "
                                 f"{error.strerror or error}")
        except (UsageError, RunInUse, NotOurs) as error:
            failure = error
    if distributed.maximum(int(failure is not None), world, device):
        raise failure or UsageError("rank 0 could not start the run (its error says why)")


# ---- what the run has reached, and its log ----------------------------------------------------------

@dataclass
class Record:
    """What a run has reached: one row of metrics per finished epoch, and its best epoch."""
    history: list = field(default_factory=list)
    best_prec1: float = 0.0
    best_epoch: int = 0

    def add(self, epoch, lr, trained, val, mean, deployed, seconds) -> bool:
        """Add the epoch's row (``deployed`` None: not evaluated); True if its L-sample
        top-1 is the best so far."""
        is_best = self.best_epoch == 0 or val["prec1"] > self.best_prec1
        if is_best:
            self.best_prec1, self.best_epoch = val["prec1"], epoch
        self.history.append({
            "epoch": epoch, "lr": lr, "train_loss": trained["loss"], "train_prec1": trained["prec1"],
            "train_prec5": trained["prec5"], "val_loss": val["loss"], "val_prec1": val["prec1"],
            "val_prec5": val["prec5"], "val_nll": val["nll"], "val_ece": val["ece"], "val_brier": val["brier"],
            "mean_prec1": mean["prec1"], "mean_nll": mean["nll"], "mean_ece": mean["ece"], "mean_brier": mean["brier"],
            **deployed_columns(deployed),
            "best_prec1": self.best_prec1, "best_epoch": self.best_epoch, "seconds": seconds})
        return is_best

    def deployed_of_best(self):
        """The deployed network's columns of the best epoch's row (None: not evaluated)."""
        return self.history[self.best_epoch - 1]["deployed_prec1"] if self.best_epoch else None

    def back_to(self, epoch):
        """Forget the epochs after ``epoch`` (a checkpoint that could not be written)."""
        del self.history[epoch:]
        last = self.history[-1] if self.history else {"best_prec1": 0.0, "best_epoch": 0}
        self.best_prec1, self.best_epoch = last["best_prec1"], last["best_epoch"]


def deployed_columns(deployed) -> dict:
    """The metrics columns of a deployed network's result (empty without one)."""
    if deployed is None:
        return {key: None for key in DEPLOYED_FIELDS}
    return {"deployed_prec1": deployed["prec1"], "deployed_nll": deployed["nll"], "deployed_ece": deployed["ece"],
            "deployed_brier": deployed["brier"]}


class Silent:
    """What the ranks other than 0 have instead of the log: they write nothing."""
    offset = 0

    def write(self, message="", echo=None, best=None):
        pass

    def set_best(self, best_prec1, best_epoch):
        pass

    def close(self):
        pass


def open_log(run, run_id, cfg, resumed, path, device, steps, world):
    """The run's log: new, or cut back to where the checkpoint was written. Its first line
    names the run and its identity, which the checkpoints carry too."""
    if not world.main:
        return Silent()
    header = log_header(run.name, run_id, shlex.join(sys.argv))
    if resumed is None or resumed.run != run.name:  # new, or --fork: a new log
        log = RunLog(run.log, cfg.epochs, owner=run.record)
        log.write(header)
        if resumed is None:
            log.write("Settings: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
            ranks = f"{world.size} ranks x {cfg.virtual_ranks} virtual" if world.several else \
                f"{cfg.virtual_ranks} virtual ranks" if cfg.virtual_ranks > 1 else "one rank"
            on = f"{device} ({threads.describe(torch.get_num_threads())})" if device.type == "cpu" else device
            log.write(f"Device: {on}; {ranks}; {steps} training steps per epoch")
            log.write(f"Files: this log is {run.log}; the checkpoints, metrics.csv and config.json are in "
                      f"{run.folder}/")
            if cfg.scale_lr:
                log.write(scaled_lr_note(cfg, world))
            return log
        how = f"Forked from {path} (run {resumed.run}) at epoch {resumed.epoch}/{cfg.epochs}"
    else:
        log_size = os.path.getsize(run.log) if os.path.exists(run.log) else 0
        log = RunLog(run.log, cfg.epochs, offset=min(resumed.log_offset, log_size), owner=run.record)
        if log_size == 0:  # the log was deleted: a new one, with the run's name and identity
            log.write(header + f" (the log of epochs 1-{resumed.epoch} is gone)")
        how = (f"Resumed from {path} at epoch {resumed.epoch}/{cfg.epochs}" if os.path.abspath(path) == run.checkpoint
               else f"Rewound to epoch {resumed.epoch}/{cfg.epochs} from {path}")
    if resumed.epoch > 0 and not resumed.has_momenta:
        how += " (it holds no momenta: they start again from zero)"
    if device.type == "cpu":
        how += f"; {threads.describe(torch.get_num_threads())}"
    log.set_best(resumed.best_prec1, resumed.best_epoch)
    log.write(how)
    return log


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


def resume_command(request, run, world, data_root, dataset):
    """The command line that continues this run (with the data and device it used)."""
    words = ["python", "main.py"]
    if world.several:
        words = ["torchrun", "--nproc_per_node", str(world.size), "main.py"]
    words += ["--resume", run.folder]
    if os.path.normpath(data_root) != os.path.normpath(DATASETS[dataset].default_root):
        words += ["--data-root", data_root]
    if request.gpus is not None:
        words += ["--gpus", request.gpus]
    return " ".join(shlex.quote(word) for word in words)


# ---- the run ----------------------------------------------------------------------------------

def train(request: Request, cfg: Config, on_command_line, device, world=distributed.World()):
    cfg, run, resumed, path = open_run(request, cfg, on_command_line, device, world)
    if resumed is not None and resumed.epoch >= cfg.epochs and not deployed_pending(cfg, run, resumed, world):
        if world.main:
            print(f"{path}: the run is finished; {best_line(resumed.best_prec1, resumed.best_epoch, cfg.epochs)}")
        return EXIT_OK
    if resumed is not None and resumed.threads and request.threads is None:
        threads.use(resumed.threads)  # the sums of the run so far, in their order (OMP_NUM_THREADS is no request)

    # Everything that can fail on bad input fails before the first file is written.
    seeds.seed_everything(cfg.seed)  # the same network on every rank
    folder = factory.DataFolder.of(request.data_root, cfg.dataset, resumed and resumed.data_root)
    classes = factory.classes_in(cfg, folder, resumed and resumed.classes)  # images of one's own: their names
    if classes is not None:
        cfg = replace(cfg, folder_classes=len(classes))
    train_batches, test_batches = factory.batches(cfg, folder, device, world)
    recalibration = factory.recalibration_batches(cfg, folder, device, world) if cfg.recalibrate else None
    problem = factory.class_problem(cfg, folder)
    shards = [world.rank * cfg.virtual_ranks + k for k in range(cfg.virtual_ranks)]
    steps = len(train_batches) // len(shards)
    if request.mode in (RESUME, REWIND) and resumed.steps is not None and steps != resumed.steps:
        raise folder.explain(DatasetError(
            f"the training set in {folder.path} gives {steps} steps per epoch, and the run took {resumed.steps}: it "
            f"is not the data the run was trained on, and the run would not go on exactly; give --data-root the "
            f"run's data (or --fork a new run to train on other data)"))
    model, opt = factory.build(cfg, device, images_per_epoch=steps * cfg.batch_size * world.size * len(shards))
    ranks = engine.Ranks(generators=[seeds.generator(device, cfg.seed, "draws", g) for g in shards],
                         average=(lambda grads: distributed.average_(grads, world)) if world.several else None,
                         total=distributed.summing(world))
    if resumed is not None:
        factory.fill(model, opt, resumed, path)
    peak = peak_lr(cfg, world)
    lr_at = lambda it: learning_rate(it, peak, cfg.warmup_epochs * steps, cfg.epochs * steps, cfg.lr_decay)
    events = world.main and writes_events(request, run)
    if events:  # before anything is written
        tensorboard.check() if request.tensorboard else tensorboard.check(
            f"{run.tensorboard} holds this run's TensorBoard events: going on with them",
            f"move {run.tensorboard} elsewhere to go on without them")
    run_id = resumed.run_id if resumed is not None and request.mode != FORK and resumed.run_id else \
        secrets.token_hex(8)
    if resumed is not None:  # before anything is written: a hand-made file may hold states that do not fit
        restore_rank(resumed.ranks[world.rank], train_batches, ranks, device, path)
    take_the_folder(request, run, run_id, resumed, world, device)

    start = 0 if resumed is None else resumed.epoch
    record = Record() if resumed is None else Record(list(resumed.history), resumed.best_prec1, resumed.best_epoch)
    log = open_log(run, run_id, cfg, resumed, path, device, steps, world)
    if problem:
        log.write(f"Warning: {problem}", echo=False)
        if world.main:
            print(f"warning: {problem}", file=sys.stderr)
    if world.main:
        run.write_config(cfg.to_dict())

    def snapshot(epoch):
        """The checkpoint of the moment, made on every rank (their random states are
        gathered), written by rank 0."""
        return Checkpoint(config=cfg, run=run.name, run_id=run_id, epoch=epoch, model=model.state_dict(),
                          optimizer=opt.state_dict(), best_prec1=record.best_prec1, best_epoch=record.best_epoch,
                          history=record.history, ranks=distributed.gather(rank_state(train_batches, ranks, device),
                                                                           world),
                          log_offset=log.offset, data_root=os.path.abspath(folder.path),
                          threads=torch.get_num_threads(), classes=classes, steps=steps)

    fresh = resumed is None or os.path.abspath(path) != run.checkpoint  # new, forked or rewound
    if fresh and 0 < record.best_epoch < start:  # the best epoch lies before the starting point
        kept = best_of_source(run, resumed, path, run_id, cfg) if world.main else None
        if not distributed.gather(kept, world)[0]:  # rank 0's answer
            log.write(f"The best epoch {record.best_epoch} has no model_best.pth.tar here to go with it: the best "
                      f"is counted from the starting epoch {start} on")
            record.best_prec1, record.best_epoch = record.history[-1]["val_prec1"], start
            log.set_best(record.best_prec1, record.best_epoch)
    if fresh or record.best_epoch == start > 0:
        state = snapshot(start)
        if world.main and fresh:
            checkpoint.write(state.to_file(), run.checkpoint, run.record)  # this is the run's latest state
        if world.main and record.best_epoch == start > 0:  # the stop may have come before model_best was written
            checkpoint.write(state.without_momenta().to_file(), run.best, run.record)
    del resumed
    if world.main:
        run.write_metrics(record.history)
        if events:
            tensorboard.follow(run.tensorboard, record.history, run.record)

    # the per-epoch checkpoints are written while training goes on
    saver = BackgroundSaver(lambda content, path: checkpoint.write(content, path, run.record))
    stop = StopRequest(world, device)
    try:
        for epoch in range(start + 1, cfg.epochs + 1):
            began = time.time()
            trained = engine.train_one_epoch(model, opt, stop.watch(train_batches, "train"), lr_at,
                                             (epoch - 1) * steps, cfg.bf16, ranks)
            distributed.broadcast_(list(model.buffers()), world)  # rank 0's running statistics
            factory.evaluation_draws(opt, cfg, epoch, world.rank)
            val = engine.evaluate(model, opt, stop.watch(test_batches, f"eval L={cfg.L}", collective=False),
                                  cfg.L, cfg.bf16, ranks.total)
            if stop.agree():
                saver.wait()
                log.write(f"Stopped by {signal.Signals(stop.agreed).name} during epoch {epoch}/{cfg.epochs}; "
                          f"the checkpoint of epoch {epoch - 1} is {run.checkpoint}. Resume with: "
                          f"{resume_command(request, run, world, folder.path, cfg.dataset)}")
                return exit_stopped(stop.agreed)
            mean = engine.evaluate_mean(model, opt, test_batches, cfg.bf16, ranks.total)
            deployed = engine.evaluate_deployed(model, opt, recalibration, test_batches, cfg.bf16, ranks.total) \
                if cfg.deployed_every_epoch and recalibration is not None else None
            saver.wait()  # the last epoch's checkpoint is on disk (or its failure raised) before this one is logged
            diverged = diverged_because(trained, val, model, opt)
            if diverged:
                message = (f"training diverged in epoch {epoch} ({diverged}): stopped. The last good checkpoint "
                           f"(epoch {epoch - 1}) is {run.checkpoint}; try a lower --lr"
                           f"{' or another --scale' if cfg.method == 'vispa' else ''}")
                log.write(f"Stopped: {message}", echo=False)
                if world.main:
                    print(f"error: {message}", file=sys.stderr)
                return EXIT_DIVERGED
            with stop.hold():
                is_best = record.add(epoch, lr_at(epoch * steps - 1), trained, val, mean, deployed,
                                     time.time() - began)
                log.write(epoch_line(record.history[-1], cfg.epochs, cfg.L), best=(record.best_prec1, record.best_epoch))
                state = snapshot(epoch)
                if world.main:
                    run.write_metrics(record.history)
                    if events:
                        first = (epoch - 1) * steps
                        tensorboard.write_row(run.tensorboard, record.history[-1], run.record,
                                              [(first + i, lr_at(first + i), loss)
                                               for i, loss in enumerate(trained["step_losses"])])
                    saver.submit([(state.to_file(), run.checkpoint)] +
                                 [(state.without_momenta().to_file(), run.best)] * is_best)
        saver.wait()
        if recalibration is not None and record.best_epoch and record.deployed_of_best() is None:
            watched = stop.watch(test_batches, "deployed", collective=False)
            deploy_the_best(run, run_id, record, model, cfg, recalibration, watched, device, world, ranks, log,
                            events, stopped=stop.agree)
            if stop.agree():  # every epoch is on disk: a resume evaluates the deployed network, and ends
                log.write(f"Stopped by {signal.Signals(stop.agreed).name} while the deployed network of the best "
                          f"epoch was evaluated; every epoch's checkpoint is on disk. Resume with: "
                          f"{resume_command(request, run, world, folder.path, cfg.dataset)}")
                return exit_stopped(stop.agreed)
        if world.main:
            print(best_line(record.best_prec1, record.best_epoch, cfg.epochs))
        return EXIT_OK
    except CheckpointError as error:  # a checkpoint could not be written: the log and metrics go back to the last one
        if world.main:
            back_to_last_checkpoint(run, log, record)
            log.write(f"Stopped: {error}", echo=False)
        raise
    except DatasetError as error:  # a damaged image found mid-epoch: the last checkpoint stays
        saver.wait()
        log.write(f"Stopped: {error}. The checkpoint of the last complete epoch is {run.checkpoint}; resume with: "
                  f"{resume_command(request, run, world, folder.path, cfg.dataset)}", echo=False)
        raise
    finally:
        stop.restore()
        try:
            saver.wait()  # a checkpoint is complete (or its error raised) before the run ends
        finally:
            log.close()


def deployed_pending(cfg, run, resumed, world) -> bool:
    """Whether a finished run still owes the deployed network of its best epoch (a stop
    came between the last epoch and that evaluation): what metrics.csv says, on rank 0."""
    pending = False
    if world.main and cfg.recalibrate and resumed.best_epoch:
        try:
            rows = run.read_metrics()
        except (OSError, KeyError, ValueError, TypeError):
            rows = []
        best = [row for row in rows if row["epoch"] == resumed.best_epoch]
        pending = not best or best[0]["deployed_prec1"] is None
    return distributed.gather(pending, world)[0]


def deploy_the_best(run, run_id, record, model, cfg, recalibration, test_batches, device, world, ranks, log, events,
                    stopped=lambda: False):
    """After the last epoch: the deployed network of the best epoch, the network in
    model_best.pth.tar with BatchNorm statistics of its own (what --export writes of
    it), evaluated; its figures go into the best epoch's row of metrics.csv and a line of
    the log. Rank 0 reads the file and gives the others its network. ``stopped()``: a
    stop came during the evaluation, whose figures are then not written."""
    state = None
    if world.main:
        fields = checkpoint.peek(run.best)
        if fields and fields["epoch"] == record.best_epoch and fields["run_id"] == run_id:
            state = checkpoint.read(run.best, map_location=device, purpose="evaluated").model
    if not distributed.gather(state is not None, world)[0]:
        log.write(f"The deployed network of the best epoch {record.best_epoch} is not evaluated: there is no "
                  f"model_best.pth.tar of it")
        return
    if state is not None:
        model.load_state_dict(state)
    distributed.broadcast_(list(model.state_dict().values()), world)
    result = engine.evaluate_deployed(model, None, recalibration, test_batches, cfg.bf16, ranks.total)
    if stopped():
        return
    row = record.history[record.best_epoch - 1]
    row.update(deployed_columns(result))
    log.write(deployed_line(result, record.best_epoch))
    if world.main:
        run.write_metrics(record.history)
        if events:
            tensorboard.write_deployed(run.tensorboard, row, run.record)


def best_of_source(run, resumed, path, run_id, cfg):
    """Give a forked or rewound run the model_best.pth.tar of its best epoch, which lies
    before its starting point: the source run's, if it is of that epoch. True if the run
    has it (a rewound run keeps its own; a fork gets a copy, named as the new run)."""
    source = run_dir_of(path)
    fields = checkpoint.peek(source.best)
    if not fields or fields["epoch"] != resumed.best_epoch or fields["run"] != resumed.run or \
            fields["run_id"] != resumed.run_id:  # of the same run, not of another of the same name
        return False
    if os.path.abspath(source.best) != os.path.abspath(run.best):
        best = checkpoint.read(source.best, purpose="forked")
        checkpoint.write(replace(best, config=cfg, run=run.name, run_id=run_id).to_file(), run.best, run.record)
    return True


def rank_state(train_batches, ranks, device):
    """What one rank draws from: its global generators, its shards' augmentation and
    order, its training draws (the evaluation's draws are seeded by the epoch)."""
    data = train_batches.state_dict() if hasattr(train_batches, "state_dict") else None  # else: the rng, or none
    return {"rng": seeds.rng_states(device), "data": data, "draws": [g.get_state() for g in ranks.generators]}


def restore_rank(state, train_batches, ranks, device, path):
    """Go on drawing where the rank stopped; CheckpointError if the states saved do not fit
    this run (a hand-made or damaged file)."""
    try:
        if len(state["draws"]) != len(ranks.generators):
            raise ValueError(f"{len(state['draws'])} generators of draws for {len(ranks.generators)} virtual ranks")
        seeds.set_rng_states(state["rng"], device)
        if state["data"] is not None:
            train_batches.load_state_dict(state["data"])
        for generator, saved in zip(ranks.generators, state["draws"]):
            generator.set_state(saved.cpu())
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        detail = f"no {error}" if isinstance(error, KeyError) else str(error).splitlines()[0][:200]
        raise CheckpointError(f"{path}: the random states of its ranks cannot be restored ({detail}): it was not "
                              f"written whole by this program; resume from another checkpoint") from None


def diverged_because(trained, val, model, opt):
    """Why the run cannot go on (a non-finite loss, or non-finite values in the network
    or in VISPA's state), or None."""
    if not (math.isfinite(trained["loss"]) and math.isfinite(val["loss"])):
        return f"train loss {trained['loss']}, val loss {val['loss']}"
    if not engine.state_is_finite(model, opt):
        return "non-finite values in the network or in VISPA's M, Z or momenta"
    return None


def back_to_last_checkpoint(run, log, record):
    """After a failed checkpoint write: metrics.csv and the log's best line say what the
    checkpoint on disk holds, so that nothing claims epochs a resume would not find."""
    record.back_to((checkpoint.peek(run.checkpoint) or {}).get("epoch") or 0)
    log.set_best(record.best_prec1, record.best_epoch)
    try:
        run.write_metrics(record.history)
    except OSError:
        pass  # the disk that refused the checkpoint may refuse this too; the error says so
