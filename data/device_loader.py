"""Batches made on the training device: the whole dataset stays there as one uint8
tensor, and each batch is gathered, augmented and normalised with a handful of
kernels - no worker processes, no host-to-device copy per step, no host sync.

The reference pipeline of the authors' code (a torchvision DataLoader with PIL
transforms in worker processes) is ``torchvision_loader``; the augmentations here
draw from the same distributions (the tests compare them).
"""
import functools
import math

import torch
import torch.nn.functional as F

from utils import seeds


@functools.lru_cache(maxsize=None)
def _constants(mean, std, device):
    """Normalisation constants on ``device``, made once: building them from Python
    tuples at every batch would be a host-to-device copy, which waits for the GPU."""
    return (torch.tensor(mean, device=device).view(-1, 1, 1),
            torch.tensor(std, device=device).view(-1, 1, 1))


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 as ToTensor + Normalize compute it: x / 255, then
    (x - mean) / std."""
    m, s = _constants(tuple(mean), tuple(std), images.device)
    return images.float().div(255).sub_(m).div_(s)


def random_crop_flip(images: torch.Tensor, padding: int, generator=None) -> torch.Tensor:
    """Per image: zero-pad by ``padding`` pixels, crop a random window of the image's
    size, flip horizontally with probability 1/2 (torchvision's ``RandomCrop(size,
    padding)`` + ``RandomHorizontalFlip()``) - all images of the batch in one gather."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device, generator=generator)
    flip = torch.rand(n, 1, device=device, generator=generator) < 0.5
    rows = dy + torch.arange(h, device=device)
    columns = torch.arange(w, device=device)
    cols = dx + torch.where(flip, w - 1 - columns, columns)
    return padded[torch.arange(n, device=device).view(n, 1, 1, 1),
                  torch.arange(c, device=device).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1),
                  cols.view(n, 1, 1, w)]


def resized_crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), device="cpu",
                       generator=None):
    """``n`` crop boxes (top, left, box height, box width), int64 tensors of shape (n,),
    drawn as torchvision's ``RandomResizedCrop.get_params`` draws one for a ``height`` x
    ``width`` image: up to 10 attempts, each an area fraction uniform in ``scale`` and an
    aspect ratio (width / height) log-uniform in ``ratio``, sides rounded to integers; the
    first attempt that fits is placed uniformly in the image. An image whose 10 attempts
    all fail gets the centre crop of the fallback (the whole image, cut to the nearest
    allowed aspect ratio). All attempts of all images are drawn at once."""
    attempts = 10
    area = torch.empty(n, attempts, device=device).uniform_(*scale, generator=generator) * (height * width)
    log_ratio = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                 generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * aspect))  # round half to even, as Python's round
    h = torch.round(torch.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(1, keepdim=True)  # the first attempt that fits (0 if none)
    found = fits.any(1)
    w = w.gather(1, first).squeeze(1).long()
    h = h.gather(1, first).squeeze(1).long()
    top = (torch.rand(n, device=device, generator=generator) * (height - h + 1)).floor().long()
    left = (torch.rand(n, device=device, generator=generator) * (width - w + 1)).floor().long()
    # the fallback, as get_params: whole image unless its aspect ratio is outside ``ratio``
    if width / height < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    top = torch.where(found, top, (height - fallback_h) // 2)
    left = torch.where(found, left, (width - fallback_w) // 2)
    h = torch.where(found, h, fallback_h)
    w = torch.where(found, w, fallback_w)
    return top, left, h, w


def _source_pixels(start, extent, size, flip=None):
    """Where output pixel x of a bilinear resize of a crop [start, start + extent) to
    ``size`` pixels reads from: pixel centres aligned (x + 0.5) * extent / size - 0.5 in
    the crop, clamped to the crop (as PIL's BILINEAR when enlarging: the edge pixel alone
    beyond the outermost centres). Returns the two neighbours (absolute indices) and the
    weight of the second, each (n, size); ``flip`` (n,) mirrors the output."""
    x = torch.arange(size, device=start.device, dtype=torch.float32).expand(len(start), size)
    if flip is not None:
        x = torch.where(flip.view(-1, 1), size - 1 - x, x)
    last = (extent - 1).view(-1, 1)
    source = ((x + 0.5) * (extent.view(-1, 1).float() / size) - 0.5).clamp(min=0)
    source = torch.minimum(source, last.float())
    low = source.floor()
    weight = source - low
    low = low.long()
    high = torch.minimum(low + 1, last)
    return start.view(-1, 1) + low, start.view(-1, 1) + high, weight


def resized_crop_flip(images: torch.Tensor, top, left, height, width, flip, size: int) -> torch.Tensor:
    """Per image k: crop rows [top_k, top_k + height_k) and columns [left_k, left_k +
    width_k), resize to ``size`` x ``size`` bilinearly, mirror horizontally where
    ``flip_k``: torchvision's ``resized_crop(..., BILINEAR)`` + ``hflip`` of a PIL image,
    for crops no larger than ``size`` (every crop of Tiny-ImageNet's 64x64 images), which
    are only enlarged: no antialiasing is involved (a larger crop would be shrunk without
    PIL's antialiasing filter). As PIL, the columns are interpolated first and rounded to
    integers (half up), then the rows: the result equals PIL's pixel for pixel (the tests
    check it to within one).
    uint8 in, uint8 out; the whole batch in six gathers."""
    n, c, _, w = images.shape
    y0, y1, wy = _source_pixels(top, height, size)
    x0, x1, wx = _source_pixels(left, width, size, flip)
    wy, wx = wy.view(n, 1, size, 1), wx.view(n, 1, 1, size)

    def along_row(rows):  # the rows ``rows`` (n, size), their columns interpolated and rounded half up
        picked = images.gather(2, rows.view(n, 1, size, 1).expand(n, c, size, w))
        left_pixel = picked.gather(3, x0.view(n, 1, 1, size).expand(n, c, size, size)).float()
        right_pixel = picked.gather(3, x1.view(n, 1, 1, size).expand(n, c, size, size)).float()
        return (left_pixel * (1 - wx) + right_pixel * wx).add_(0.5).floor_()

    out = (along_row(y0) * (1 - wy)).add_(along_row(y1) * wy).add_(0.5).floor_()
    return out.clamp_(0, 255).to(torch.uint8)


def random_resized_crop_flip(images: torch.Tensor, size: int, scale=(0.08, 1.0),
                             ratio=(3 / 4, 4 / 3), generator=None) -> torch.Tensor:
    """torchvision's ``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip()``
    on a uint8 batch (N, C, H, W), each image with its own box (``resized_crop_boxes``) and
    flip, the whole batch at once on its device; uint8 (N, C, size, size) out."""
    n, _, h, w = images.shape
    boxes = resized_crop_boxes(n, h, w, scale, ratio, images.device, generator)
    flip = torch.rand(n, device=images.device, generator=generator) < 0.5
    return resized_crop_flip(images, *boxes, flip, size)


class DeviceLoader:
    """Batches of a dataset held on ``device`` as one uint8 tensor, for one rank (or
    several: the virtual ranks of one process) of a run on ``shard_count`` ranks.

    Training: every epoch a new order of the whole set, the same on every rank (drawn
    from ``seed`` and the epoch number), dealt into ``shard_count`` shards as torch's
    DistributedSampler deals them (shard g takes every shard_count-th image of the order,
    padded by wrapping around so that the shards are equally long). This loader
    batches the shards ``shards`` and yields, step by step, one batch of each, in the
    order of ``shards``. Each shard's augmentation draws from a generator of its own,
    so a shard gets the same batches whichever process holds it. No batch of a single
    image (BatchNorm cannot train on it: such a last batch is dropped).

    Evaluation: the stored order, no augmentation; with ``shard_count`` > 1, shard g is the
    g-th contiguous slice of the set, so that the ranks see every image once.

    Batches are float32, normalised with ``mean`` and ``std``, in ``memory_format``.
    ``state_dict`` holds what a resumed run needs: the epoch and the generators.
    """

    def __init__(self, images, labels, batch_size, train, device, mean, std, augment=None,
                 memory_format=torch.contiguous_format, shards=(0,), shard_count=1, seed=0):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.mean, self.std = mean, std
        self.augment = augment
        self.memory_format = memory_format
        self.shards, self.shard_count, self.seed = list(shards), shard_count, seed
        self.epoch = 0
        self.generators = [seeds.generator(device, seed, "augment", g) for g in self.shards]

    def shard_size(self):
        n = len(self.labels)
        if self.train:
            return -(-n // self.shard_count)
        part = self._slice(self.shards[0])
        return part.stop - part.start

    def steps(self) -> int:
        """Batches per shard in an epoch."""
        size = self.shard_size()
        batches = -(-size // self.batch_size)
        return batches - 1 if self.train and size % self.batch_size == 1 and size > 1 else batches

    def __len__(self):
        return self.steps() * len(self.shards)

    def __iter__(self):
        if not self.train:
            yield from self._evaluation_batches()
            return
        order = self._order(self.epoch)
        self.epoch += 1
        dealt = [order[g::self.shard_count] for g in self.shards]
        for i in range(self.steps()):
            for indices, generator in zip(dealt, self.generators):
                index = indices[i * self.batch_size:(i + 1) * self.batch_size]
                images = self.images[index]
                if self.augment is not None:
                    images = self.augment(images, generator=generator)
                yield self._batch(images), self.labels[index]

    def _order(self, epoch):
        """This epoch's order of the whole set, padded to a multiple of ``shard_count``."""
        n = len(self.labels)
        order = torch.randperm(n, generator=seeds.generator("cpu", self.seed, "order", epoch))
        order = torch.cat([order, order[:-n % self.shard_count]]) if n % self.shard_count else order
        return order.to(self.images.device)

    def _slice(self, shard):
        n = len(self.labels)
        return slice(shard * n // self.shard_count, (shard + 1) * n // self.shard_count)

    def _evaluation_batches(self):
        for shard in self.shards:
            part = self._slice(shard)
            images, labels = self.images[part], self.labels[part]
            for i in range(0, len(labels), self.batch_size):
                yield self._batch(images[i:i + self.batch_size]), labels[i:i + self.batch_size]

    def _batch(self, images):
        return normalize(images, self.mean, self.std).contiguous(memory_format=self.memory_format)

    def state_dict(self):
        return {"epoch": self.epoch, "generators": [g.get_state() for g in self.generators]}

    def load_state_dict(self, state):
        self.epoch = state["epoch"]
        for generator, saved in zip(self.generators, state["generators"]):
            generator.set_state(saved.cpu())
