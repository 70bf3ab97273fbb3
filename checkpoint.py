"""A run's checkpoint: what it holds, how it is written and read back, every field checked,
and the versions it has had. The one place that knows its fields, as config.py knows the
settings.

    state = Checkpoint(config=cfg, run="r18", run_id=..., epoch=3, model=..., optimizer=..., ...)
    saver.submit([(state.to_file(), path)])           # utils.files.BackgroundSaver(write)
    state = read(path, map_location=device, purpose="resumed")
    fields = peek(path)                                # epoch, epochs, run, ... without tensors

A file is a dict of plain data (``utils/files.py``) with a content digest; ``read`` checks
the digest, then every field's type and range (a digest is a checksum, not a schema: a
hand-made file with a fresh digest must not train with a negative epoch), migrates older
versions, and gives a ``Checkpoint``.

Versions:
- 1 (files without "version"): a ResNet18 then had a ReLU after the stem, which the
  authors' network does not have (refused); VGG16 files can be evaluated, not resumed
  (their draws came from torch's global generator).
- 2: the authors' stem; VISPA's own generator of draws; a content digest.
- 3: the run's identity (``run_id``, also on the first line of its log) and the CPU
  thread count it computes with; the evaluation draws are seeded by the epoch.
- 4: the metrics of every epoch hold the calibration of the predictive and of the mean
  network (NLL, ECE, Brier); rows of older files have None there.
- 5: the metrics hold the deployed network's figures (None in the rows of epochs where
  it was not evaluated, and in the rows of older files).
- 6: a run on images of one's own holds its class names (``classes``, in the order of
  the labels), so that a data folder with other classes is refused instead of read with
  shifted labels; None for the paper's datasets and in older files. Every run holds its
  training steps per epoch (``steps``), so that a resume on other data is refused.
"""
import math
from dataclasses import dataclass, replace

import torch

from config import Config
from optim import has_memory, without_memory
from utils import files
from utils.files import FileError
from utils.run_dir import CALIBRATION_FIELDS, CSV_FIELDS, DEPLOYED_FIELDS, OPTIONAL_FIELDS, valid_run_name

FORMAT = "vispa-checkpoint"
VERSION = 6
MAX_THREADS = 1024  # a CPU thread count a machine can have; more is a hand-made file


class CheckpointError(FileError):
    """A checkpoint that cannot be written or used; the message says why."""


@dataclass
class Checkpoint:
    """Everything a run needs to go on after ``epoch``: its settings and identity, the
    network and VISPA's state (M, Z, momenta, generator), the best epoch and the metrics
    so far, where its log ends, every rank's random state, and where its data was."""
    config: Config
    run: str                      # the run's name (its folder's)
    run_id: str                   # the run's identity: the first line of its log names it
    epoch: int                    # the last finished epoch (0: none yet)
    model: dict                   # the network's state_dict (binary weights: sign(M))
    optimizer: dict               # VISPA's state_dict; without momenta in model_best
    best_prec1: float
    best_epoch: int
    history: list                 # one row of metrics per finished epoch (utils/run_dir.py)
    ranks: list                   # every rank's random states (training.rank_state)
    log_offset: int               # where the log's best line starts
    data_root: str = None         # the folder the run reads its dataset from
    threads: int = None           # the CPU threads it computes with
    classes: list = None          # images of one's own: the class folders' names, label by label
    steps: int = None             # training steps per epoch (of each rank)
    version: int = VERSION

    def to_file(self) -> dict:
        """The dict a file holds (``write`` adds the digest)."""
        content = {"format": FORMAT}
        content.update({f: getattr(self, f) for f in self.__dataclass_fields__})
        content["config"] = self.config.to_dict()
        content["version"] = VERSION
        return content

    @property
    def has_momenta(self) -> bool:
        """Whether the optimizer's memory (momenta, Adam's moments) is here, not only the distribution."""
        return has_memory(self.optimizer)

    def without_momenta(self) -> "Checkpoint":
        """What model_best holds: the distribution, without the optimizer's memory."""
        return replace(self, optimizer=without_memory(self.optimizer))


def write(content: dict, path: str, owner=None):
    """Write a checkpoint's ``to_file()`` content atomically, with its digest (the
    background writer calls this from its thread: the digest of 800 MB takes a while);
    ``owner``: the record of the run whose file it is (``utils/manifest.py``)."""
    try:
        files.save_atomic(files.with_digest(content), path, owner)
    except FileError as error:
        raise CheckpointError(str(error)) from None


def is_ours(obj: dict) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read(path: str, map_location="cpu", purpose="resumed") -> Checkpoint:
    """The checkpoint in ``path``, every field checked (CheckpointError, one line, if it
    is not one of ours, damaged, hand-made with impossible values, or of a version that
    cannot be ``purpose``: "resumed", "evaluated" or "exported")."""
    try:
        obj = files.load(path, map_location=map_location)
    except FileError as error:
        raise CheckpointError(str(error)) from None
    if not is_ours(obj):
        raise CheckpointError(f"{path} is not a checkpoint of this program; only our own checkpoints can "
                              f"be {purpose}")
    return from_file(obj, path, purpose)


def from_file(obj: dict, path: str, purpose: str) -> Checkpoint:
    """A ``Checkpoint`` from the content of one of our files (``is_ours``)."""
    version = obj.get("version", 1)
    if type(version) is not int or version < 1:
        raise CheckpointError(f"{path}: its format version {version!r} is not a version of this program's files "
                              f"(a whole number from 1)")
    if version > VERSION:
        raise CheckpointError(f"{path} was written by a newer version of this program (checkpoint format "
                              f"{version}; this one reads up to {VERSION})")
    if version >= 2:
        try:
            obj = files.verify_digest(obj, path, "a checkpoint")
        except FileError as error:
            raise CheckpointError(str(error)) from None
    if "config" not in obj:
        raise CheckpointError(f"{path} is not a complete checkpoint of this program: it has no 'config'")
    obj = _migrated(dict(obj), version, path, purpose)
    return _checked(obj, path, version)


def _migrated(obj, version, path, purpose):
    """The content of a file of ``version`` as the current version holds it."""
    if version == 1:  # to be evaluated only: the network, its distribution, its settings and epoch
        settings = obj["config"]
        if isinstance(settings, dict):
            obj["config"] = {k: v for k, v in settings.items() if k != "save"}
            if settings.get("model") == "resnet18":
                raise CheckpointError(f"{path} holds a ResNet18 of checkpoint format 1, trained with a ReLU "
                                      f"after the stem that the authors' network does not have: it cannot be "
                                      f"{purpose} by this version, which computes the authors' network")
        if purpose == "resumed":
            raise CheckpointError(f"{path} was written in checkpoint format 1, whose random draws this "
                                  f"version cannot continue exactly: it can be evaluated, not resumed")
        name = settings.get("save") if isinstance(settings, dict) else None
        obj.update(run=name if isinstance(name, str) and valid_run_name(name) else "format-1",
                   best_prec1=0.0, best_epoch=0, history=None, ranks=[{}], log_offset=0)
    if version <= 3 and isinstance(obj.get("history"), list):  # rows from before the calibration
        obj["history"] = [dict({key: None for key in CALIBRATION_FIELDS}, **row) if isinstance(row, dict) else row
                          for row in obj["history"]]
    if version <= 4 and isinstance(obj.get("history"), list):  # rows from before the deployed network
        obj["history"] = [dict({key: None for key in DEPLOYED_FIELDS}, **row) if isinstance(row, dict) else row
                          for row in obj["history"]]
    if version <= 5:  # no class names, no steps per epoch
        obj.setdefault("classes", None)
        obj.setdefault("steps", None)
    if version <= 2:  # no identity, no thread count; the evaluation draws were a generator's state
        obj.setdefault("run_id", None)
        obj.setdefault("threads", None)
        for rank in obj.get("ranks") or []:
            if isinstance(rank, dict):
                rank.pop("evaluation draws", None)
    return obj


# ---- every field, checked -------------------------------------------------------------------------

# The fields every version has (the others have defaults); a missing one is named as such.
_NEEDED = ("config", "run", "epoch", "model", "optimizer", "best_prec1", "best_epoch", "history", "ranks",
           "log_offset")


def _checked(obj, path, version) -> Checkpoint:
    missing = [key for key in _NEEDED if key not in obj]
    if missing:
        raise CheckpointError(f"{path} is not a complete checkpoint of this program: it has no "
                              f"{', '.join(repr(k) for k in missing)}")

    def bad(what):
        return CheckpointError(f"{path} is not a valid checkpoint: {what}")

    if not isinstance(obj["config"], dict):
        raise bad("its settings are not a dict")
    try:
        config = Config.from_dict(obj["config"])
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: its settings cannot be read: {error}") from None
    if not _is_int(obj["epoch"]) or not 0 <= obj["epoch"] <= config.epochs:
        raise bad(f"epoch {obj['epoch']!r} is not a whole number from 0 to the run's {config.epochs} epochs")
    epoch = obj["epoch"]
    if not isinstance(obj["run"], str) or not valid_run_name(obj["run"]):
        raise bad(f"its run name {obj['run']!r} is not a folder name")
    if obj["run_id"] is not None and not (isinstance(obj["run_id"], str) and obj["run_id"].isalnum()):
        raise bad(f"its run id {obj['run_id']!r} is not a word of letters and digits")
    if not _is_int(obj["best_epoch"]) or not 0 <= obj["best_epoch"] <= epoch:
        raise bad(f"best epoch {obj['best_epoch']!r} is not a whole number from 0 to its epoch {epoch}")
    if not _is_number(obj["best_prec1"]) or not 0 <= obj["best_prec1"] <= 100:
        raise bad(f"best top-1 {obj['best_prec1']!r} is not a percentage")
    if obj["history"] is not None or version > 1:  # None only in a format-1 file (it is only evaluated)
        _check_history(obj["history"], epoch, bad)
    if not _is_int(obj["log_offset"]) or obj["log_offset"] < 0:
        raise bad(f"log offset {obj['log_offset']!r} is not a whole number of bytes")
    if not isinstance(obj["model"], dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in obj["model"].items()):
        raise bad("its network is not a state_dict of named tensors")
    optimizer = obj["optimizer"]
    if not (isinstance(optimizer, dict) and isinstance(optimizer.get("state"), dict)
            and isinstance(optimizer.get("param_groups"), list)):
        raise bad("its optimizer state is not an optimizer's (no 'state' and 'param_groups')")
    if not isinstance(obj["ranks"], list) or not obj["ranks"] or not all(isinstance(r, dict) for r in obj["ranks"]):
        raise bad("it holds no random states of its ranks")
    if obj.get("data_root") is not None and not isinstance(obj["data_root"], str):
        raise bad(f"its data folder {obj['data_root']!r} is not a path")
    if obj["threads"] is not None and not (_is_int(obj["threads"]) and 1 <= obj["threads"] <= MAX_THREADS):
        raise bad(f"its thread count {obj['threads']!r} is not a whole number from 1 to {MAX_THREADS}")
    classes = obj.get("classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) == config.num_classes
                                    and all(isinstance(c, str) and c for c in classes)
                                    and len(set(classes)) == len(classes)):
        raise bad(f"its class names are not {config.num_classes} different names")
    steps = obj.get("steps")
    if steps is not None and not (_is_int(steps) and steps >= 1):
        raise bad(f"its steps per epoch {steps!r} are not a whole number from 1")
    return Checkpoint(config=config, run=obj["run"], run_id=obj["run_id"], epoch=epoch, model=obj["model"],
                      optimizer=optimizer, best_prec1=float(obj["best_prec1"]), best_epoch=obj["best_epoch"],
                      history=obj["history"], ranks=obj["ranks"], log_offset=obj["log_offset"],
                      data_root=obj.get("data_root"), threads=obj["threads"], classes=classes, steps=steps)


def _check_history(history, epoch, bad):
    """One row per finished epoch, numbered 1, 2, ..., every metric a finite number."""
    if not isinstance(history, list) or len(history) != epoch:
        raise bad(f"its metrics have {len(history) if isinstance(history, list) else 'no'} rows for "
                  f"{epoch} finished epochs")
    for i, row in enumerate(history, 1):
        if not isinstance(row, dict) or set(row) != set(CSV_FIELDS):
            raise bad(f"row {i} of its metrics does not have the columns {', '.join(CSV_FIELDS)}")
        if row["epoch"] != i or not all(_is_number(v) or (v is None and k in OPTIONAL_FIELDS)
                                        for k, v in row.items()):
            raise bad(f"row {i} of its metrics holds {row}")


def _is_int(value):
    return type(value) is int


def _is_number(value):
    return type(value) in (int, float) and math.isfinite(value)


# ---- a glance without loading the tensors ----------------------------------------------------------

def peek(path: str):
    """The plain fields of a checkpoint, read without loading its tensors into memory
    (``{"format", "version", "epoch", "epochs", "run", "run_id", "data_root", "config"}``, None where absent), or
    None if the file cannot be read. Not checked: for decisions that a full ``read``
    confirms (which run to resume, which epoch a file holds)."""
    try:
        obj = files.load(path, mmap=True)
    except FileError:
        return None
    settings = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    return {"format": obj.get("format"), "version": obj.get("version"), "epoch": obj.get("epoch"),
            "epochs": settings.get("epochs"), "run": obj.get("run"), "run_id": obj.get("run_id"),
            "data_root": obj.get("data_root"), "config": obj.get("config")}
