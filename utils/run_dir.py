"""A run's files and what they mean: the one place that knows their names and formats.

    results/<name>.txt                  the log, for people; its last line is always
                                        ``Best Prec@1: <v> (epoch <e>/<E>)`` (utils/runlog.py)
    results/<name>/config.json          the run's settings (config.Config)
    results/<name>/metrics.csv          one row per finished epoch, for machines
    results/<name>/checkpoint.pth.tar   everything the run needs to go on after its last epoch
    results/<name>/model_best.pth.tar   the best epoch's network and distribution (no momenta)
    results/<name>/tb/                  TensorBoard events (--tensorboard), one file per epoch
    results/<name>/console.log          what a run started by the benchmark scripts printed
    results/<name>/.lock                held (flock) by the process that writes the run; the
                                        kernel lets go of it when that process ends, however
    results/<name>/.manifest.json       the record of every file the run wrote: the files that
                                        are its own (utils/manifest.py)

The rule every writer here obeys: a file is replaced only by rename, and only if it is
the writer's own (a run's: listed in its record and unchanged; a single output file of
--export, --predictions or utils.plot: ``check_output``); a file no one of ours wrote is
never replaced or deleted, --overwrite included.

Exit statuses of main.py: 0 done; 1 an error (one line on stderr); 2 a bad command
line; 3 the training diverged; 128 + the signal number after SIGINT / SIGTERM.
"""
import csv
import errno
import fcntl
import io
import json
import math
import os
import re
import signal
import stat
import tempfile
from dataclasses import dataclass

from .files import TEMPORARY, FileError, load, write_text_atomic
from .manifest import NAME, ForeignRecord, Manifest, identity_of
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
# The deployed network ("deployed_": sign(M) with BatchNorm statistics of its own) is
# evaluated at the end of a run, for its best epoch, or after every epoch with
# --deployed-every-epoch: its columns are empty in the other rows.
CSV_FORMATS = {"epoch": "{}", "lr": "{:.6f}", "train_loss": "{:.4f}", "train_prec1": "{:.2f}",
               "train_prec5": "{:.2f}", "val_loss": "{:.4f}", "val_prec1": "{:.2f}", "val_prec5": "{:.2f}",
               "val_nll": "{:.4f}", "val_ece": "{:.2f}", "val_brier": "{:.4f}",
               "mean_prec1": "{:.2f}", "mean_nll": "{:.4f}", "mean_ece": "{:.2f}", "mean_brier": "{:.4f}",
               "deployed_prec1": "{:.2f}", "deployed_nll": "{:.4f}", "deployed_ece": "{:.2f}",
               "deployed_brier": "{:.4f}",
               "best_prec1": "{:.2f}", "best_epoch": "{}", "seconds": "{:.1f}"}
CSV_FIELDS = tuple(CSV_FORMATS)
CALIBRATION_FIELDS = ("val_nll", "val_ece", "val_brier", "mean_nll", "mean_ece", "mean_brier")
DEPLOYED_FIELDS = ("deployed_prec1", "deployed_nll", "deployed_ece", "deployed_brier")
OPTIONAL_FIELDS = CALIBRATION_FIELDS + DEPLOYED_FIELDS  # empty in some rows (older runs, epochs without)


def formatted(row: dict) -> dict:
    """A history row (numbers) as metrics.csv and the log write it."""
    return {key: "" if row.get(key) is None else fmt.format(row[key]) for key, fmt in CSV_FORMATS.items()}


def calibration(nll, ece, brier) -> str:
    """``NLL 0.1234  ECE 1.23  Brier 0.0123``: how the log and --evaluate print them."""
    return f"NLL {nll:.4f}  ECE {ece:.2f}  Brier {brier:.4f}"


def epoch_line(row: dict, epochs: int, L: int) -> str:
    """The log's line for one epoch."""
    r = formatted(row)
    deployed = "" if row.get("deployed_prec1") is None else (
        f"deployed Prec@1 {r['deployed_prec1']} "
        f"{calibration(row['deployed_nll'], row['deployed_ece'], row['deployed_brier'])}  |  ")
    return (f"Epoch {r['epoch']}/{epochs}  lr {r['lr']}  "
            f"train loss {r['train_loss']} Prec@1 {r['train_prec1']} Prec@5 {r['train_prec5']}  |  "
            f"val loss {r['val_loss']} Prec@1 {r['val_prec1']} Prec@5 {r['val_prec5']} (L={L}) "
            f"{calibration(row['val_nll'], row['val_ece'], row['val_brier'])}  |  "
            f"mean-net Prec@1 {r['mean_prec1']} {calibration(row['mean_nll'], row['mean_ece'], row['mean_brier'])}  |  "
            f"{deployed}best {r['best_prec1']} (epoch {r['best_epoch']})  |  {r['seconds']} s")


def deployed_line(result: dict, epoch=None) -> str:
    """How the log and --evaluate give the deployed network's results."""
    of = f" of epoch {epoch}" if epoch is not None else ""
    return (f"Deployed network{of}, sign(M) with BatchNorm statistics recomputed on {result['images']:,} training "
            f"images: Prec@1 {result['prec1']:.2f}  Prec@5 {result['prec5']:.2f}  "
            f"{calibration(result['nll'], result['ece'], result['brier'])}")


FLOAT32_MAX = 3.4028234663852886e38
MAX_NAME_BYTES = 200  # with ".txt" and a temporary file's ".<name>.<12 hex>.tmp", within 255


def valid_run_name(name: str) -> bool:
    """A run's name is a folder name in the results folder: not empty, no '/', not
    starting with '.', and printable (a newline would break the log and the summaries).
    A new run's name must also be short enough for the names of its files
    (``MAX_NAME_BYTES``; runs of earlier versions may have longer ones)."""
    return (bool(name.strip(". ")) and "/" not in name and not name.startswith(".")
            and name.isprintable() and name == name.strip())


class RunInUse(Exception):
    """Another process holds the run's lock."""


class NotOurs(Exception):
    """A file where this program would write that it did not write (a symbolic link, a
    file of the user's, a file changed since): it is never written through, replaced or
    removed."""


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
    deployed_prec1: float = None  # the deployed network's top-1 in the best epoch (None if not evaluated)

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs


class RunDir:
    """The files of the run ``name`` in ``results_dir``.

    Which files are the run's own is decided by its record (``utils/manifest.py``), never
    by what a file holds: a file here that the record does not list, unchanged, is
    foreign, and nothing replaces or deletes it. Every file is replaced by rename."""

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
        self.record = None  # the record of the run's files, once the folder is taken (prepare)

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
        """The files a run replaces or deletes, where they would be: its log, checkpoints,
        metrics and settings, and its TensorBoard events."""
        return [self.log, self.checkpoint, self.best, self.metrics, self.config] + self.events()

    def events(self):
        """The files in tb/ (none if it is not a folder)."""
        if os.path.islink(self.tensorboard) or not os.path.isdir(self.tensorboard):
            return []
        return [os.path.join(self.tensorboard, name) for name in sorted(os.listdir(self.tensorboard))]

    def read_record(self):
        """The record of the run's files: the folder's ``.manifest.json``; for a run of an
        earlier version of this program, which kept none, one made from its files when
        they show that they belong together (the run id on the log's first line is the one
        its checkpoint carries); else None. NotOurs if the record is not one of ours."""
        try:
            record = Manifest.read(self.folder)
        except ForeignRecord as error:
            raise NotOurs(str(error)) from None
        return record if record is not None else self._record_of_earlier_version()

    def _record_of_earlier_version(self):
        logged = self.identity()
        if logged is None or logged not in (_run_id_of(self.checkpoint), _run_id_of(self.best)):
            return None
        record = Manifest(self.folder, self.name, logged)
        settings = _field_of(self.checkpoint, "config") or _field_of(self.best, "config")
        carries_the_id = lambda path: _run_id_of(path) == logged  # noqa: E731
        looks_ours = ((self.log, _is_a_log), (self.metrics, _is_metrics),
                      (self.config, lambda path: settings is not None and _settings_in(path) == settings),
                      (self.checkpoint, carries_the_id), (self.best, carries_the_id))
        found = [path for path, test in looks_ours if _regular(path) and test(path)]
        found += [path for path in self.events() if _regular(path) and ".tfevents." in os.path.basename(path)]
        record.entries = {record._key(path): [identity_of(path)] for path in found}
        return record

    def check_ours(self, tensorboard=False):
        """NotOurs unless every file here that a run would replace or delete is this
        run's own (listed in its record, unchanged), its lock is a lock, and, where the run
        writes TensorBoard events, tb/ is a folder. Called before anything is written or
        deleted: even --overwrite replaces only what the run wrote."""
        try:
            self._check_ours(tensorboard)
        except NotOurs:
            if getattr(self, "_lock_fd", None) is None and self.in_use():  # another process is writing it now
                raise RunInUse(f"{self.folder} is in use by another run; wait for it to end, or choose another "
                               f"--save") from None
            raise

    def _check_ours(self, tensorboard):
        record = self.read_record()
        if tensorboard and os.path.lexists(self.tensorboard) and \
                (os.path.islink(self.tensorboard) or not os.path.isdir(self.tensorboard)):
            raise NotOurs(f"{self.tensorboard} is {'a symbolic link' if os.path.islink(self.tensorboard) else 'not a folder'}: "
                          f"a run writes its TensorBoard events into a folder tb/ of its own; move it, or choose "
                          f"another --save")
        leftovers = set(self._leftovers())  # of a write that was killed: removed when the run starts
        for path in self.files():
            if os.path.lexists(path) and path not in leftovers and not (record is not None and record.owns(path)):
                raise NotOurs(foreign(path, "a run"))
        lock = os.path.join(self.folder, LOCK)
        if os.path.lexists(lock) and not _is_a_lock(lock):
            raise NotOurs(_not_a_lock(lock))

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
        write the same run is refused (RunInUse). The folder is created if need be. The
        lock file holds the process id, written only into a lock file that has no other
        name (a hard link is never written through)."""
        os.makedirs(self.folder, exist_ok=True)
        path = os.path.join(self.folder, LOCK)
        if os.path.lexists(path) and not _is_a_lock(path):
            raise NotOurs(_not_a_lock(path))
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise NotOurs(f"{path} is a symbolic link: a run never writes through a link it did not make") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunInUse(f"{self.folder} is in use by another run (process {holder}); wait for it "
                           f"to end, or choose another --save") from None
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def prepare(self, run_id: str, start_over: bool, new: bool, tensorboard: bool = False):
        """Take the folder (locked, its files checked: ``check_ours``): check that it (and
        tb/, where the run writes events there) can be written, remove what writes killed
        midway left (temporary files of ours only, by their exact names), with
        ``start_over`` the previous run's files, and keep the record of the run's files
        from now on (a ``new`` run starts its own)."""
        os.makedirs(self.folder, exist_ok=True)
        for folder in [self.folder] + ([self.tensorboard] if tensorboard and os.path.isdir(self.tensorboard) else []):
            try:
                fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
            except OSError as error:
                raise OSError(error.errno, error.strerror, folder) from None
            os.close(fd)
            os.unlink(probe)
        record = self.read_record() or Manifest(self.folder, self.name, run_id)
        for path in self._leftovers():
            os.unlink(path)
        if start_over:
            for path in self.files():
                if record.owns(path):
                    record.remove(path)
            if os.path.isdir(self.tensorboard) and not os.path.islink(self.tensorboard) and \
                    not os.listdir(self.tensorboard):
                os.rmdir(self.tensorboard)
        if new:
            record.start_over(self.name, run_id)
        else:
            record._save()  # a run of an earlier version: its record from now on
        self.record = record

    def _leftovers(self):
        """Temporary files of interrupted writes of this run's files: hidden, named after
        one of them with 12 hex digits of their own, regular files with no other name."""
        names = {os.path.basename(p) for p in (self.checkpoint, self.best, self.metrics, self.config)}
        places = [(self.folder, names | {NAME}), (self.results_dir, {os.path.basename(self.log)})]
        if os.path.isdir(self.tensorboard) and not os.path.islink(self.tensorboard):
            places.append((self.tensorboard, None))
        found = []
        for folder, wanted in places:
            for name in (os.listdir(folder) if os.path.isdir(folder) else []):
                match = TEMPORARY.fullmatch(name)
                path = os.path.join(folder, name)
                if match and (match.group("name").startswith("events.out.tfevents.") if wanted is None else
                              match.group("name") in wanted) and _regular(path):
                    found.append(path)
        return found

    def write_metrics(self, history):
        write_text_atomic(_csv_text(history), self.metrics, self.record)

    def write_config(self, settings: dict):
        write_text_atomic(json.dumps(settings, indent=1) + "\n", self.config, self.record)

    def read_metrics(self) -> list:
        """The rows of metrics.csv with numbers for numbers; ValueError for a value that
        is not a finite number, or a column that is missing."""
        def number(row, key, fmt):
            if key in OPTIONAL_FIELDS and not row.get(key):  # a run from before them, an epoch without
                return None
            return int(row[key]) if fmt == "{}" else float(row[key])
        with open(self.metrics, newline="") as f:
            rows = [{key: number(row, key, fmt) for key, fmt in CSV_FORMATS.items()} for row in csv.DictReader(f)]
        if not all(math.isfinite(value) and abs(value) <= FLOAT32_MAX for row in rows for value in row.values()
                   if value is not None):  # what a run computes: float32's numbers; summing them cannot overflow
            raise ValueError(f"{self.metrics} holds a value that is not a finite number of float32's range")
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
                         at_best["mean_prec1"] if at_best else None, at_best.get("deployed_prec1") if at_best else None)


def foreign(path: str, writer: str) -> str:
    """The refusal to replace or delete a file that ``writer`` did not write."""
    if os.path.islink(path):
        return (f"{path} is a symbolic link: {writer} never writes through a link it did not make; remove it, "
                f"or choose another name")
    if not os.path.isfile(path):
        return f"{path} is not a file: {writer} writes files only; choose another name"
    return (f"{path} exists and was not written by {writer} of this program (or was changed since): it is never "
            f"replaced or deleted, even with --overwrite; move it, or choose another name")


def _not_a_lock(path: str) -> str:
    if os.path.islink(path):
        return f"{path} is a symbolic link: a run never writes through a link it did not make; remove it"
    return (f"{path} is not a lock of this program (not a file, or it holds something other than a process id): "
            f"it is never written; move it, or choose another --save")


# ---- the files a command writes outside a run: --export's --out, --predictions, utils.plot's --out ----

RUN_FILE_NAMES = (CHECKPOINT, BEST, METRICS, CONFIG, CONSOLE, LOCK, NAME, "tb")


def check_output(path: str, overwrite: bool, is_ours, what: str, kind: str):
    """NotOurs unless a command may write its one output file at ``path``: a new file in
    a folder that exists, or with ``overwrite`` a file that ``is_ours(path)`` recognises
    as ``kind``, one this program writes (its format and digest); never a link, a
    folder, a file of a run or a name a run uses in its folder, nor anything in the folder
    of a run being trained. True where ``path`` is a new file. Checked again just before the
    file is written by ``utils.files.write_atomic`` (minutes may have passed), with
    ``new_only`` where it is new, so that a file that appeared meanwhile is kept."""
    if not path:
        raise NotOurs(f"{what} needs a file name, got an empty one (an unset shell variable?)")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise NotOurs(f"cannot write {what} {path}: the folder {folder} does not exist")
    if os.path.islink(path):
        raise NotOurs(f"{what} {path} is a symbolic link: it is never written through; remove it, or choose another")
    if os.path.isdir(path):
        raise NotOurs(f"{what} {path} is a folder: give a file name")
    folder = os.path.realpath(folder)  # a link to a run's folder, or to its tb/, is that folder
    holder = RunDir(os.path.dirname(folder), os.path.basename(folder))
    in_run_folder = any(os.path.lexists(os.path.join(folder, name)) for name in (LOCK, NAME))
    name = os.path.basename(path)
    log_of = RunDir(folder, name[:-len(".txt")]) if name.endswith(".txt") else None
    if (in_run_folder and name in RUN_FILE_NAMES) or \
            (log_of is not None and (os.path.lexists(os.path.join(log_of.folder, NAME)) or log_of.holds_run())):
        raise NotOurs(f"{what} {path} is a file of a run: choose another")
    above = os.path.dirname(folder)
    if os.path.basename(folder) == "tb" and any(os.path.lexists(os.path.join(above, n)) for n in (LOCK, NAME)):
        raise NotOurs(f"{what} {path} is in the TensorBoard folder of the run {above}, whose files it replaces: "
                      f"choose another folder")
    if holder.in_use():
        raise NotOurs(f"{folder} is the folder of a run being trained now: write {what} elsewhere, or wait")
    if os.path.lexists(path):
        if not overwrite:
            raise NotOurs(f"{path} exists: choose another {what}, or add --overwrite to replace it")
        if not is_ours(path):
            raise NotOurs(f"{path} exists and is not {kind} this program wrote (or was changed since): --overwrite "
                          f"replaces only those; move it, or choose another {what}")
        return False
    return True


def run_dir_of(checkpoint_or_folder: str) -> RunDir:
    """The RunDir that holds a checkpoint file, or the one that is this folder."""
    path = os.path.abspath(checkpoint_or_folder)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    return RunDir(os.path.dirname(folder), os.path.basename(folder))


def _csv_text(history) -> str:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS)
    writer.writeheader()
    writer.writerows(formatted(row) for row in history)
    return text.getvalue()


def _regular(path):
    """A regular file (not a link, not a folder) with no other name."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1


def _is_a_lock(path):
    """A regular file holding nothing but a process id (or nothing)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 32:
            return False
        with open(path, "rb") as f:
            return re.fullmatch(rb"\s*\d*\s*", f.read(64)) is not None
    except OSError:
        return False


def _field_of(checkpoint_path, name):
    """A plain field of a checkpoint of ours (read without its tensors), or None."""
    if not os.path.isfile(checkpoint_path):
        return None
    try:
        return load(checkpoint_path, mmap=True).get(name)
    except FileError:
        return None


def _run_id_of(checkpoint_path):
    """The run id a checkpoint of ours carries, or None."""
    found = _field_of(checkpoint_path, "run_id")
    return found if isinstance(found, str) else None


def _first_line(path):
    with open(path, "rb") as f:
        return f.readline(4096).decode("utf-8", errors="replace")


def _is_a_log(path):
    return LOG_HEADER.match(_first_line(path)) is not None


def _is_metrics(path):
    return _first_line(path).startswith("epoch,lr,train_loss,")  # this version's columns, or an older one's


def _settings_in(path):
    """The settings a config.json holds, or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _last_line(path):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = f.read().decode("utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return parse_best_line(lines[-1]) if lines else None
