"""ImageNet (ILSVRC-2012) as the authors' ImageNet program reads it: class folders of
JPEG files, the augmentation of their DALI pipelines, one shard per rank. This module
is what ImageNet is (its layout, its augmentation, how it is sharded); the two backends
that read it batch by batch are in ``imagenet_loaders.py``.

Layout (``check_imagenet``): ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``
with the same class folders in both. The class index is the position of the wnid in
sorted order, as ``ImageFolder`` and DALI's file reader number them. ImageNet needs an
account at image-net.org: no script can download it. The validation archive unpacks to
50,000 JPEGs in one folder; they must be moved into their class folders first.

The recipe (docs/data.md), on each of the ranks with ``batch_size`` images:
- training: a random crop of area [0.1, 1] of the image and aspect ratio (width/height)
  in [0.8, 1.25], 100 attempts and then a fallback (``crop_window``), resized to 224x224
  with a triangular filter (linear interpolation, antialiased when shrinking), flipped
  horizontally with probability 1/2;
- validation: the shorter side resized to 256 (triangular), the centre 224x224 (sizes
  and centre rounded as DALI rounds them, ``val_size``, ``val_transform``);
- both: x / 255 normalised with ``MEAN`` and ``STD`` (which the authors also use for CIFAR).

Sharding, with N images in a split and W shards (one per rank; shard r):
- training: every epoch the N images are put in a random order drawn from (seed, epoch),
  the same on every rank; the order is extended by its first images to W * ceil(N / W),
  and shard r is the r-th block of ceil(N / W). The shards are disjoint (bar those few
  repeats when W does not divide N) and together cover the set; every rank makes the
  same number of steps. DALI's file reader does the same with its own order: one fixed
  shuffle, contiguous shards padded to the largest (the padding is dropped: ImageNet's
  last batches hold 35 or 36 images), each rank moving on to the next shard every epoch,
  random draws from a 1024-image buffer.
- validation: shard r is images floor(r N / W) to floor((r + 1) N / W) - 1 of the sorted
  list, the shards of DALI's reader: every image is evaluated exactly once across the
  ranks, nothing is padded or repeated. The shards differ by at most one image, so the
  ranks may make different numbers of batches (never for ImageNet's 50,000 on 1, 2, 4 or
  8 ranks); add up correct predictions, loss sums and counts over the ranks once after
  the loop (one all_reduce), not batch by batch.

Steps per epoch (``steps_per_epoch``): ceil(ceil(N / W) / batch_size), one fewer when the
last batch would hold a single image (BatchNorm cannot train on it; the device loader
drops it too). ImageNet: N = 1,281,167 training images; on 4 ranks at 256 per rank,
ceil(N / 4) = 320,292 images per rank, ceil(320,292 / 256) = 1252 steps, the last of 36
images per rank (the authors' 1252: ``len_epoch = ceil(DALI size / batch)``); on one
process at 256, 5005 steps. Validation: 50,000 images, 12,500 per rank on 4 ranks = 49
batches (48 x 256 + 212).
"""
import math
import os
import re
from dataclasses import dataclass

import numpy as np

from .errors import DatasetError
from .image_folders import check_images, walk

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # the normalisation of ImageNet and, by the authors, CIFAR
NUM_CLASSES = 1000
TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000   # ILSVRC-2012
CROP_SIZE = 224          # training and validation images are 224x224
VAL_RESIZE = 256         # validation: shorter side first resized to 256
CROP_AREA = (0.1, 1.0)   # training crop: fraction of the image's area ...
CROP_ASPECT = (0.8, 1.25)  # ... and its width / height
CROP_ATTEMPTS = 100
DALI_SEED = 12           # the authors' DALI pipelines are seeded 12 + rank
JPEG_SUFFIXES = (".jpeg", ".jpg")  # compared in lower case
WNID = re.compile(r"n\d{8}")     # a class of ImageNet (a WordNet id)
LAYOUT = ("{root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG, the same class folders "
          "in both (ImageNet needs an account at image-net.org; no script can download it)")


# ---- the layout --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageNetFolders:
    """What ``check_imagenet`` found: the class names (sorted; a class's index is its
    position) and the (path, label) pairs of each split, classes in order and the
    files of a class sorted by name (``ImageFolder``'s order)."""
    root: str
    classes: list
    train: list
    val: list


def _is_jpeg(name):
    return name.lower().endswith(JPEG_SUFFIXES)


def _scan_split(folder):
    """(class name -> sorted JPEG paths, JPEGs lying directly in ``folder``, .tar files in
    ``folder``) or None when there is no such folder. Class folders are read recursively,
    as ImageFolder does."""
    if not os.path.isdir(folder):
        return None
    classes, loose, tars = {}, 0, 0
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.is_dir():
                files = []
                for directory, subdirectories, names in walk(entry.path):
                    subdirectories.sort()
                    files.extend(os.path.join(directory, n) for n in sorted(names) if _is_jpeg(n))
                classes[entry.name] = files
            elif _is_jpeg(entry.name):
                loose += 1
            elif entry.name.endswith(".tar"):
                tars += 1
    return dict(sorted(classes.items())), loose, tars


def _describe(name, scan):
    if scan is None:
        return f"{name}: no folder"
    classes, loose, tars = scan
    text = f"{name}: {len(classes):,} classes, {sum(map(len, classes.values())):,} images"
    if loose:
        text += f" + {loose:,} JPEGs directly in {name}/"
    if tars:
        text += f" + {tars:,} .tar files"
    return text


def _problems(root, scans):
    if not os.path.isdir(root):
        return ["the folder does not exist"]
    problems = []
    for name, scan in scans.items():
        if scan is None:
            problems.append(f"there is no {name}/ folder")
            continue
        classes, loose, tars = scan
        if loose and not classes:
            what = ("not sorted into class folders (move each image into val/<wnid>/, using the "
                    "devkit's validation labels)") if name == "val" else "not in class folders"
            problems.append(f"{name}/ holds {loose:,} JPEGs directly, {what}")
        elif loose:
            problems.append(f"{loose:,} JPEGs lie directly in {name}/, outside its class folders")
        elif tars and not classes:
            problems.append(f"{name}/ holds {tars:,} .tar files: extract each into {name}/<wnid>/")
        elif not classes:
            problems.append(f"{name}/ has no class folders")
        empty = [c for c, files in classes.items() if not files]
        if empty:
            problems.append(f"{len(empty):,} class folders of {name}/ hold no JPEG (e.g. {empty[0]})")
    if not problems:
        train, val = set(scans["train"][0]), set(scans["val"][0])
        if train != val:
            def some(names):
                names = sorted(names)
                return f"{len(names):,}" + (f" (e.g. {names[0]})" if names else "")
            problems.append(f"the classes of train/ and val/ differ: {some(train - val)} only in train/, "
                            f"{some(val - train)} only in val/")
    return problems


def check_imagenet(root) -> ImageNetFolders:
    """The ImageNet folders under ``root``, or a DatasetError with one line: what is
    wrong, how many classes and images each split holds, and what the layout must be."""
    scans = {name: _scan_split(os.path.join(root, name)) for name in ("train", "val")}
    problems = _problems(root, scans)
    if problems:
        found = "; ".join(_describe(name, scan) for name, scan in scans.items())
        raise DatasetError(f"ImageNet at {root} is not usable: {'; '.join(problems)}. Found {found}. "
                           f"Expected {LAYOUT.format(root=root.rstrip('/') or '/')}")
    classes = list(scans["train"][0])
    index = {name: i for i, name in enumerate(classes)}

    def samples(scan):
        return [(path, index[name]) for name, files in scan[0].items() for path in files]

    folders = ImageNetFolders(root, classes, samples(scans["train"]), samples(scans["val"]))
    check_images([path for path, _ in folders.train + folders.val], "ImageNet images")
    return folders


def class_problem(root, expected=NUM_CLASSES):
    """The classes missing under ``root``: a wnid (n01440764, ...) in train/ or val/ that
    is not a folder (a file, a broken link), or None. Labels are the positions of the
    class folders in sorted order, so every class after a missing one would take the
    next one's label."""
    missing = set()
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if os.path.isdir(folder):
            with os.scandir(folder) as entries:
                missing |= {e.name for e in entries if WNID.fullmatch(e.name) and not e.is_dir()}
    if not missing:
        return None
    names = sorted(missing)
    return (f"ImageNet at {root}: {len(names)} class{'es are' if len(names) > 1 else ' is'} not a folder "
            f"({', '.join(names[:3])}{' ...' if len(names) > 3 else ''}), so the classes after it take the labels of "
            f"others")


# ---- the augmentation (torchvision path) -------------------------------------------------------

def crop_window(width, height, rng, area=CROP_AREA, aspect=CROP_ASPECT, attempts=CROP_ATTEMPTS):
    """A random crop (left, top, crop width, crop height) of a ``width`` x ``height``
    image, drawn as DALI's random-crop generator draws it: up to ``attempts`` times an
    area fraction uniform in ``area`` and an aspect ratio (width / height) log-uniform in
    ``aspect``, sides rounded, until the crop fits in the image with its rounded aspect
    ratio still in range. Then the position, uniform over the places where it fits.
    Fallback after ``attempts`` failures: the whole image, narrowed to the aspect range.
    An image too elongated for any crop of the smallest area (e.g. 1000x10) gets the
    largest crop of the allowed aspect ratio. ``rng``: a numpy Generator."""
    low, high = aspect
    smallest = area[0] * width * height
    widest = max(1, int(height * high))     # the widest crop of full height
    tallest = max(1, int(width / low))      # the tallest crop of full width
    if height * widest < smallest:
        w, h = widest, height
    elif width * tallest < smallest:
        w, h = width, tallest
    else:
        for _ in range(attempts):
            target = rng.uniform(*area) * width * height
            ratio = math.exp(rng.uniform(math.log(low), math.log(high)))
            w = max(1, math.floor(math.sqrt(target * ratio) + 0.5))
            h = max(1, math.floor(math.sqrt(target / ratio) + 0.5))
            if w <= width and h <= height and low <= w / h <= high:
                break
        else:
            if width / height > high:
                w, h = widest, height
            elif width / height < low:
                w, h = width, tallest
            else:
                w, h = width, height
            shrink = math.sqrt(min(1.0, area[1] * width * height / (w * h)))
            w, h = max(1, int(w * shrink)), max(1, int(h * shrink))
    return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h


def train_params(width, height, rng):
    """(left, top, crop width, crop height, flip) of one training image."""
    return (*crop_window(width, height, rng), bool(rng.random() < 0.5))


def train_transform(image, rng):
    """The training augmentation of one PIL image: ``crop_window``, resized to 224x224
    with PIL's bilinear filter (a triangle filter widened when shrinking: DALI's
    INTERP_TRIANGULAR), a horizontal flip with probability 1/2. Returns uint8 (3, 224, 224)."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    left, top, w, h, flip = train_params(*image.size, rng)
    image = F.resized_crop(image, top, left, h, w, [CROP_SIZE, CROP_SIZE],
                           interpolation=InterpolationMode.BILINEAR, antialias=True)
    if flip:
        image = F.hflip(image)
    return F.pil_to_tensor(image)


def val_size(width, height):
    """(width, height) of a validation image after its shorter side is resized to 256,
    the longer side rounded to the nearest pixel, as DALI's resize rounds it
    (torchvision's Resize(256) truncates: 401x300 -> 342x256 here, 341x256 there)."""
    if width <= height:
        return VAL_RESIZE, math.floor(VAL_RESIZE * height / width + 0.5)
    return math.floor(VAL_RESIZE * width / height + 0.5), VAL_RESIZE


def val_transform(image):
    """One PIL validation image: shorter side resized to 256 (``val_size``, bilinear,
    antialiased), the centre 224x224, an odd margin split with the extra pixel before
    the crop, as DALI centres it (torchvision's CenterCrop puts it after, half the time).
    Returns uint8 (3, 224, 224)."""
    import torchvision.transforms.functional as F
    from torchvision.transforms import InterpolationMode

    width, height = val_size(*image.size)
    image = F.resize(image, [height, width], interpolation=InterpolationMode.BILINEAR, antialias=True)
    top, left = (height - CROP_SIZE + 1) // 2, (width - CROP_SIZE + 1) // 2
    return F.pil_to_tensor(F.crop(image, top, left, CROP_SIZE, CROP_SIZE))


# ---- sharding ----------------------------------------------------------------------------------

def shard_bounds(num_images, shard, shards):
    """[start, stop) of the contiguous ``shard`` of ``shards`` of ``num_images`` (DALI's shards)."""
    return num_images * shard // shards, num_images * (shard + 1) // shards


def steps_per_epoch(num_images, batch_size, shards=1):
    """Training steps per epoch on each of ``shards`` ranks: ceil(ceil(N / shards) / batch),
    one fewer when the last batch would hold a single image. ImageNet, 4 ranks, 256:
    ceil(1,281,167 / 4) = 320,292 images per rank, 1252 steps."""
    per_shard = -(-num_images // shards)
    steps = -(-per_shard // batch_size)
    return steps - 1 if per_shard % batch_size == 1 and per_shard > 1 else steps


def train_shard(num_images, batch_size, shard, shards, seed, epoch):
    """(image indices, positions) of training ``shard`` of ``shards`` in ``epoch``, in the
    order it reads them. The order of the epoch is a random permutation drawn from (seed,
    epoch), extended by its first images to shards * ceil(N / shards); the shard's block
    of ceil(N / shards) is cut to ``steps_per_epoch`` batches. A position is an image's
    place in the extended order: with (seed, epoch) it seeds the image's augmentation,
    which therefore depends neither on the number of workers nor on the process's random
    state."""
    per_shard = -(-num_images // shards)
    order = np.random.default_rng((seed, epoch)).permutation(num_images)
    order = np.concatenate([order, order[:per_shard * shards - num_images]])
    keep = min(per_shard, steps_per_epoch(num_images, batch_size, shards) * batch_size)
    start = shard * per_shard
    return order[start:start + keep], np.arange(start, start + keep)
