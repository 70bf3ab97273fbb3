"""A run's files and what they mean: the one place that knows their names and formats.

    results/<name>.txt                  the log, for people; its last line is always
                                        ``Best Prec@1: <v> (epoch <e>/<E>)`` (utils/runlog.py)
    results/<name>/config.json          the run's settings (config.Config)
    results/<name>/metrics.csv          one row per finished epoch, for machines
    results/<name>/checkpoint.pth.tar   everything the run needs to go on after its last epoch
    results/<name>/model_best.pth.tar   the best epoch's network and distribution (no momenta)
    results/<name>/console.log          what a run started by the benchmark scripts printed
    results/<name>/.lock                held (flock) by the process that writes the run; the
                                        kernel lets go of it when that process ends, however

Exit statuses of main.py: 0 done; 1 an error (one line on stderr); 2 a bad command
line; 3 the training diverged; 128 + the signal number after SIGINT / SIGTERM.
"""
import csv
import errno
import fcntl
import json
import math
import os
import re
import signal
import tempfile
from dataclasses import dataclass

from .runlog import parse_best_line

CHECKPOINT, BEST = "checkpoint.pth.tar", "model_best.pth.tar"
METRICS, CONFIG, CONSOLE, LOCK = "metrics.csv", "config.json", "console.log", ".lock"

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DIVERGED = 0, 1, 2, 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_stopped(signum):
    return 128 + signum


STOPPED = tuple(exit_stopped(s) for s in STOP_SIGNALS)

# The columns of metrics.csv and how each number is written there (and in the log). The
# calibration of the L-sample predictive ("val_") and of the mean network ("mean_"): NLL,
# ECE in percent, Brier (utils/meters.py); empty in the rows of runs from before them.
CSV_FORMATS = {"epoch": "{}", "lr": "{:.6f}", "train_loss": "{:.4f}", "train_prec1": "{:.2f}",
               "train_prec5": "{:.2f}", "val_loss": "{:.4f}", "val_prec1": "{:.2f}", "val_prec5": "{:.2f}",
               "val_nll": "{:.4f}", "val_ece": "{:.2f}", "val_brier": "{:.4f}",
               "mean_prec1": "{:.2f}", "mean_nll": "{:.4f}", "mean_ece": "{:.2f}", "mean_brier": "{:.4f}",
               "best_prec1": "{:.2f}", "best_epoch": "{}", "seconds": "{:.1f}"}
CSV_FIELDS = tuple(CSV_FORMATS)
CALIBRATION_FIELDS = ("val_nll", "val_ece", "val_brier", "mean_nll", "mean_ece", "mean_brier")


def formatted(row: dict) -> dict:
    """A history row (numbers) as metrics.csv and the log write it."""
    return {key: "" if row.get(key) is None else fmt.format(row[key]) for key, fmt in CSV_FORMATS.items()}


def calibration(nll, ece, brier) -> str:
    """``NLL 0.1234  ECE 1.23  Brier 0.0123``: how the log and --evaluate print them."""
    return f"NLL {nll:.4f}  ECE {ece:.2f}  Brier {brier:.4f}"


def epoch_line(row: dict, epochs: int, L: int) -> str:
    """The log's line for one epoch."""
    r = formatted(row)
    return (f"Epoch {r['epoch']}/{epochs}  lr {r['lr']}  "
            f"train loss {r['train_loss']} Prec@1 {r['train_prec1']} Prec@5 {r['train_prec5']}  |  "
            f"val loss {r['val_loss']} Prec@1 {r['val_prec1']} Prec@5 {r['val_prec5']} (L={L}) "
            f"{calibration(row['val_nll'], row['val_ece'], row['val_brier'])}  |  "
            f"mean-net Prec@1 {r['mean_prec1']} {calibration(row['mean_nll'], row['mean_ece'], row['mean_brier'])}  |  "
            f"best {r['best_prec1']} (epoch {r['best_epoch']})  |  {r['seconds']} s")


def valid_run_name(name: str) -> bool:
    """A run's name is a folder name in the results folder: not empty, no '/', not
    starting with '.', and printable (a newline would break the log and the summaries)."""
    return (bool(name.strip(". ")) and "/" not in name and not name.startswith(".")
            and name.isprintable() and name == name.strip())


class RunInUse(Exception):
    """Another process holds the run's lock."""


class NotARun(Exception):
    """A file where a run would write that this program did not write (a symbolic link,
    a file of the user's): it is never written through, replaced or removed."""


# The first line of every log: what only this program writes, and the run's identity.
LOG_HEADER = re.compile(r"VISPA run (?P<name>.*?)(?: \(id (?P<id>[0-9a-f]+)\))?: ")


def log_header(name: str, run_id: str, command: str) -> str:
    return f"VISPA run {name} (id {run_id}): {command}"


@dataclass
class RunStatus:
    """Where a run stands, from its files."""
    name: str
    epoch: int            # the last finished epoch (0 before the first one)
    epochs: int           # the run's length
    best_prec1: float
    best_epoch: int
    mean_prec1: float     # the mean network's top-1 in the best epoch (None if unknown)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs


class RunDir:
    """The files of the run ``name`` in ``results_dir``."""

    def __init__(self, results_dir: str, name: str):
        self.results_dir, self.name = results_dir, name
        self.folder = os.path.join(results_dir, name)
        self.log = self.folder + ".txt"
        self.checkpoint = os.path.join(self.folder, CHECKPOINT)
        self.best = os.path.join(self.folder, BEST)
        self.metrics = os.path.join(self.folder, METRICS)
        self.config = os.path.join(self.folder, CONFIG)
        self.console = os.path.join(self.folder, CONSOLE)
        self.tensorboard = os.path.join(self.folder, "tb")  # --tensorboard's event files

    def holds_run(self) -> bool:
        """A folder holds a run once it has a checkpoint, a row of metrics or a logged
        epoch (the checkpoints may have been deleted to save space): a start that failed
        before (a wrong path, a kill while starting) leaves nothing that must be kept."""
        if any(os.path.exists(p) for p in (self.checkpoint, self.best)):
            return True
        try:
            with open(self.metrics) as f:
                if len(f.read().splitlines()) > 1:
                    return True
        except OSError:
            pass
        try:
            with open(self.log, errors="replace") as f:
                return any(line.startswith("Epoch ") for line in f)
        except OSError:
            return False

    def files(self):
        """The run's own files, where they would be."""
        return [self.log, self.checkpoint, self.best, self.metrics, self.config, self.console,
                os.path.join(self.folder, LOCK)]

    def check_ours(self):
        """NotARun unless every file of the run that exists is one this program wrote: a
        regular file (not a symbolic link, which a write would follow), the log starting
        with its header line, metrics.csv with its header, config.json a JSON object, the
        checkpoints of this program's format. Called before anything is written: even
        --overwrite replaces only what a run wrote."""
        for path in self.files():
            if os.path.islink(path):
                raise NotARun(f"{path} is a symbolic link: a run never writes through a link it did not make; "
                              f"remove it, or choose another --save")
            if os.path.lexists(path) and not os.path.isfile(path):
                raise NotARun(f"{path} is not a file: choose another --save")
        for path, ours in ((self.log, _is_a_log), (self.metrics, _is_metrics), (self.config, _is_settings),
                           (self.checkpoint, _is_checkpoint), (self.best, _is_checkpoint)):
            if os.path.isfile(path) and os.path.getsize(path) and not ours(path):
                raise NotARun(f"{path} exists and was not written by a run of this program: it is never "
                              f"replaced, even with --overwrite; move it, or choose another --save")

    def identity(self):
        """The run id on the first line of the log (None: no log, or one written before
        runs had an id)."""
        try:
            with open(self.log, "rb") as f:
                first = f.readline(4096).decode("utf-8", errors="replace")
        except OSError:
            return None
        found = LOG_HEADER.match(first)
        return found.group("id") if found else None

    def in_use(self) -> bool:
        """Whether a process holds the run's lock now (without taking it)."""
        try:
            fd = os.open(os.path.join(self.folder, LOCK), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def lock(self):
        """Hold the run's lock for the life of this process: a second process that would
        write the same run is refused (RunInUse). The folder is created if need be."""
        os.makedirs(self.folder, exist_ok=True)
        try:
            fd = os.open(os.path.join(self.folder, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise NotARun(f"{os.path.join(self.folder, LOCK)} is a symbolic link: a run never writes "
                              f"through a link it did not make") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUse(f"{self.folder} is in use by another run (process {holder}); wait for it "
                           f"to end, or choose another --save") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def prepare(self, start_over: bool):
        """Create the folder (or take over an existing one): check that it can be written,
        remove what writes killed midway left (temporary files) and, with ``start_over``,
        the previous run's files."""
        os.makedirs(self.folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=self.folder)
        os.close(fd)
        os.unlink(probe)
        leftovers = [os.path.join(self.folder, name) for name in os.listdir(self.folder)
                     if name.endswith(".tmp") and (name.startswith((f"{METRICS}.", f"{CONFIG}.")) or
                                                   name.startswith((f".{CHECKPOINT}.", f".{BEST}.")))]
        if start_over:
            leftovers += [p for p in (self.checkpoint, self.best, self.metrics, self.config, self.log)
                          if os.path.exists(p)]
        for path in leftovers:
            os.unlink(path)

    def write_metrics(self, history):
        _write_atomic(self.metrics, lambda f: _write_csv(f, history))

    def write_config(self, settings: dict):
        _write_atomic(self.config, lambda f: f.write(json.dumps(settings, indent=1) + "\n"))

    def read_metrics(self) -> list:
        """The rows of metrics.csv with numbers for numbers; ValueError for a value that
        is not a finite number, or a column that is missing."""
        def number(row, key, fmt):
            if key in CALIBRATION_FIELDS and not row.get(key):  # a run from before them
                return None
            return int(row[key]) if fmt == "{}" else float(row[key])
        with open(self.metrics, newline="") as f:
            rows = [{key: number(row, key, fmt) for key, fmt in CSV_FORMATS.items()} for row in csv.DictReader(f)]
        if not all(math.isfinite(value) for row in rows for value in row.values() if value is not None):
            raise ValueError(f"{self.metrics} holds a value that is not a finite number")
        return rows

    def status(self):
        """The RunStatus from metrics.csv and config.json (an older run without
        config.json: the run's length from the log's last line); None if the folder
        holds no metrics."""
        try:
            rows = self.read_metrics()
        except (OSError, KeyError, ValueError, TypeError):
            return None
        epochs = None
        try:
            with open(self.config) as f:
                epochs = int(json.load(f)["epochs"])
        except (OSError, KeyError, ValueError, TypeError):
            best = _last_line(self.log)
            epochs = best[2] if best else None
        if epochs is None:
            return None
        if not rows:
            return RunStatus(self.name, 0, epochs, 0.0, 0, None)
        last = rows[-1]
        at_best = next((r for r in rows if r["epoch"] == last["best_epoch"]), None)
        return RunStatus(self.name, last["epoch"], epochs, last["best_prec1"], last["best_epoch"],
                         at_best["mean_prec1"] if at_best else None)


def run_dir_of(checkpoint_or_folder: str) -> RunDir:
    """The RunDir that holds a checkpoint file, or the one that is this folder."""
    path = os.path.abspath(checkpoint_or_folder)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return RunDir(os.path.dirname(folder), os.path.basename(folder))


def _write_csv(f, history):
    writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(formatted(row) for row in history)


def _write_atomic(path, write):
    """Write through a new temporary file renamed over ``path`` (which replaces a link at
    ``path`` rather than writing through it)."""
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path))
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w", newline="") as f:
            write(f)
        os.replace(tmp, path)
    except OSError:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _first_line(path):
    with open(path, "rb") as f:
        return f.readline(4096).decode("utf-8", errors="replace")


def _is_a_log(path):
    return LOG_HEADER.match(_first_line(path)) is not None


def _is_metrics(path):
    return _first_line(path).startswith("epoch,lr,train_loss,")  # this version's columns, or an older one's


def _is_settings(path):
    try:
        with open(path) as f:
            return isinstance(json.load(f), dict)
    except (OSError, ValueError):
        return False


def _is_checkpoint(path):
    with open(path, "rb") as f:
        return f.read(2) == b"PK"  # torch's zip format; what it holds is checked when it is read


def _last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return parse_best_line(lines[-1]) if lines else None
