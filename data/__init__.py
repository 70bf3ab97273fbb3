"""Datasets by name. Every dataset answers one call, whatever it is read from:

    train, test = DATASETS["cifar100"].loaders(cfg, root, world, device)    # a training run
    test = DATASETS["imagenet"].test_loader(cfg, root, world, device)       # an evaluation

``cfg`` is the run config (batch sizes, ``loader``, ``workers``, ``seed``,
``virtual_ranks``), ``world`` the ranks (``utils.distributed.World``). ``train`` yields,
step by step, one batch per virtual rank of this process; each pass over it is the next
epoch; ``len(train)`` is its batches per epoch and ``state_dict()`` /
``load_state_dict()`` hold what a resumed run needs. ``test`` yields this rank's part of
the test set (every image on exactly one rank). Batches are (float32 normalised images
in the device's memory format, int64 labels), on ``device``. Both calls raise a
one-line DatasetError when the data cannot serve the run, before anything is trained.

Two kinds of dataset:
- ``InMemory`` (CIFAR, Tiny-ImageNet): read whole into one uint8 tensor, held on the
  training device and augmented there (``device_loader.py``), or served by the authors'
  torchvision pipeline (``--loader torchvision``);
- ``ImageFolders`` (ImageNet): read from its JPEG files batch by batch, by torchvision
  workers or NVIDIA DALI (``imagenet_loaders.py``).
"""
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from utils import seeds

from .cifar import read_cifar
from .class_folders import class_names, read_class_folders
from .device_loader import DeviceLoader, normalize, random_crop_flip, random_resized_crop_flip
from .errors import DatasetError
from .imagenet import MEAN as IMAGENET_MEAN
from .imagenet import STD as IMAGENET_STD
from .imagenet import check_imagenet
from .imagenet import class_problem as imagenet_class_problem
from .imagenet_loaders import Interleaved, imagenet_batches
from .tiny_imagenet import class_problem as tiny_imagenet_class_problem
from .tiny_imagenet import read_tiny_imagenet
from .torchvision_loader import torchvision_loader


def memory_format(device) -> torch.memory_format:
    """The memory format of batches and networks on ``device``: channels_last on CUDA
    (faster convolutions), the contiguous format on the CPU (where oneDNN's backward pass
    of a strided 1x1 convolution in channels_last crashes on some CPUs)."""
    return torch.channels_last if torch.device(device).type == "cuda" else torch.contiguous_format


def _train_shards(cfg, world):
    """(this process's training shards, all training shards): one per rank, virtual ranks
    included."""
    return [world.rank * cfg.virtual_ranks + k for k in range(cfg.virtual_ranks)], world.size * cfg.virtual_ranks


@dataclass(frozen=True, kw_only=True)
class Dataset:
    """What every dataset is."""
    name: str
    num_classes: int
    image_size: int
    mean: tuple
    std: tuple
    default_root: str = "./datasets"  # where main.py reads it without --data-root (download_data.sh puts it there)
    own_images: bool = False  # images of one's own: classes and image size come from the folder and the options

    def loaders(self, cfg, root, world, device):
        """(training batches, test batches) of this process: see the module's docstring."""
        raise NotImplementedError

    def test_loader(self, cfg, root, world, device):
        """This rank's test batches, for an evaluation."""
        raise NotImplementedError

    def class_problem(self, root):
        """What is wrong with the classes found in ``root`` against this dataset's (a class
        folder missing: every later label shifts), or None."""
        return None

    def recalibration_loader(self, cfg, root, world, device):
        """The training images on which the deployed network's BatchNorm statistics are
        recomputed (``optim.recalibrate``): ``cfg.recalibrate`` of them (all, if the set
        has fewer; rounded down to a multiple of the ranks, and a last batch of a single
        image left out, as training leaves it out), a random subset drawn from the run's
        seed, read as training reads them
        (augmented, with draws of their own): the statistics are then those the network's
        BatchNorm layers normalised with in training, now for sign(M) itself, as
        ``update_bn`` computes them from a training loader (measured against the test
        set's reading in the README). They are dealt to the ranks (virtual ranks
        included) as training deals its images, batched by ``cfg.batch_size``; this
        process yields, step by step, its ranks' batches of that step together, so that
        the union over the processes at every step is the same whatever the processes,
        as ``recalibrate(total=...)`` needs. Every pass yields the same batches."""
        raise NotImplementedError

    def _recalibration_subset(self, cfg, available, world):
        """(indices of the chosen training images, in their random order; the ranks
        they are dealt to). DatasetError if there are fewer images than ranks."""
        ranks = world.size * cfg.virtual_ranks
        count = min(cfg.recalibrate, available) // ranks * ranks
        least = max(2, ranks)  # BatchNorm in train mode needs 2 images, and every rank one
        if count < least and available < least:
            raise DatasetError(f"--recalibrate {cfg.recalibrate}: the training set of {self.name} holds {available} "
                               f"image{'s' if available != 1 else ''}, fewer than the {least} that the deployed "
                               f"network's BatchNorm statistics need ({ranks} rank{'s' if ranks > 1 else ''})")
        if count < least:
            raise DatasetError(f"--recalibrate {cfg.recalibrate} leaves {count} images to the {ranks} ranks (rounded "
                               f"down to a multiple of them): give --recalibrate {least} or more, or 0 to keep the "
                               f"statistics of training")
        order = torch.randperm(available, generator=seeds.generator("cpu", cfg.seed or 0, "recalibration"))
        return order[:count], ranks


@dataclass(frozen=True, kw_only=True)
class InMemory(Dataset):
    read_split: Callable        # (root, name, split) -> (uint8 images (N, 3, H, W), int64 labels)
    augment: Callable           # the training augmentation on the device: (uint8 batch, generator) -> uint8 batch
    reference_augment: Callable  # () -> the same as torchvision transforms of PIL images
    classes_check: Callable = None  # (root, expected) -> what is wrong with the classes found, or None

    def read(self, root: str, split: str, size: int = None):
        """(images, labels) of the "train" or "test" split (Tiny-ImageNet's "test" is its
        val/ folder); DatasetError if missing or unreadable. ``size``: the images' side,
        for the datasets of one's own images (the others have theirs)."""
        return self.read_split(root, self.name, split)

    def loaders(self, cfg, root, world, device):
        train_images, train_labels = self.read(root, "train", cfg.image_size)
        test_images, test_labels = self.read(root, "test", cfg.image_size)
        if len(train_labels) < 2:
            raise DatasetError(f"the training set of {self.name} in {root} has {len(train_labels)} "
                               f"image{'s' if len(train_labels) != 1 else ''}: BatchNorm needs batches of at "
                               f"least 2 (download the dataset again?)")
        self._check_test_set(test_labels, root)
        if cfg.loader == "torchvision" and (world.several or cfg.virtual_ranks > 1):
            raise DatasetError("--loader torchvision serves one rank: use the device loader with torchrun or "
                               "--virtual-ranks")
        shards, count = _train_shards(cfg, world)
        if cfg.loader == "torchvision":
            train = self.reference_loader(train_images, train_labels, cfg.batch_size, True, cfg.workers)
            test = self.reference_loader(test_images, test_labels, cfg.eval_batch_size, False, cfg.workers)
            return train, test
        train = self.loader(train_images, train_labels, cfg.batch_size, True, device, shards, count, cfg.seed or 0)
        return train, self.loader(test_images, test_labels, cfg.eval_batch_size, False, device, [world.rank],
                                  world.size)

    def read_other(self, root: str, size: int):
        """The test images in ``root`` as another dataset's (``--ood``): their labels mean
        nothing to the network."""
        return self.read(root, "test", size)

    def test_loader(self, cfg, root, world, device):
        images, labels = self.read(root, "test", cfg.image_size)
        self._check_test_set(labels, root)
        return self.loader(images, labels, cfg.eval_batch_size, False, device, [world.rank], world.size)

    def class_problem(self, root):
        return self.classes_check(root, self.num_classes) if self.classes_check else None

    def recalibration_loader(self, cfg, root, world, device):
        images, labels = self.read(root, "train", cfg.image_size)
        chosen, ranks = self._recalibration_subset(cfg, len(labels), world)
        images, labels = images[chosen], labels[chosen]
        mine = [world.rank * cfg.virtual_ranks + k for k in range(cfg.virtual_ranks)]
        seed = seeds.derived_seed(cfg.seed or 0, "recalibration")
        return SamePasses(lambda: self.loader(images, labels, cfg.batch_size, True, device, mine, ranks, seed),
                          len(mine))

    def _check_test_set(self, labels, root):
        if len(labels) == 0:
            raise DatasetError(f"the test set of {self.name} in {root} has no images (download the dataset again?)")

    def loader(self, images, labels, batch_size, train, device, shards=(0,), shard_count=1, seed=0):
        """Batches on ``device`` (see DeviceLoader: the ``shards`` of ``shard_count``),
        augmented when ``train``."""
        return DeviceLoader(images, labels, batch_size, train, device, self.mean, self.std,
                            self.augment if train else None, memory_format(device), shards, shard_count, seed)

    def reference_loader(self, images, labels, batch_size, train, workers):
        """The same batches from the authors' pipeline (torchvision, PIL, workers), on the CPU."""
        return torchvision_loader(images, labels, batch_size, train, workers, self.mean, self.std,
                                  self.reference_augment() if train else [])


@dataclass(frozen=True, kw_only=True)
class OwnImages(InMemory):
    """Images of one's own in class folders (``class_folders.py``), of any size, resized to
    the run's ``--image-size``; the classes are the class folders of train/, counted when a
    run starts (``class_names``); normalised with ImageNet's constants, which suit natural
    images (BatchNorm adapts to the rest)."""

    def read(self, root, split, size=None):
        return read_class_folders(root, split, size or self.image_size)

    def read_other(self, root, size):  # the class folders of val/ alone: no train/ needed
        return read_class_folders(root, "test", size, own_classes=True)

    def class_names(self, root):
        return class_names(root)

    def class_problem(self, root):
        return None


def _crop_flip_by_size(images, generator=None):
    """Crop with a padding of an eighth of the side (4 pixels at 32, as CIFAR's), and flip."""
    return random_crop_flip(images, padding=max(1, images.shape[-1] // 8), generator=generator)


def _own_images_reference_augment():
    raise DatasetError("--loader torchvision serves the paper's datasets: imagefolder uses the device loader")


@dataclass(frozen=True, kw_only=True)
class ImageFolders(Dataset):
    """A dataset read from its class folders of JPEGs, batch by batch (ImageNet)."""
    check: Callable = field(default=check_imagenet)  # root -> the folders (DatasetError if unusable)

    def loaders(self, cfg, root, world, device):
        backend, decoder = self._backend(cfg)
        folders = self.check(root)
        shards, count = _train_shards(cfg, world)
        made = [imagenet_batches(folders.train, True, cfg.batch_size, device, shard=s, shards=count,
                                 workers=cfg.workers, backend=backend, decoder=decoder, seed=cfg.seed or 0,
                                 memory_format=memory_format(device)) for s in shards]
        train = made[0] if len(made) == 1 else Interleaved(made)
        return train, self._test(folders, cfg, world, device, backend, decoder)

    def class_problem(self, root):
        return imagenet_class_problem(root, self.num_classes)

    def recalibration_loader(self, cfg, root, world, device):
        loader = "torchvision" if cfg.loader == "device" else cfg.loader
        backend, decoder = self._backend(cfg, loader)
        samples = self.check(root).train
        chosen, ranks = self._recalibration_subset(cfg, len(samples), world)
        subset = [samples[i] for i in chosen.tolist()]
        mine = [world.rank * cfg.virtual_ranks + k for k in range(cfg.virtual_ranks)]
        seed = seeds.derived_seed(cfg.seed or 0, "recalibration")

        def one_pass():
            made = [imagenet_batches(subset, True, cfg.batch_size, device, shard=g, shards=ranks, workers=cfg.workers,
                                     backend=backend, decoder=decoder, seed=seed, memory_format=memory_format(device))
                    for g in mine]
            return made[0] if len(made) == 1 else Interleaved(made)
        return SamePasses(one_pass, len(mine))

    def test_loader(self, cfg, root, world, device):
        loader = "torchvision" if cfg.loader == "device" else cfg.loader  # an evaluation needs no choice
        backend, decoder = self._backend(cfg, loader)
        return self._test(self.check(root), cfg, world, device, backend, decoder)

    def _test(self, folders, cfg, world, device, backend, decoder):
        return imagenet_batches(folders.val, False, cfg.eval_batch_size, device, shard=world.rank,
                                shards=world.size, workers=cfg.workers, backend=backend, decoder=decoder,
                                seed=cfg.seed or 0, memory_format=memory_format(device))

    def _backend(self, cfg, loader=None):
        """(backend, decoder) of the run's --loader."""
        loader = loader or cfg.loader
        if loader == "device":
            raise DatasetError(f"{self.name} is read from its files, batch by batch: --loader torchvision, "
                               f"dali-gpu or dali-cpu")
        if loader.startswith("dali") and cfg.virtual_ranks > 1:
            raise DatasetError("--virtual-ranks reads every rank's shard with a loader of its own: use --loader "
                               "torchvision, or torchrun with one GPU per rank")
        return ("dali", loader[len("dali-"):]) if loader.startswith("dali") else ("torchvision", "cpu")


class SamePasses:
    """Batches that are the same at every pass, from a training loader made anew for each
    (``make()``: its first epoch), whose steps give one batch per virtual rank in turn:
    at each step those ``per_step`` batches are joined into one, the union batch of the
    process's ranks."""

    def __init__(self, make, per_step):
        self.make, self.per_step = make, per_step
        self._steps = None

    def __len__(self):
        if self._steps is None:
            self._steps = len(self.make()) // self.per_step
        return self._steps

    def __iter__(self):
        batches = iter(self.make())
        while True:
            step = [batch for _, batch in zip(range(self.per_step), batches)]
            if len(step) < self.per_step:
                return
            if len(step) == 1:
                yield step[0]
            else:
                yield torch.cat([images for images, _ in step]), torch.cat([labels for _, labels in step])


def _cifar_reference_augment():
    import torchvision.transforms as T
    return [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]


def _tiny_imagenet_reference_augment():
    import torchvision.transforms as T
    return [T.RandomResizedCrop(64), T.RandomHorizontalFlip()]


# The authors normalise CIFAR with the ImageNet constants.
_cifar = dict(image_size=32, mean=IMAGENET_MEAN, std=IMAGENET_STD, read_split=read_cifar,
              augment=partial(random_crop_flip, padding=4), reference_augment=_cifar_reference_augment)
DATASETS = {
    "cifar10": InMemory(name="cifar10", num_classes=10, **_cifar),
    "cifar100": InMemory(name="cifar100", num_classes=100, **_cifar),
    # The authors' Tiny-ImageNet pipeline: RandomResizedCrop(64) + flip for training,
    # Resize(64) - the identity on its 64x64 images - for evaluation; its own constants.
    "tiny-imagenet": InMemory(name="tiny-imagenet", num_classes=200, image_size=64, mean=(0.4802, 0.4481, 0.3975),
                              std=(0.2770, 0.2691, 0.2821), read_split=read_tiny_imagenet,
                              augment=partial(random_resized_crop_flip, size=64),
                              reference_augment=_tiny_imagenet_reference_augment,
                              classes_check=tiny_imagenet_class_problem),
    # The authors' ImageNet: read from its JPEG folders (imagenet.py), with the
    # augmentation of their DALI pipelines, by torchvision workers or by DALI.
    "imagenet": ImageFolders(name="imagenet", num_classes=1000, image_size=224, mean=IMAGENET_MEAN,
                             std=IMAGENET_STD, default_root="./datasets/imagenet"),
    # Images of one's own: DIR/train/<class>/, DIR/val/<class>/ (--data-root DIR).
    "imagefolder": OwnImages(name="imagefolder", num_classes=None, image_size=32, mean=IMAGENET_MEAN,
                             std=IMAGENET_STD, read_split=None, augment=_crop_flip_by_size,
                             reference_augment=_own_images_reference_augment, default_root="./datasets/imagefolder",
                             own_images=True),
}
