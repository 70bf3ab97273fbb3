"""Tiny-ImageNet: 200 classes of 64x64 JPEG images, as the official zip unpacks with
val/ sorted into class folders (what ``download_data.sh tiny-imagenet`` leaves):

    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG    500 per class
    <root>/tiny-imagenet-200/val/<wnid>/images/*.JPEG       50 per class ("test" split)

Images and labels are those of torchvision's ``ImageFolder`` on ``train/`` and ``val/``
(the authors' reader): the label of an image is the position of its wnid among the
sorted class folders, images come in ImageFolder's order (class by class, file names
sorted), greyscale images are converted to RGB. The official unlabelled test/ split
is not used: "test accuracy" is the accuracy on val/.

Decoding 100,000 JPEGs takes a while, so a split is decoded once into uint8 (N, 3, 64,
64) + int64 (N,) and cached beside the dataset, in ``<root>/tiny-imagenet-200.<split>.pt``
(train: 100,000 x 3 x 64 x 64 bytes, 1.2 GB; val: 123 MB). The cache holds a
fingerprint of the image files (paths, sizes, modification times) and is decoded
again when they change.
"""
import concurrent.futures
import hashlib
import os
import re
import sys

import numpy as np
import torch

from utils import files

from .errors import DatasetError
from .image_folders import walk

FOLDER = "tiny-imagenet-200"
IMAGE_SIZE = 64
SPLIT_FOLDERS = {"train": "train", "test": "val", "val": "val"}
# the files ImageFolder takes for images (torchvision.datasets.folder.IMG_EXTENSIONS)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CACHE_FORMAT = 2  # 2: with a content digest


def cache_path(root: str, split: str) -> str:
    """Where the decoded ``split`` ("train" or "test"/"val") is cached."""
    return os.path.join(root, f"{FOLDER}.{SPLIT_FOLDERS[split]}.pt")


def read_tiny_imagenet(root: str, name: str = "tiny-imagenet", split: str = "train"):
    """(images, labels) of the "train" or "test" (= val/) split under ``root``: uint8
    (N, 3, 64, 64) and int64 (N,). Decoded from the JPEGs the first time, from the
    cache beside the dataset afterwards. DatasetError if missing or unreadable."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"split must be one of {sorted(SPLIT_FOLDERS)}, not {split!r}")
    folder = os.path.join(root, FOLDER)
    directory = os.path.join(folder, SPLIT_FOLDERS[split])
    classes = _classes(root, folder, directory)
    files, labels = _image_files(directory, classes)
    fingerprint = _fingerprint(directory, files)
    path = cache_path(root, split)

    labels = torch.tensor(labels, dtype=torch.int64)
    found = _load_cache(path, fingerprint, classes, labels)
    if found is not None:
        return found
    with _Lock(root):  # runs started together decode once; the others wait, then read the cache
        found = _load_cache(path, fingerprint, classes, labels, quiet=True)
        if found is not None:
            return found
        print(f"{name}: decoding the {len(files)} images of {directory} once; "
              f"they are cached in {path}", file=sys.stderr, flush=True)
        images = _decode(files, desc=f"{name} {SPLIT_FOLDERS[split]}")
        _save_cache(path, {"format": CACHE_FORMAT, "fingerprint": fingerprint, "classes": classes,
                           "images": images, "labels": labels})
    return images, labels


# ---- the files -------------------------------------------------------------------------------

def _classes(root, folder, directory):
    """The sorted wnids of train/ (the labels of both splits); checks that ``directory``
    exists and, for val/, that it is sorted into the same class folders."""
    train = os.path.join(folder, "train")
    for needed in (train, directory):
        if not os.path.isdir(needed):
            where = "" if os.path.normpath(root) == "datasets" else f"DATA_ROOT={root} "
            raise DatasetError(f"tiny-imagenet not found: {needed} is missing; download it with "
                               f"`{where}bash download_data.sh tiny-imagenet`")
    classes = _subfolders(train)
    if not classes:
        raise DatasetError(f"{train} has no class folders (expected train/<wnid>/images/*.JPEG); "
                           f"delete {folder} and download it again")
    if directory != train:
        if os.path.isdir(os.path.join(directory, "images")):
            raise DatasetError(
                f"{directory} is not sorted into class folders (it holds images/ and "
                f"val_annotations.txt, as the zip has it): delete {folder} and run "
                f"`bash download_data.sh tiny-imagenet`, which sorts it into val/<wnid>/images/")
        found = _subfolders(directory)
        if found != classes:
            odd = sorted(set(found) ^ set(classes))
            raise DatasetError(f"{directory} has other class folders than {train} ({len(found)} "
                               f"against {len(classes)}; e.g. {odd[0]}); delete {folder} and "
                               f"download it again")
    return classes


def class_problem(root, expected=200):
    """The classes missing in train/: those of the dataset's own list (``wnids.txt``,
    where the zip has it) without a folder, and wnids that are files, not folders; or
    None. Every class after a missing one would take the next one's label."""
    folder = os.path.join(root, FOLDER)
    train = os.path.join(folder, "train")
    if not os.path.isdir(train):
        return None  # the reader says what is missing
    found = _subfolders(train)
    try:
        with open(os.path.join(folder, "wnids.txt")) as f:
            listed = sorted(line.strip() for line in f if line.strip())
    except OSError:
        listed = []
    with os.scandir(train) as entries:
        not_folders = {e.name for e in entries if re.fullmatch(r"n\d{8}", e.name) and not e.is_dir()}
    missing = sorted((set(listed) - set(found)) | not_folders)
    if not missing:
        return None
    return (f"tiny-imagenet at {root}: {len(missing)} of its classes have no folder in train/ "
            f"({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}); the classes after a missing one take "
            f"the labels of others")


def _subfolders(directory):
    with os.scandir(directory) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _image_files(directory, classes):
    """The image files of every class folder and their labels, in ImageFolder's order."""
    files, labels = [], []
    for label, wnid in enumerate(classes):
        start = len(files)
        for where, _, names in sorted(walk(os.path.join(directory, wnid))):
            files.extend(os.path.join(where, n) for n in sorted(names) if n.lower().endswith(EXTENSIONS))
        if len(files) == start:
            raise DatasetError(f"{os.path.join(directory, wnid)} holds no images; delete "
                               f"{os.path.dirname(directory)} and download it again")
        labels.extend([label] * (len(files) - start))
    return files, labels


def _fingerprint(directory, files):
    """Changes when an image is added, removed, renamed, resized or rewritten."""
    digest = hashlib.sha256()
    for path in files:
        stat = os.stat(path)
        digest.update(f"{os.path.relpath(path, directory)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# ---- decoding --------------------------------------------------------------------------------

def _decode(files, desc):
    """All ``files`` as one uint8 tensor (N, 3, 64, 64), decoded by a few threads (PIL
    releases the GIL while decoding), with a progress bar on a terminal."""
    from tqdm import tqdm

    images = np.empty((len(files), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)

    def decode_into(i):
        images[i] = _read_image(files[i]).transpose(2, 0, 1)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = concurrent.futures.ThreadPoolExecutor(min(8, cores))
    try:
        for _ in tqdm(pool.map(decode_into, range(len(files))), total=len(files), desc=desc,
                      unit="img", dynamic_ncols=True, disable=not sys.stderr.isatty()):
            pass
    finally:  # on an error or Ctrl-C: drop the queued images, wait only for those being decoded
        pool.shutdown(wait=True, cancel_futures=True)
    return torch.from_numpy(images)


def _read_image(path):
    """One image as a uint8 array (64, 64, 3), converted to RGB as ImageFolder's loader does."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            size = image.size
            if size == (IMAGE_SIZE, IMAGE_SIZE):
                pixels = np.asarray(image.convert("RGB"))
    except Exception as error:  # PIL raises several kinds for a damaged file
        raise DatasetError(f"cannot read the image {path}: {type(error).__name__}: {error} "
                           f"(delete the dataset folder and download it again)") from None
    if size != (IMAGE_SIZE, IMAGE_SIZE):
        raise DatasetError(f"the image {path} is {size[0]}x{size[1]} pixels; Tiny-ImageNet images "
                           f"are {IMAGE_SIZE}x{IMAGE_SIZE} (delete the dataset folder and download it again)")
    return pixels


# ---- the cache -------------------------------------------------------------------------------

def _load_cache(path, fingerprint, classes, labels, quiet=False):
    """(images, labels) from the cache at ``path`` if it was made from these very files and
    is whole, else None (a stale or damaged cache is said so and replaced). Whole: its
    content digest matches, and it holds uint8 images of the right shape and exactly the
    ``labels`` that the class folders give (a cache edited by hand, digest and all, with
    shifted labels is not used either)."""
    if not os.path.exists(path):
        return None
    try:
        cached = files.verify_digest(files.load(path, what="cache"), path, "a cache")
        if cached.get("format") != CACHE_FORMAT or cached.get("fingerprint") != fingerprint \
                or cached.get("classes") != classes:
            why = "the images changed since it was written"
        else:
            images, cached_labels = cached.get("images"), cached.get("labels")
            if isinstance(images, torch.Tensor) and images.dtype == torch.uint8 \
                    and images.shape == (len(labels), 3, IMAGE_SIZE, IMAGE_SIZE) \
                    and isinstance(cached_labels, torch.Tensor) and torch.equal(cached_labels, labels):
                return images, labels
            why = "it does not hold what it should"
    except Exception as error:  # a damaged file of any kind: decode again
        why = f"it cannot be read ({str(error).splitlines()[0][:200] if str(error) else type(error).__name__})"
    if not quiet:
        print(f"{path}: not used, {why}; decoding the images again", file=sys.stderr, flush=True)
    return None


def _save_cache(path, content):
    """Write the cache atomically, with its content digest; a folder that cannot be
    written only costs the decoding next time."""
    try:
        files.save_atomic(files.with_digest(content), path)
    except files.FileError as error:
        print(f"{path}: cannot write the cache ({error.reason or error}); the images will be decoded again next time",
              file=sys.stderr, flush=True)


class _Lock:
    """An exclusive lock (flock) on the folder ``path`` for the time of a ``with``, or
    nothing where it cannot be taken (a file system without locks). A folder, not a lock
    file: nothing is left behind."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def __enter__(self):
        try:
            import fcntl
            self.fd = os.open(self.path, os.O_RDONLY)
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except (OSError, ImportError):
            if self.fd is not None:
                os.close(self.fd)
            self.fd = None
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
