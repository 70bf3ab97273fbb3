"""Images of one's own, in class folders: ``--dataset imagefolder --data-root DIR``.

    DIR/train/<class>/*.jpg|png|...     the training images
    DIR/val/<class>/*.jpg|png|...       the test images ("test" split), the same class folders

As torchvision's ImageFolder reads them: a class's label is its position among the
sorted class folders of train/, images come class by class with their names sorted,
greyscale and palette images become RGB. Every image, of any size, is resized so that its
shorter side is ``size`` (bilinear, with antialiasing) and centre-cropped to ``size`` x
``size``; the split is then held in memory as uint8 (N, 3, size, size), like CIFAR, and
augmented on the device (crop with a padding of size / 8, flip). The images are decoded
at each start by a few threads; nothing is written into DIR.
"""
import concurrent.futures
import os
import sys

import numpy as np
import torch

from .errors import DatasetError
from .image_folders import walk

SPLIT_FOLDERS = {"train": "train", "test": "val", "val": "val"}
# the files ImageFolder takes for images (torchvision.datasets.folder.IMG_EXTENSIONS)
EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "DIR/train/<class>/<images> and DIR/val/<class>/<images>"


def class_names(root: str) -> list:
    """The sorted class folders of ``root``/train; DatasetError if there are none."""
    train = os.path.join(root, "train")
    if not os.path.isdir(train):
        raise DatasetError(f"imagefolder not found: {train} is missing; --data-root names a folder laid out as "
                           f"{LAYOUT}")
    with os.scandir(train) as entries:
        names = sorted(e.name for e in entries if e.is_dir())
    if len(names) < 2:
        raise DatasetError(f"{train} has {len(names)} class folder{'s' if len(names) != 1 else ''}: a classifier "
                           f"needs at least 2 ({LAYOUT})")
    return names


def read_class_folders(root: str, split: str, size: int, own_classes=False):
    """(images, labels) of the "train" or "test" (= val/) split: uint8 (N, 3, size, size)
    and int64 (N,). DatasetError (one line) if missing, empty, or an image cannot be read.
    ``own_classes``: the split's class folders are its classes, whatever train/ holds
    (another folder's images for --ood, whose labels mean nothing to the network)."""
    classes = None if own_classes else class_names(root)
    directory = os.path.join(root, SPLIT_FOLDERS[split])
    if not os.path.isdir(directory):
        raise DatasetError(f"imagefolder: {directory} is missing ({LAYOUT})")
    with os.scandir(directory) as entries:
        found = sorted(e.name for e in entries if e.is_dir())
    classes = classes or found
    if split != "train" and found != classes:
        odd = sorted(set(found) ^ set(classes))
        raise DatasetError(f"{directory} has other class folders than {os.path.join(root, 'train')} (e.g. {odd[0]}): "
                           f"both splits need the same classes")
    paths, labels = [], []
    for label, name in enumerate(classes):
        before = len(paths)
        for where, _, names in sorted(walk(os.path.join(directory, name))):
            chosen = [os.path.join(where, n) for n in sorted(names) if n.lower().endswith(EXTENSIONS)]
            paths += chosen
            labels += [label] * len(chosen)
        if split == "train" and len(paths) == before:  # ImageFolder refuses it too
            raise DatasetError(f"imagefolder: {os.path.join(directory, name)} holds no images, yet every folder of "
                               f"{directory} is a class: put images in it, or move it out")
    if not paths:
        raise DatasetError(f"imagefolder: {directory} holds no images ({', '.join(EXTENSIONS)})")
    return _decode(paths, size, f"imagefolder {SPLIT_FOLDERS[split]}"), torch.tensor(labels, dtype=torch.int64)


def _decode(paths, size, desc):
    from tqdm import tqdm

    images = np.empty((len(paths), 3, size, size), dtype=np.uint8)

    def decode_into(i):
        images[i] = _read_image(paths[i], size).transpose(2, 0, 1)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    pool = concurrent.futures.ThreadPoolExecutor(min(8, cores))
    try:
        for _ in tqdm(pool.map(decode_into, range(len(paths))), total=len(paths), desc=desc, unit="img",
                      dynamic_ncols=True, disable=not sys.stderr.isatty()):
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return torch.from_numpy(images)


def _read_image(path, size):
    """One image as uint8 (size, size, 3): RGB, the shorter side resized to ``size``, the centre."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode.startswith("I;16") or image.mode == "I":  # 16-bit greyscale (PNG, TIFF; PGM opens as
                # "I", scaled to 16 bits): its top 8 bits, where a plain convert clips every value above 255 to white
                values = np.asarray(image).astype(np.int64).clip(0, 65535) >> 8
                image = Image.fromarray(values.astype(np.uint8))
            image = image.convert("RGB")
            width, height = image.size
            scale = size / min(width, height)
            resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                                   Image.BILINEAR, reducing_gap=None)
            left, top = (resized.size[0] - size) // 2, (resized.size[1] - size) // 2
            return np.asarray(resized.crop((left, top, left + size, top + size)))
    except Exception as error:  # PIL raises several kinds for a damaged file
        raise DatasetError(f"cannot read the image {path}: {type(error).__name__}: {error}") from None
