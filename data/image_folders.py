"""Class folders of image files, as torchvision's ImageFolder reads them (Tiny-ImageNet,
ImageNet): the walk through a class folder, and a cheap check that every file is an image.

Links to folders are followed, as ImageFolder follows them, but a link back to a folder
already read (``loop -> ..``) is refused: followed, it would repeat the class's images
until the path grew too long, silently. And a damaged file (empty, truncated to nothing,
not an image, unreadable) is found before a run writes anything, by its first bytes,
rather than in the middle of an epoch.
"""
import concurrent.futures
import os
import sys

from .errors import DatasetError

# The first bytes of the files the readers take: JPEG, and PNG (ImageNet holds a few PNGs
# named .JPEG, which PIL reads all the same).
SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n")


def walk(folder):
    """``os.walk(folder, followlinks=True)``, top-down, refusing a loop of links."""
    seen = set()
    for where, subfolders, names in os.walk(folder, followlinks=True):
        status = os.stat(where)
        if (status.st_dev, status.st_ino) in seen:
            raise DatasetError(f"{where} leads back to a folder already read (a link that makes a loop): "
                               f"it would repeat images; remove the link")
        seen.add((status.st_dev, status.st_ino))
        yield where, subfolders, names


def check_images(paths, what="images"):
    """DatasetError (one line, naming the file) unless every file of ``paths`` can be read
    and starts as a JPEG or PNG does. Threads read the first bytes of many files at once:
    ImageNet's 1.33 M take about a minute on a local disk."""
    paths = list(paths)
    if len(paths) > 50_000:
        print(f"checking the {len(paths):,} {what} (that each can be read and is a JPEG or PNG)",
              file=sys.stderr, flush=True)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(min(32, 4 * cores)) as pool:
        for problem in pool.map(_problem, paths, chunksize=256):
            if problem is not None:
                raise DatasetError(problem)


def _problem(path):
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError as error:
        return f"cannot read the image {path}: {error.strerror or error}"
    if not head:
        return f"the image {path} is empty (0 bytes): replace it from the original archive, or delete it"
    if not head.startswith(SIGNATURES):
        return (f"{path} is not a JPEG or PNG image (it starts with {head[:4]!r}): replace it from the original "
                f"archive, or delete it")
    return None
