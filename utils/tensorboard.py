"""The metrics of a run as TensorBoard scalars (``--tensorboard``), in ``results/<save>/tb/``.

Each finished epoch gets an event file of its own, ``events.out.tfevents.<epoch>.vispa``,
written once from that epoch's row of metrics.csv (every column, under a group name:
``train/loss``, ``val/prec1``, ``mean_net/ece``, ``deployed/prec1``, ...), with the lr and
the training loss of every step of the epoch (``step/lr``, ``step/loss``, at the
iteration; the loss of rank 0), and renamed into place like every other file of the run. The events are the metrics' history, so they go back with the
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

EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d{6})(\.deployed)?\.vispa")


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


def event_file(row: dict, wall_time: float, steps=()) -> bytes:
    """The bytes of one epoch's event file: the file version, a scalar per column at the
    epoch, and ``steps``' (iteration, lr, loss) as ``step/lr`` and ``step/loss`` at their
    iteration."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter
    out = io.BytesIO()
    records = RecordWriter(out)
    records.write(Event(wall_time=wall_time, file_version="brain.Event:2").SerializeToString())
    values = [Summary.Value(tag=scalar_name(name), simple_value=float(value))
              for name, value in row.items() if name != "epoch" and value is not None]
    records.write(Event(wall_time=wall_time, step=row["epoch"], summary=Summary(value=values)).SerializeToString())
    for iteration, lr, loss in steps:
        values = [Summary.Value(tag="step/lr", simple_value=float(lr)),
                  Summary.Value(tag="step/loss", simple_value=float(loss))]
        records.write(Event(wall_time=wall_time, step=iteration, summary=Summary(value=values)).SerializeToString())
    return out.getvalue()


def path_of(folder: str, epoch: int, deployed=False) -> str:
    return os.path.join(folder, f"events.out.tfevents.{epoch:06d}{'.deployed' if deployed else ''}.vispa")


def write_row(folder: str, row: dict, owner, steps=()):
    """The event file of one epoch's row and its steps (tb/ created if need be)."""
    os.makedirs(folder, exist_ok=True)
    data = event_file(row, time.time(), steps)
    write_atomic(path_of(folder, row["epoch"]), lambda f: f.write(data), owner)


def write_deployed(folder: str, row: dict, owner):
    """The deployed network's figures of an epoch evaluated after the run's last epoch: a
    file of their own beside the epoch's (which keeps its steps)."""
    os.makedirs(folder, exist_ok=True)
    data = event_file({key: value for key, value in row.items() if key == "epoch" or key.startswith("deployed_")},
                      time.time())
    write_atomic(path_of(folder, row["epoch"], deployed=True), lambda f: f.write(data), owner)


def follow(folder: str, history: list, owner):
    """Make tb/ hold the events of ``history`` and no later epoch's: the run's own event
    files of the discarded epochs are removed (anything else there was refused before),
    and the epochs of the history without a file get one."""
    have, deployed = {}, {}
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            found = EVENT_FILE.fullmatch(name)
            path = os.path.join(folder, name)
            if found and owner.owns(path):
                (deployed if found.group(2) else have)[int(found.group(1))] = path
            elif ".tfevents." in name and owner.owns(path):  # a file of an earlier version: all epochs in one
                owner.remove(path)
    rows = {row["epoch"]: row for row in history}
    for epoch, path in have.items():
        if epoch not in rows:
            owner.remove(path)
    for epoch, path in deployed.items():  # an end-of-run figure the history no longer has
        if epoch not in rows or rows[epoch].get("deployed_prec1") is None:
            owner.remove(path)
    for row in history:
        if row["epoch"] not in have:
            write_row(folder, row, owner)
