"""The run's log: every line goes to the console and to ``results/<save>.txt``, and
the file always ends with the line ``Best Prec@1: <value> (epoch <e>/<E>)``.

Appending removes that last line, writes the new lines, and writes it again, so a
reader (a person, ``tail -1``, ``utils.summarize``) finds the best accuracy at the
end of the file while the run is going and after it has ended.
"""
import os
import re

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
    proper. A checkpoint records it, and a resumed run cuts the file back to it."""

    def __init__(self, path: str, total_epochs: int, offset: int = 0, echo: bool = True):
        self.path = path
        self.total_epochs = total_epochs
        self.echo = echo
        self.best = (0.0, 0)
        # O_NOFOLLOW: never write through a symbolic link (the run folder's check refuses
        # one before the run starts; this closes the moment in between)
        self.file = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644), "r+b")
        self.file.truncate(offset)
        self.offset = offset
        self._write_best()

    def set_best(self, best_prec1: float, best_epoch: int):
        self.best = (best_prec1, best_epoch)
        self.file.truncate(self.offset)
        self._write_best()

    def write(self, message: str = "", echo: bool = None):
        """Append a line (and print it, unless ``echo`` or the log's own setting says no)."""
        if self.echo if echo is None else echo:
            print(message, flush=True)
        self.file.truncate(self.offset)
        self.file.seek(self.offset)
        self.file.write((message + "\n").encode())
        self.offset = self.file.tell()
        self._write_best()

    def _write_best(self):
        self.file.seek(self.offset)
        self.file.write((best_line(*self.best, self.total_epochs) + "\n").encode())
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()
