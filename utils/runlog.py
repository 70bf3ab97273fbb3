"""The run's log: every line goes to the console and to ``results/<save>.txt``, and
the file always ends with the line ``Best Prec@1: <value> (epoch <e>/<E>)``.

Appending removes that last line, writes the new lines, and writes it again, so a
reader (a person, ``tail -1``, ``utils.summarize``) finds the best accuracy at the
end of the file while the run is going and after it has ended.
"""
import re

from .files import write_atomic

BEST_LINE = re.compile(r"Best Prec@1: (\S+) \(epoch (\d+)/(\d+)\)")


def best_line(best_prec1: float, best_epoch: int, total_epochs: int) -> str:
    return f"Best Prec@1: {best_prec1:.2f} (epoch {best_epoch}/{total_epochs})"


def parse_best_line(line: str):
    """(best top-1, its epoch, the run's epochs) of a best line; None for another line."""
    found = BEST_LINE.fullmatch(line.strip())
    if found is None:
        return None
    try:
        return float(found.group(1)), int(found.group(2)), int(found.group(3))
    except ValueError:
        return None


class RunLog:
    """``offset`` is where the best line starts: everything before it is the log
    proper. A checkpoint records it, and a resumed run cuts the log back to it.

    Every change writes the whole file anew and renames it into place (through the run's
    record of its files, ``owner``): the log is never edited in place, so a copy that
    shares its content under another name (a hard-link backup) keeps it."""

    def __init__(self, path: str, total_epochs: int, offset: int = 0, echo: bool = True, owner=None):
        self.path = path
        self.total_epochs = total_epochs
        self.echo = echo
        self.owner = owner
        self.best = (0.0, 0)
        self.proper = b""
        if offset:
            with open(path, "rb") as f:
                self.proper = f.read(offset)
        self._commit()

    @property
    def offset(self) -> int:
        return len(self.proper)

    def set_best(self, best_prec1: float, best_epoch: int):
        self.best = (best_prec1, best_epoch)
        self._commit()

    def write(self, message: str = "", echo: bool = None, best=None):
        """Append a line (and print it, unless ``echo`` or the log's own setting says no);
        ``best``: the new (best top-1, its epoch), in the same write."""
        if self.echo if echo is None else echo:
            print(message, flush=True)
        self.proper += (message + "\n").encode()
        if best is not None:
            self.best = best
        self._commit()

    def _commit(self):
        data = self.proper + (best_line(*self.best, self.total_epochs) + "\n").encode()
        write_atomic(self.path, lambda f: f.write(data), self.owner)

    def close(self):
        pass
