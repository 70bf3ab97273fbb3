"""ImageNet (ILSVRC-2012) as the authors' ImageNet program reads it: class folders of
JPEG files, the augmentation of their DALI pipelines, one shard per rank.

    train, val, steps = imagenet_loaders("datasets/imagenet", batch_size=256, workers=8,
                                         device="cuda:0", rank=rank, world=4)
    for epoch in range(epochs):
        train_one_epoch(model, opt, train, ...)   # each pass over ``train`` is a new epoch
        evaluate(model, opt, val, L)              # this rank's part of the validation set

Layout (``check_imagenet``): ``<root>/train/<wnid>/*.JPEG`` and ``<root>/val/<wnid>/*.JPEG``
with the same class folders in both. The class index is the position of the wnid in
sorted order, as ``ImageFolder`` and DALI's file reader number them. ImageNet needs an
account at image-net.org: no script can download it. The validation archive unpacks to
50,000 JPEGs in one folder; they must be moved into their class folders first.

The recipe (docs/data.md), on each of ``world`` ranks with ``batch_size`` images:
- training: a random crop of area [0.1, 1] of the image and aspect ratio (width/height)
  in [0.8, 1.25], 100 attempts and then a fallback (``crop_window``), resized to 224x224
  with a triangular filter (linear interpolation, antialiased when shrinking), flipped
  horizontally with probability 1/2;
- validation: the shorter side resized to 256 (triangular), the centre 224x224 (sizes
  and centre rounded as DALI rounds them, ``val_size``, ``val_transform``);
- both: x / 255 normalised with mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225).
Batches are (float32 images (B, 3, 224, 224) on ``device``, int64 labels on ``device``).

Two backends make the same batches:
- "torchvision" (runs everywhere): PIL decoding and the transforms above in DataLoader
  workers; uint8 batches are copied to the device and normalised there.
- "dali": the authors' NVIDIA DALI pipelines (``pip install nvidia-dali-cuda130``,
  optional), decoding on the GPU (``dali_device="gpu"``, DALI's "mixed" decoder) or on
  the CPU (``dali_device="cpu"``, the authors' ``--dali_cpu``).

Sharding, with N images in a split and W ranks (rank r):
- training: every epoch the N images are put in a random order drawn from (seed, epoch),
  the same on every rank; the order is extended by its first images to W * ceil(N / W),
  and rank r takes the r-th block of ceil(N / W). The ranks' shards are disjoint (bar
  those few repeats when W does not divide N) and together cover the set; every rank
  makes the same number of steps. DALI's file reader does the same with its own order:
  one fixed shuffle, contiguous shards padded to the largest (the padding is dropped:
  ImageNet's last batches hold 35 or 36 images), each rank moving on to the next shard
  every epoch, random draws from a 1024-image buffer.
- validation: rank r evaluates images floor(r N / W) to floor((r + 1) N / W) - 1 of the
  sorted list, the shards of DALI's reader: every image is evaluated exactly once across
  the ranks, nothing is padded or repeated. The shards differ by at most one image, so
  the ranks may make different numbers of batches (never for ImageNet's 50,000 on 1, 2,
  4 or 8 ranks); add up correct predictions, loss sums and counts over the ranks once
  after the loop (one all_reduce), not batch by batch.

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
from dataclasses import dataclass

import numpy as np
import torch

from .device_loader import normalize
from .errors import DatasetError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
NUM_CLASSES = 1000
TRAIN_IMAGES, VAL_IMAGES = 1_281_167, 50_000   # ILSVRC-2012
CROP_SIZE = 224          # training and validation images are 224x224
VAL_RESIZE = 256         # validation: shorter side first resized to 256
CROP_AREA = (0.1, 1.0)   # training crop: fraction of the image's area ...
CROP_ASPECT = (0.8, 1.25)  # ... and its width / height
CROP_ATTEMPTS = 100
DALI_SEED = 12           # the authors' DALI pipelines are seeded 12 + rank
JPEG_SUFFIXES = (".jpeg", ".jpg")  # compared in lower case
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
                for directory, subdirectories, names in os.walk(entry.path, followlinks=True):
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

    return ImageNetFolders(root, classes, samples(scans["train"]), samples(scans["val"]))


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

def shard_bounds(num_images, rank, world):
    """[start, stop) of rank ``rank``'s contiguous shard of ``num_images`` (DALI's shards)."""
    return num_images * rank // world, num_images * (rank + 1) // world


def steps_per_epoch(num_images, batch_size, world=1):
    """Training steps per epoch on each of ``world`` ranks: ceil(ceil(N / world) / batch),
    one fewer when the last batch would hold a single image. ImageNet, 4 ranks, 256:
    ceil(1,281,167 / 4) = 320,292 images per rank, 1252 steps."""
    per_rank = -(-num_images // world)
    steps = -(-per_rank // batch_size)
    return steps - 1 if per_rank % batch_size == 1 and per_rank > 1 else steps


def train_shard(num_images, batch_size, rank, world, seed, epoch):
    """(image indices, positions) of rank ``rank``'s training images in ``epoch``, in the
    order it reads them. The order of the epoch is a random permutation drawn from
    (seed, epoch), extended by its first images to world * ceil(N / world); the rank's
    block of ceil(N / world) is cut to ``steps_per_epoch`` batches. A position is an
    image's place in the extended order: with (seed, epoch) it seeds the image's
    augmentation, which therefore depends neither on the number of workers nor on the
    process's random state."""
    per_rank = -(-num_images // world)
    order = np.random.default_rng((seed, epoch)).permutation(num_images)
    order = np.concatenate([order, order[:per_rank * world - num_images]])
    keep = min(per_rank, steps_per_epoch(num_images, batch_size, world) * batch_size)
    start = rank * per_rank
    return order[start:start + keep], np.arange(start, start + keep)


# ---- the torchvision path ----------------------------------------------------------------------

class _Images(torch.utils.data.Dataset):
    """The images of one split, decoded with PIL. Training keys are (index, (seed, epoch,
    position)): the key seeds the image's augmentation. Validation keys are indices."""

    def __init__(self, samples, train):
        self.samples = samples
        self.train = train

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        from PIL import Image

        index, entropy = key if self.train else (key, None)
        path, label = self.samples[index]
        with Image.open(path) as file:
            image = file.convert("RGB")
        if self.train:
            return train_transform(image, np.random.default_rng(entropy)), label
        return val_transform(image), label


class _Keys(torch.utils.data.Sampler):
    """The dataset keys of one rank in epoch ``epoch``, read anew by every pass of the
    DataLoader. (It holds no reference to its FolderBatches: no reference cycle keeps a
    DataLoader and its worker processes alive until the garbage collector runs.)"""

    def __init__(self, num_images, train, batch_size, rank, world, seed):
        self.num_images, self.train, self.batch_size = num_images, train, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch = 0

    def keys(self, epoch):
        if not self.train:
            return range(*shard_bounds(self.num_images, self.rank, self.world))
        indices, positions = train_shard(self.num_images, self.batch_size, self.rank, self.world,
                                         self.seed, epoch)
        return [(int(i), (self.seed, epoch, int(p))) for i, p in zip(indices, positions)]

    def __iter__(self):
        return iter(self.keys(self.epoch))

    def __len__(self):
        if self.train:
            per_rank = -(-self.num_images // self.world)
            steps = steps_per_epoch(self.num_images, self.batch_size, self.world)
            return min(per_rank, steps * self.batch_size)
        start, stop = shard_bounds(self.num_images, self.rank, self.world)
        return stop - start


class FolderBatches:
    """Batches of one split on one rank, read by the torchvision pipeline: a DataLoader
    with ``workers`` processes (kept from epoch to epoch) decodes and augments the
    images, uint8 batches go to ``device`` and are normalised there.

    Training: each pass is the next epoch (``epoch`` counts them; set it to resume),
    sharded by ``train_shard``. Validation: the rank's ``shard_bounds``, in order."""

    def __init__(self, samples, train, batch_size, workers, device, rank, world, seed,
                 memory_format=torch.contiguous_format):
        self.train, self.batch_size = train, batch_size
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.epoch = 0
        self._keys = _Keys(len(samples), train, batch_size, rank, world, seed)
        self.num_images = len(self._keys)
        self._loader = torch.utils.data.DataLoader(
            _Images(samples, train), batch_size=batch_size, sampler=self._keys, num_workers=workers,
            persistent_workers=workers > 0, pin_memory=self.device.type == "cuda")

    def keys(self, epoch):
        """The dataset keys this rank reads in ``epoch``: indices (validation), or
        (index, (seed, epoch, position)) pairs (training)."""
        return self._keys.keys(epoch)

    def __len__(self):
        return -(-self.num_images // self.batch_size)

    def state_dict(self):
        """What a resumed run needs: the epoch (the augmentation is drawn from (seed, epoch,
        position), not from a generator's state)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]

    def __iter__(self):
        if self.train:
            self._keys.epoch = self.epoch
            self.epoch += 1
        for images, labels in self._loader:
            images = normalize(images.to(self.device, non_blocking=True), MEAN, STD)
            yield (images.contiguous(memory_format=self.memory_format),
                   labels.to(self.device, non_blocking=True))


# ---- the DALI path -----------------------------------------------------------------------------

def _dali():
    """DALI's modules, or a DatasetError that says how to get them."""
    try:
        from nvidia.dali import fn, pipeline, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
    except ImportError:
        raise DatasetError("the DALI loader needs NVIDIA DALI, which is not installed: "
                           "`pip install nvidia-dali-cuda130`, or use the torchvision loader "
                           "(backend \"torchvision\")") from None
    return fn, pipeline, types, DALIGenericIterator, LastBatchPolicy


def dali_pipeline(samples, train, batch_size, threads, rank, world, decoder, device_id, seed):
    """The authors' DALI pipeline for one split on one rank (docs/data.md), reading
    ``samples`` (the same list as the torchvision path). ``decoder``: "gpu" decodes with
    DALI's "mixed" decoder and resizes on the GPU; "cpu" decodes and resizes on the CPU,
    then moves the images to GPU ``device_id`` for the last step, or, with ``device_id``
    None, runs everything on the CPU. Outputs: normalised float CHW images, int32 labels."""
    fn, pipeline, types, _, _ = _dali()
    pipe = pipeline.Pipeline(batch_size=batch_size, num_threads=threads, device_id=device_id, seed=seed)
    on_gpu = decoder == "gpu"
    with pipe:
        jpegs, labels = fn.readers.file(
            files=[path for path, _ in samples], labels=[label for _, label in samples],
            shard_id=rank, num_shards=world, random_shuffle=train, pad_last_batch=True, name="Reader")
        if train:
            images = fn.decoders.image_random_crop(
                jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB,
                random_aspect_ratio=list(CROP_ASPECT), random_area=list(CROP_AREA),
                num_attempts=CROP_ATTEMPTS)
            images = fn.resize(images, device="gpu" if on_gpu else "cpu", resize_x=CROP_SIZE,
                               resize_y=CROP_SIZE, interp_type=types.INTERP_TRIANGULAR)
            mirror = fn.random.coin_flip(probability=0.5)
        else:
            images = fn.decoders.image(jpegs, device="mixed" if on_gpu else "cpu", output_type=types.RGB)
            images = fn.resize(images, device="gpu" if on_gpu else "cpu", size=VAL_RESIZE,
                               mode="not_smaller", interp_type=types.INTERP_TRIANGULAR)
            mirror = False
        if not on_gpu and device_id is not None:
            images = images.gpu()
        images = fn.crop_mirror_normalize(
            images, dtype=types.FLOAT, output_layout="CHW", crop=(CROP_SIZE, CROP_SIZE),
            mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD], mirror=mirror)
        pipe.set_outputs(images, labels)
    return pipe


class DaliBatches:
    """Batches of one split on one rank from a DALI pipeline, through DALI's PyTorch
    iterator with the padding of the last batch removed. Each pass is the next epoch of
    the reader, which moves every rank on to the next shard (DALI's default). A pass
    yields the non-empty batches, at most ``len()`` of them: training ``steps`` (so that
    a last batch of one image is left out on every rank alike), validation the batches
    of the shard read in this pass.

    DALI cannot restart an epoch in the middle: the rest of a pass (the batches beyond
    ``len()``, or all that is left of an epoch ended early) is read, unused, before the
    next pass begins."""

    def __init__(self, pipe, train, batch_size, steps, shard_sizes, rank, device,
                 memory_format=torch.contiguous_format):
        _, _, _, iterator, policy = _dali()
        self._iterator = iterator([pipe], ["images", "labels"], reader_name="Reader",
                                  last_batch_policy=policy.PARTIAL, auto_reset=True)
        self.train, self.batch_size, self.steps = train, batch_size, steps
        self.shard_sizes, self.rank = shard_sizes, rank
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.passes = 0
        self._unfinished = False

    def __len__(self):
        if self.train:
            return self.steps
        shard = self.shard_sizes[(self.rank + self.passes) % len(self.shard_sizes)]
        return -(-shard // self.batch_size)

    def _finish(self):
        """Read the rest of DALI's epoch (``next``: ``iter`` would ask DALI for a reset)."""
        try:
            while True:
                next(self._iterator)
        except StopIteration:
            pass

    def __iter__(self):
        if self._unfinished:
            self._finish()
            self.passes += 1
        count, self._unfinished = len(self), True
        for (batch,) in self._iterator:
            labels = batch["labels"].squeeze(-1).long()
            if len(labels):
                images = batch["images"].to(self.device, non_blocking=True)
                yield (images.contiguous(memory_format=self.memory_format),
                       labels.to(self.device, non_blocking=True))
                count -= 1
                if count == 0:
                    self._finish()
                    break
        self._unfinished = False
        self.passes += 1


# ---- what the training program calls ------------------------------------------------------------

def imagenet_loaders(root, batch_size, workers, device, rank=0, world=1, backend="torchvision",
                     dali_device="cpu", seed=0, memory_format=torch.contiguous_format, eval_batch_size=None):
    """(training batches, validation batches, training steps per epoch) of rank ``rank``
    of ``world`` (one process: 0 of 1), ``batch_size`` images per rank and step.

    The training batches start a new shuffled epoch each time they are iterated and have
    ``len()`` = the steps per epoch (``steps_per_epoch``: 1252 for ImageNet at 256 on 4
    ranks); the validation batches (of ``eval_batch_size``, default ``batch_size``) are
    this rank's part of the validation set (each image on exactly one rank). Batches:
    float32 normalised images (B, 3, 224, 224) in ``memory_format`` and int64 labels,
    both on ``device``.

    ``backend``: "torchvision" (``workers`` DataLoader processes) or "dali" (``workers``
    DALI threads; ``dali_device`` "gpu" decodes on the GPU, "cpu" on the CPU, the only
    choice when ``device`` is the CPU). ``seed``: the training order and augmentation of
    the torchvision path, the same on every rank (the training batches' ``epoch``
    attribute is the epoch the next pass reads: set it to resume); the DALI pipelines
    are seeded 12 + seed * world + rank (the authors': 12 + rank).

    DatasetError (one line): the folders are missing or not in the ImageNet layout
    (``check_imagenet``), DALI is asked for and not installed, or GPU decoding is asked
    for without a CUDA device."""
    if backend not in ("torchvision", "dali"):
        raise ValueError(f"backend must be 'torchvision' or 'dali', not {backend!r}")
    if dali_device not in ("cpu", "gpu"):
        raise ValueError(f"dali_device must be 'cpu' or 'gpu', not {dali_device!r}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} ranks")
    if batch_size < 1 or seed < 0:
        raise ValueError("batch_size must be positive and seed non-negative")
    device = torch.device(device)
    if backend == "dali":
        if device.type != "cuda" and dali_device == "gpu":
            raise DatasetError(f"DALI decoding on the GPU needs a CUDA device, not {device}: decode on "
                               f"the CPU (dali_device \"cpu\") or use the torchvision loader")
        _dali()
    folders = check_imagenet(root)
    for name, samples in (("train", folders.train), ("val", folders.val)):
        if len(samples) < world:
            raise DatasetError(f"ImageNet at {root}: {name}/ holds {len(samples)} images, fewer than "
                               f"the {world} ranks")
    steps = steps_per_epoch(len(folders.train), batch_size, world)
    eval_batch_size = eval_batch_size or batch_size
    if backend == "torchvision":
        def make(samples, train):
            return FolderBatches(samples, train, batch_size if train else eval_batch_size, workers, device,
                                 rank, world, seed, memory_format)
        return make(folders.train, True), make(folders.val, False), steps

    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()

    def make(samples, train):
        size = batch_size if train else eval_batch_size
        pipe = dali_pipeline(samples, train, size, max(1, workers), rank, world, dali_device,
                             device_id, DALI_SEED + seed * world + rank)
        sizes = [stop - start for start, stop in (shard_bounds(len(samples), r, world) for r in range(world))]
        return DaliBatches(pipe, train, size, steps, sizes, rank, device, memory_format)

    return make(folders.train, True), make(folders.val, False), steps
