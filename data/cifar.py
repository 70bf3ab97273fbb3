"""CIFAR-10 / CIFAR-100: read the python-pickle files, keep them on the training
device, and augment whole batches there.

The fast path (``DeviceLoader``) holds the dataset as one uint8 tensor on the
device and produces each batch with a handful of kernels: random pad-4 crop and
horizontal flip in pixel space (the distribution of torchvision's
``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``), then ``/255`` and the
normalisation of the released code. The reference's pipeline (torchvision
DataLoader, PIL transforms, worker processes) is ``torchvision_loader``.
"""
import functools
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PADDING = 4

# name -> (folder, train files, test file, label key, number of classes, download argument)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
}
NUM_CLASSES = {name: layout[4] for name, layout in LAYOUTS.items()}


class DatasetError(Exception):
    """A dataset that is missing or unreadable; the message says what to do."""


def read_cifar(root: str, name: str):
    """Read ``name`` ("cifar10" or "cifar100") from ``root``.

    Returns ``(train_images, train_labels, test_images, test_labels)``: uint8
    tensors of shape (N, 3, 32, 32) and int64 label tensors.
    """
    _check_present(root, name, ("train", "test"))
    return (*read_split(root, name, "train"), *read_split(root, name, "test"))


def read_split(root: str, name: str, split: str):
    """(images, labels) of the "train" or "test" split of ``name``."""
    _check_present(root, name, (split,))
    folder, train_files, test_file, label_key, num_classes = LAYOUTS[name]
    files = train_files if split == "train" else [test_file]
    parts = [_read_batch(os.path.join(root, folder, f), label_key, num_classes) for f in files]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


def _check_present(root, name, splits):
    """DatasetError saying how to download ``name`` if a file of ``splits`` is missing."""
    if name not in LAYOUTS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(LAYOUTS)}")
    folder, train_files, test_file, _, _ = LAYOUTS[name]
    files = (train_files if "train" in splits else []) + ([test_file] if "test" in splits else [])
    missing = [f for f in files if not os.path.isfile(os.path.join(root, folder, f))]
    if missing:
        where = "" if os.path.normpath(root) == "datasets" else f"DATA_ROOT={root} "
        raise DatasetError(f"{name} not found: {os.path.join(root, folder, missing[0])} is missing; "
                           f"download it with `{where}bash download_data.sh {name}`")


def _read_batch(path, label_key, num_classes):
    """One pickle file -> (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    The files were written by Python 2: their strings load as ``str`` only with
    ``encoding="latin1"`` (which is also how numpy gets its raw bytes back)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = np.asarray(entry["data"])
        labels = np.asarray(entry[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],):
            raise ValueError(f"{labels.shape[0]} labels for {data.shape[0]} images")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels outside 0..{num_classes - 1}")
    except Exception as error:  # any failure to parse means the same thing to the user
        raise DatasetError(f"cannot read {path}: {type(error).__name__}: {error} "
                           f"(delete the folder and download it again)") from None
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


@functools.lru_cache(maxsize=None)
def _mean_std(device: torch.device):
    """The normalisation constants on ``device``, made once: building them from Python
    lists at every batch would be a host-to-device copy, which waits for the GPU."""
    return (torch.tensor(MEAN, device=device).view(3, 1, 1),
            torch.tensor(STD, device=device).view(3, 1, 1))


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32, as ToTensor + Normalize compute it: x / 255, then
    (x - mean) / std."""
    mean, std = _mean_std(images.device)
    return images.float().div(255).sub_(mean).div_(std)


def random_crop_flip(images: torch.Tensor, padding: int = PADDING) -> torch.Tensor:
    """Per image: zero-pad by ``padding`` pixels, crop a random 32x32 window, flip
    horizontally with probability 1/2 - all images of the batch in one gather."""
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

    Training: a fresh random order every epoch, augmentation, and no batch of a
    single image (BatchNorm cannot train on it: such a last batch is dropped).
    Evaluation: the stored order, no augmentation. Batches are float32,
    normalised, and in ``memory_format``.
    """

    def __init__(self, images, labels, batch_size, train, device,
                 memory_format=torch.contiguous_format):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size = batch_size
        self.train = train
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
                images = random_crop_flip(images)
            yield normalize(images).contiguous(memory_format=self.memory_format), labels


class PILDataset(torch.utils.data.Dataset):
    """Images as PIL images through torchvision transforms, one at a time."""

    def __init__(self, images, labels, transform):
        self.pixels = images.permute(0, 2, 3, 1).numpy()  # HWC, as PIL wants
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.pixels[i])), self.labels[i]


def torchvision_loader(images, labels, batch_size, train, workers):
    """The released code's input pipeline: a torchvision DataLoader with PIL
    transforms in ``workers`` processes, batches on the CPU. Slower; for
    comparison and for datasets that do not fit on the device.

    The workers are started anew every epoch (not persistent): each epoch seeds
    them from the main process's random state, which a checkpoint holds, so a
    resumed run draws the same augmentations as an uninterrupted one."""
    import torchvision.transforms as T

    steps = [T.RandomCrop(32, padding=PADDING), T.RandomHorizontalFlip()] if train else []
    transform = T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])
    drop_last = train and len(labels) % batch_size == 1 and len(labels) > 1
    return torch.utils.data.DataLoader(PILDataset(images, labels, transform), batch_size=batch_size,
                                       shuffle=train, num_workers=workers,
                                       pin_memory=torch.cuda.is_available(), drop_last=drop_last)
