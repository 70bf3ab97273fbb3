"""Stopping a run cleanly: SIGINT or SIGTERM (what a scheduler sends before pre-emption)
asks the loops to stop at the next step, and a run of several ranks stops all of them at
the same step."""
import signal
from contextlib import contextmanager

from . import distributed
from .progress import progress

STOP_CHECK_EVERY = 10  # steps between the ranks' agreements on a stop (one all-reduce each)


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
            if self.holding:
                self.held = True
                return
            raise KeyboardInterrupt
        self.signum = signum

    holding = held = False

    @contextmanager
    def hold(self):
        """A second Ctrl-C waits until the enclosed steps are all done (an epoch's log
        line, metrics row and checkpoint go together)."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.held:
            raise KeyboardInterrupt

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
        """The batches with their progress shown, ending early once the ranks agree to stop.
        ``collective=False`` (the evaluation, whose shards may differ in length by a
        batch): this rank stops on its own signal, and ``agree`` follows."""
        every = STOP_CHECK_EVERY if self.world.several else 1
        for i, batch in enumerate(progress(batches, description)):
            if collective and i % every == 0 and self.agree():
                return
            if not collective and (self.signum is not None or self.agreed is not None):
                return
            yield batch
