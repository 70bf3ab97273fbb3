"""The metrics of a run as TensorBoard scalars (``--tensorboard``), one event file per
process that writes, in ``results/<save>/tb/``: every column of metrics.csv under its own
name, at its epoch. TensorBoard is optional; a run that asks for it without it is refused
in one line before it starts."""


class Unavailable(Exception):
    """The tensorboard package is not installed."""


def check():
    """Unavailable, with what to do, unless the tensorboard package can be used."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise Unavailable("--tensorboard needs the tensorboard package, which is not installed: "
                          "pip install tensorboard (or leave --tensorboard out)") from None


def writer(folder):
    """A writer of events into ``folder`` (created if need be)."""
    check()
    from torch.utils.tensorboard import SummaryWriter
    return SummaryWriter(log_dir=folder)


def write_row(events, row: dict):
    """One epoch's row of metrics, every column but the epoch a scalar at that epoch."""
    for name, value in row.items():
        if name != "epoch" and value is not None:
            events.add_scalar(name, value, row["epoch"])
    events.flush()
