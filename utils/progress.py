"""Progress inside an epoch: a tqdm bar on a terminal; where the output goes to a file or
a pipe (a cluster job, ``> out.txt``), a plain line every minute instead (every
``VISPA_PROGRESS_SECONDS`` seconds where that is set), since a bar's carriage returns
would fill the file with one long line."""
import os
import sys
import time

from tqdm import tqdm


def _every():
    """Seconds between two lines of progress when the output is not a terminal."""
    try:
        return max(0.0, float(os.environ.get("VISPA_PROGRESS_SECONDS", "60")))
    except ValueError:
        return 60.0


def progress(batches, description, stream=None):
    """``batches``, telling ``stream`` (stderr) how far their consumer has got."""
    stream = stream or sys.stderr
    if stream.isatty():
        return tqdm(batches, desc=description, leave=False, dynamic_ncols=True, file=stream)
    return _lines(batches, description, stream)


def _lines(batches, description, stream):
    total = len(batches) if hasattr(batches, "__len__") else None
    every = _every()
    began = last = time.monotonic()
    for done, batch in enumerate(batches, 1):
        yield batch
        now = time.monotonic()
        if now - last >= every:
            last = now
            where = f"{done}/{total} batches ({100 * done / total:.0f}%)" if total else f"{done} batches"
            left = f", about {(now - began) * (total - done) / done:.0f} s to go" if total else ""
            print(f"{description}: {where} in {now - began:.0f} s{left}", file=stream, flush=True)
