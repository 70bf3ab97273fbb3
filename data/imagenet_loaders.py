"""The two backends that read ImageNet's files batch by batch (``imagenet.py`` says what
ImageNet is: its layout, augmentation and shards):
- "torchvision" (runs everywhere): PIL decoding and the transforms of ``imagenet.py`` in
  DataLoader workers; uint8 batches are copied to the device and normalised there.
- "dali": the authors' NVIDIA DALI pipelines (``pip install nvidia-dali-cuda130``,
  optional), decoding on the GPU (DALI's "mixed" decoder) or on the CPU (the authors'
  ``--dali_cpu``).

    folders = check_imagenet("datasets/imagenet")
    train = imagenet_batches(folders.train, True, 256, "cuda:0", shard=rank, shards=4, workers=8)
    for epoch in range(epochs):
        train_one_epoch(model, opt, train, ...)   # each pass over ``train`` is a new epoch
"""
import numpy as np
import torch

from .device_loader import normalize
from .errors import DatasetError
from .imagenet import (CROP_AREA, CROP_ASPECT, CROP_ATTEMPTS, CROP_SIZE, DALI_SEED, MEAN, STD, VAL_RESIZE,
                       shard_bounds, steps_per_epoch, train_shard, train_transform, val_transform)

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
        try:
            with Image.open(path) as file:
                image = file.convert("RGB")
        except Exception as error:  # PIL raises several kinds for a damaged file
            raise DatasetError(f"{UNREADABLE}{path}: {type(error).__name__}: {error}") from None
        if self.train:
            return train_transform(image, np.random.default_rng(entropy)), label
        return val_transform(image), label


UNREADABLE = "cannot decode the image "


def _named_failures(loader):
    """The loader's batches; an image that cannot be decoded in a worker process stops
    them with a one-line DatasetError naming the file (not the worker's traceback)."""
    try:
        yield from loader
    except DatasetError as error:
        lines = [line for line in str(error).splitlines() if UNREADABLE in line]
        raise DatasetError(lines[-1][lines[-1].index(UNREADABLE):] if lines else str(error)) from None


class _Keys(torch.utils.data.Sampler):
    """The dataset keys of one rank in epoch ``epoch``, read anew by every pass of the
    DataLoader. (It holds no reference to its FolderBatches: no reference cycle keeps a
    DataLoader and its worker processes alive until the garbage collector runs.)"""

    def __init__(self, num_images, train, batch_size, shard, shards, seed):
        self.num_images, self.train, self.batch_size = num_images, train, batch_size
        self.shard, self.shards, self.seed = shard, shards, seed
        self.epoch = 0

    def keys(self, epoch):
        if not self.train:
            return range(*shard_bounds(self.num_images, self.shard, self.shards))
        indices, positions = train_shard(self.num_images, self.batch_size, self.shard, self.shards,
                                         self.seed, epoch)
        return [(int(i), (self.seed, epoch, int(p))) for i, p in zip(indices, positions)]

    def __iter__(self):
        return iter(self.keys(self.epoch))

    def __len__(self):
        if self.train:
            per_shard = -(-self.num_images // self.shards)
            steps = steps_per_epoch(self.num_images, self.batch_size, self.shards)
            return min(per_shard, steps * self.batch_size)
        start, stop = shard_bounds(self.num_images, self.shard, self.shards)
        return stop - start


class FolderBatches:
    """Batches of one split on one rank, read by the torchvision pipeline: a DataLoader
    with ``workers`` processes (kept from epoch to epoch) decodes and augments the
    images, uint8 batches go to ``device`` and are normalised there.

    Training: each pass is the next epoch (``epoch`` counts them; set it to resume),
    sharded by ``train_shard``. Validation: the rank's ``shard_bounds``, in order."""

    def __init__(self, samples, train, batch_size, workers, device, shard, shards, seed,
                 memory_format=torch.contiguous_format):
        self.train, self.batch_size = train, batch_size
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.epoch = 0
        self._keys = _Keys(len(samples), train, batch_size, shard, shards, seed)
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
        for images, labels in _named_failures(self._loader):
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


def dali_pipeline(samples, train, batch_size, threads, shard, shards, decoder, device_id, seed):
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
            shard_id=shard, num_shards=shards, random_shuffle=train, pad_last_batch=True, name="Reader")
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

    def __init__(self, pipe, train, batch_size, steps, shard_sizes, shard, device,
                 memory_format=torch.contiguous_format):
        _, _, _, iterator, policy = _dali()
        self._iterator = iterator([pipe], ["images", "labels"], reader_name="Reader",
                                  last_batch_policy=policy.PARTIAL, auto_reset=True)
        self.train, self.batch_size, self.steps = train, batch_size, steps
        self.shard_sizes, self.shard = shard_sizes, shard
        self.device = torch.device(device)
        self.memory_format = memory_format
        self.passes = 0
        self._unfinished = False

    def __len__(self):
        if self.train:
            return self.steps
        size = self.shard_sizes[(self.shard + self.passes) % len(self.shard_sizes)]
        return -(-size // self.batch_size)

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


# ---- the batches of one split on one shard ---------------------------------------------------------

def imagenet_batches(samples, train, batch_size, device, *, shard=0, shards=1, workers=0, backend="torchvision",
                     decoder="cpu", seed=0, memory_format=torch.contiguous_format):
    """Batches of one split (``samples``: ``check_imagenet``'s ``train`` or ``val``) on
    ``shard`` of ``shards`` (one per rank), ``batch_size`` images each: float32 normalised
    images (B, 3, 224, 224) in ``memory_format`` and int64 labels, both on ``device``.

    Training batches start a new shuffled epoch each time they are iterated, and have
    ``len()`` = the steps per epoch (``steps_per_epoch``: 1252 for ImageNet at 256 on 4
    ranks); ``state_dict()`` holds what a resumed run needs. Validation batches are the
    shard's part of the validation set (each image on exactly one shard).

    ``backend``: "torchvision" (``workers`` DataLoader processes) or "dali" (``workers``
    DALI threads; ``decoder`` "gpu" decodes on the GPU, "cpu" on the CPU, the only choice
    when ``device`` is the CPU). ``seed``: the training order and augmentation of the
    torchvision path, the same on every rank; the DALI pipelines are seeded
    12 + seed * shards + shard (the authors': 12 + rank). DatasetError (one line): DALI
    is asked for and not installed, GPU decoding without a CUDA device, fewer images than
    shards."""
    if backend not in ("torchvision", "dali") or decoder not in ("cpu", "gpu"):
        raise ValueError(f"unknown backend {backend!r} or decoder {decoder!r}")
    if not 0 <= shard < shards or batch_size < 1 or seed < 0:
        raise ValueError(f"shard {shard} of {shards}, batch {batch_size}, seed {seed}")
    if len(samples) < shards:
        raise DatasetError(f"ImageNet's {'training' if train else 'validation'} set holds {len(samples)} images, "
                           f"fewer than the {shards} ranks")
    device = torch.device(device)
    if backend == "torchvision":
        return FolderBatches(samples, train, batch_size, workers, device, shard, shards, seed, memory_format)
    if device.type != "cuda" and decoder == "gpu":
        raise DatasetError(f"DALI decoding on the GPU needs a CUDA device, not {device}: decode on the CPU "
                           f"(--loader dali-cpu) or use the torchvision loader")
    _dali()
    device_id = None
    if device.type == "cuda":
        device_id = device.index if device.index is not None else torch.cuda.current_device()
    pipe = dali_pipeline(samples, train, batch_size, max(1, workers), shard, shards, decoder, device_id,
                         DALI_SEED + seed * shards + shard)
    sizes = [stop - start for start, stop in (shard_bounds(len(samples), s, shards) for s in range(shards))]
    steps = steps_per_epoch(len(samples), batch_size, shards)
    return DaliBatches(pipe, train, batch_size, steps, sizes, shard, device, memory_format)


class Interleaved:
    """The batches of several training shards in turn, step by step: the virtual ranks of
    one process, each with its shard of ImageNet."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self):
        for step in zip(*self.loaders):
            yield from step

    def state_dict(self):
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, states):
        for loader, state in zip(self.loaders, states):
            loader.load_state_dict(state)
