"""The metrics of a run as TensorBoard scalars (``--tensorboard``), in ``results/<save>/tb/``.

Each finished epoch gets an event file of its own, ``events.out.tfevents.<epoch>.vispa``,
written once from that epoch's row of metrics.csv (every column, under a group name:
``train/loss``, ``val/prec1``, ``mean_net/ece``, ...) and renamed into place like every
other file of the run. The events are the metrics' history, so they go back with the
run: a rewound or resumed run removes the files of the epochs it discards and writes
those its history has and tb/ lacks. (A TensorBoard already open keeps what it has read:
reload it after a rewind.) TensorBoard is optional; a run that asks for it without it is
refused in one line before it starts.
"""
import io
import os
import re
import time

from .files import write_atomic

EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d{6})\.vispa")


class Unavailable(Exception):
    """The tensorboard package is not installed."""


def check(what="--tensorboard", otherwise="leave --tensorboard out"):
    """Unavailable, with what to do, unless the tensorboard package can be used."""
    try:  # what event_file uses
        from tensorboard.compat.proto import event_pb2, summary_pb2  # noqa: F401
        from tensorboard.summary.writer import record_writer  # noqa: F401
    except ImportError:
        raise Unavailable(f"{what} needs the tensorboard package, which is not installed: "
                          f"pip install tensorboard (or {otherwise})") from None


def scalar_name(column: str) -> str:
    """``train/loss``, ``val/prec1``, ``mean_net/ece``, ``best/prec1``, ``lr``: the column
    of metrics.csv in its group."""
    group, _, rest = column.partition("_")
    groups = {"train": "train", "val": "val", "mean": "mean_net", "best": "best", "deployed": "deployed"}
    return f"{groups[group]}/{rest}" if group in groups and rest else column


def event_file(row: dict, wall_time: float) -> bytes:
    """The bytes of one epoch's event file: the file version, then a scalar per column."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter
    out = io.BytesIO()
    records = RecordWriter(out)
    records.write(Event(wall_time=wall_time, file_version="brain.Event:2").SerializeToString())
    values = [Summary.Value(tag=scalar_name(name), simple_value=float(value))
              for name, value in row.items() if name != "epoch" and value is not None]
    records.write(Event(wall_time=wall_time, step=row["epoch"], summary=Summary(value=values)).SerializeToString())
    return out.getvalue()


def path_of(folder: str, epoch: int) -> str:
    return os.path.join(folder, f"events.out.tfevents.{epoch:06d}.vispa")


def write_row(folder: str, row: dict, owner):
    """The event file of one epoch's row (tb/ created if need be)."""
    os.makedirs(folder, exist_ok=True)
    data = event_file(row, time.time())
    write_atomic(path_of(folder, row["epoch"]), lambda f: f.write(data), owner)


def follow(folder: str, history: list, owner):
    """Make tb/ hold the events of ``history`` and no later epoch's: the run's own event
    files of the discarded epochs are removed (anything else there was refused before),
    and the epochs of the history without a file get one."""
    have = {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            found = EVENT_FILE.fullmatch(name)
            path = os.path.join(folder, name)
            if found and owner.owns(path):
                have[int(found.group(1))] = path
            elif ".tfevents." in name and owner.owns(path):  # a file of an earlier version: all epochs in one
                owner.remove(path)
    epochs = {row["epoch"] for row in history}
    for epoch, path in have.items():
        if epoch not in epochs:
            owner.remove(path)
    for row in history:
        if row["epoch"] not in have:
            write_row(folder, row, owner)
