"""Datasets by name: what each one is (classes, image size, normalisation, training
augmentation, where its files are) and batches of it on the training device.

    spec = DATASETS["cifar100"]
    images, labels = spec.read(root, "train")
    loader = spec.loader(images, labels, batch_size=256, train=True, device=device)
"""
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch

from .cifar import read_cifar
from .imagenet import imagenet_loaders
from .device_loader import DeviceLoader, normalize, random_crop_flip, random_resized_crop_flip
from .errors import DatasetError
from .tiny_imagenet import read_tiny_imagenet
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
    read_split: Callable        # (root, name, split) -> (uint8 images (N, 3, H, W), int64 labels)
    augment: Callable           # the training augmentation on the device: (uint8 batch, generator) -> uint8 batch
    reference_augment: Callable  # () -> the same as torchvision transforms of PIL images
    # A dataset too large for the device is read from its files, batch by batch, per rank:
    # (root, batch_size, workers, device, rank, world, backend, dali_device, seed,
    #  memory_format, eval_batch_size) -> (training batches, test batches, steps per epoch)
    folder_loaders: Callable = None
    default_root: str = "./datasets"  # where main.py reads it without --data_root (download_data.sh puts it there)

    def read(self, root: str, split: str):
        """(images, labels) of the "train" or "test" split (Tiny-ImageNet's "test" is its
        val/ folder); DatasetError if missing or unreadable."""
        return self.read_split(root, self.name, split)

    def loader(self, images, labels, batch_size, train, device, memory_format=torch.contiguous_format,
               shards=(0,), world=1, seed=0):
        """Batches on ``device`` (see DeviceLoader: the shards of a rank among ``world``),
        augmented when ``train``."""
        return DeviceLoader(images, labels, batch_size, train, device, self.mean, self.std,
                            self.augment if train else None, memory_format, shards, world, seed)

    def reference_loader(self, images, labels, batch_size, train, workers):
        """The same batches from the authors' pipeline (torchvision, PIL, workers)."""
        return torchvision_loader(images, labels, batch_size, train, workers, self.mean, self.std,
                                  self.reference_augment() if train else [])


def _cifar_reference_augment():
    import torchvision.transforms as T
    return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]


def _tiny_imagenet_reference_augment():
    import torchvision.transforms as T
    return [T.RandomResizedCrop(64), T.RandomHorizontalFlip()]


_cifar = dict(image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, read_split=read_cifar,
              augment=partial(random_crop_flip, padding=4), reference_augment=_cifar_reference_augment)
DATASETS = {
    "cifar10": Dataset("cifar10", 10, **_cifar),
    "cifar100": Dataset("cifar100", 100, **_cifar),
    # The authors' Tiny-ImageNet pipeline: RandomResizedCrop(64) + flip for training,
    # Resize(64) - the identity on its 64x64 images - for evaluation; its own constants.
    "tiny-imagenet": Dataset("tiny-imagenet", 200, image_size=64, mean=(0.4802, 0.4481, 0.3975),
                             std=(0.2770, 0.2691, 0.2821), read_split=read_tiny_imagenet,
                             augment=partial(random_resized_crop_flip, size=64),
                             reference_augment=_tiny_imagenet_reference_augment),
    # The authors' ImageNet: read from its JPEG folders (data/imagenet.py), with the
    # augmentation of their DALI pipelines, by torchvision workers or by DALI.
    "imagenet": Dataset("imagenet", 1000, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                        read_split=None, augment=None, reference_augment=None, folder_loaders=imagenet_loaders,
                        default_root="./datasets/imagenet"),
}
