"""Batches made on the training device: the whole dataset stays there as one uint8
tensor, and each batch is gathered, augmented and normalised with a handful of
kernels - no worker processes, no host-to-device copy per step, no host sync.

The reference pipeline of the authors' code (a torchvision DataLoader with PIL
transforms in worker processes) is ``torchvision_loader``; the augmentations here
draw from the same distributions (the tests compare them).
"""
import functools

import torch
import torch.nn.functional as F


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


def random_crop_flip(images: torch.Tensor, padding: int) -> torch.Tensor:
    """Per image: zero-pad by ``padding`` pixels, crop a random window of the image's
    size, flip horizontally with probability 1/2 (torchvision's ``RandomCrop(size,
    padding)`` + ``RandomHorizontalFlip()``) - all images of the batch in one gather."""
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n, 1), device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), device=device)
    flip = torch.rand(n, 1, device=device) < 0.5
    rows = dy + torch.arange(h, device=device)
    columns = torch.arange(w, device=device)
    cols = dx + torch.where(flip, w - 1 - columns, columns)
    return padded[torch.arange(n, device=device).view(n, 1, 1, 1),
                  torch.arange(c, device=device).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1),
                  cols.view(n, 1, 1, w)]


class DeviceLoader:
    """Batches of a dataset held on ``device`` as one uint8 tensor.

    Training: a fresh random order every epoch, ``augment`` (uint8 batch -> uint8
    batch), and no batch of a single image (BatchNorm cannot train on it: such a
    last batch is dropped). Evaluation: the stored order, no augmentation. Batches
    are float32, normalised with ``mean`` and ``std``, in ``memory_format``.
    """

    def __init__(self, images, labels, batch_size, train, device, mean, std, augment=None,
                 memory_format=torch.contiguous_format):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.train = train
        self.mean, self.std = mean, std
        self.augment = augment
        self.memory_format = memory_format

    def __len__(self):
        n = len(self.labels)
        batches = -(-n // self.batch_size)
        return batches - 1 if self.train and n % self.batch_size == 1 and n > 1 else batches

    def __iter__(self):
        n = len(self.labels)
        order = torch.randperm(n, device=self.images.device) if self.train else None
        for i in range(len(self)):
            index = slice(i * self.batch_size, (i + 1) * self.batch_size)
            if order is None:
                images, labels = self.images[index], self.labels[index]
            else:
                images, labels = self.images[order[index]], self.labels[order[index]]
                if self.augment is not None:
                    images = self.augment(images)
            batch = normalize(images, self.mean, self.std)
            yield batch.contiguous(memory_format=self.memory_format), labels
