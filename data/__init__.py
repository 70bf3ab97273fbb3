"""Datasets by name: what each one is (classes, image size, normalisation, training
augmentation, where its files are) and batches of it on the training device.

    spec = DATASETS["cifar100"]
    images, labels = spec.read(root, "train")
    loader = spec.loader(images, labels, batch_size=256, train=True, device=device)
"""
from dataclasses import dataclass
from typing import Callable

import torch

from .cifar import read_cifar
from .device_loader import DeviceLoader, normalize, random_crop_flip
from .errors import DatasetError
from .torchvision_loader import torchvision_loader

# The authors normalise CIFAR with the ImageNet constants.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Dataset:
    name: str
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    padding: int              # training augmentation: random crop after zero padding, and flip
    read_split: Callable      # (root, name, split) -> (uint8 images (N, 3, H, W), int64 labels)

    def read(self, root: str, split: str):
        """(images, labels) of the "train" or "test" split; DatasetError if missing or unreadable."""
        return self.read_split(root, self.name, split)

    def augment(self, images):
        return random_crop_flip(images, self.padding)

    def loader(self, images, labels, batch_size, train, device, memory_format=torch.contiguous_format):
        """Batches on ``device`` (see DeviceLoader), augmented when ``train``."""
        return DeviceLoader(images, labels, batch_size, train, device, self.mean, self.std,
                            self.augment if train else None, memory_format)

    def reference_loader(self, images, labels, batch_size, train, workers):
        """The same batches from the authors' pipeline (torchvision, PIL, workers)."""
        return torchvision_loader(images, labels, batch_size, train, workers, self.mean, self.std,
                                  self.padding)


DATASETS = {
    "cifar10": Dataset("cifar10", 10, 32, IMAGENET_MEAN, IMAGENET_STD, 4, read_cifar),
    "cifar100": Dataset("cifar100", 100, 32, IMAGENET_MEAN, IMAGENET_STD, 4, read_cifar),
}
