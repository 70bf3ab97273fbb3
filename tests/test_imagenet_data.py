"""ImageNet data (data/imagenet.py) on small generated JPEG folders: the layout check,
the augmentation's parameters, sharding over ranks, steps per epoch, normalisation,
and the DALI path (where DALI is installed; without it, its one-line error)."""
import math
import os
import re
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from config import Config
from data import DATASETS, DatasetError
from data.imagenet import (CROP_SIZE, MEAN, STD, check_imagenet, crop_window, shard_bounds, steps_per_epoch,
                           train_params, train_shard, train_transform, val_size, val_transform)
from data.synthetic import write_image_folders
from utils.distributed import World

CLASSES, PER_CLASS, SIZE = 3, (5, 3), (60, 80)   # 15 training and 9 validation images


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_image_folders(str(tmp_path_factory.mktemp("imagenet")), CLASSES, PER_CLASS, SIZE)


def loaders(root, batch_size, workers=0, rank=0, world=1, seed=0, loader="torchvision"):
    """(training batches, validation batches) of ``rank`` of ``world``, as a run gets them:
    ``batch_size`` images per rank and step, and per validation batch."""
    cfg = Config(model="resnet18_imagenet", dataset="imagenet", batch_size=batch_size, eval_batch_size=batch_size,
                 workers=workers, seed=seed, loader=loader)
    return DATASETS["imagenet"].loaders(cfg, root, World(rank=rank, size=world), torch.device("cpu"))


def labels_of(batches):
    return [label for _, labels in batches for label in labels.tolist()]


# ---- the layout ---------------------------------------------------------------------------------

def test_layout_classes_are_numbered_in_sorted_order(tmp_path):
    write_image_folders(str(tmp_path), ["n0300", "n0100", "n0200"], (2, 1), 16)
    folders = check_imagenet(str(tmp_path))
    assert folders.classes == ["n0100", "n0200", "n0300"]
    assert [(os.path.relpath(p, tmp_path), y) for p, y in folders.train] == [
        ("train/n0100/n0100_0.JPEG", 0), ("train/n0100/n0100_1.JPEG", 0),
        ("train/n0200/n0200_0.JPEG", 1), ("train/n0200/n0200_1.JPEG", 1),
        ("train/n0300/n0300_0.JPEG", 2), ("train/n0300/n0300_1.JPEG", 2)]
    assert [y for _, y in folders.val] == [0, 1, 2]


def _remove_val_class(root):
    folder = os.path.join(root, "val", "n00000001")
    for name in os.listdir(folder):
        os.remove(os.path.join(folder, name))
    os.rmdir(folder)


def _remove_folder(root, name):
    import shutil
    shutil.rmtree(os.path.join(root, name))


def _empty_class(root):
    for split in ("train", "val"):
        os.makedirs(os.path.join(root, split, "n09999999"))


def _tars_only(root):
    _remove_folder(root, "train")
    os.makedirs(os.path.join(root, "train"))
    for i in range(3):
        open(os.path.join(root, "train", f"n{i:08d}.tar"), "wb").close()


@pytest.mark.parametrize("damage,val_sorted,expected", [
    (lambda root: _remove_folder(root, ""), True,
     [r"the folder does not exist", r"train: no folder; val: no folder"]),
    (lambda root: _remove_folder(root, "val"), True,
     [r"there is no val/ folder", r"train: 3 classes, 6 images; val: no folder"]),
    (lambda root: None, False,
     [r"val/ holds 6 JPEGs directly, not sorted into class folders",
      r"train: 3 classes, 6 images; val: 0 classes, 0 images \+ 6 JPEGs directly in val/"]),
    (_remove_val_class, True,
     [r"the classes of train/ and val/ differ: 1 \(e.g. n00000001\) only in train/, 0 only in val/",
      r"train: 3 classes, 6 images; val: 2 classes, 4 images"]),
    (_empty_class, True,
     [r"1 class folders of train/ hold no JPEG \(e.g. n09999999\)", r"train: 4 classes, 6 images"]),
    (_tars_only, True,
     [r"train/ holds 3 .tar files: extract each into train/<wnid>/",
      r"train: 0 classes, 0 images \+ 3 .tar files; val: 3 classes, 6 images"]),
])
def test_layout_errors_are_one_line_with_counts_and_the_layout(tmp_path, damage, val_sorted, expected):
    root = str(tmp_path / "imagenet")
    write_image_folders(root, 3, 2, 16, val_sorted=val_sorted)
    damage(root)
    with pytest.raises(DatasetError) as error:
        check_imagenet(root)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"ImageNet at {root} is not usable: ")
    for pattern in expected:
        assert re.search(pattern, message), (pattern, message)
    assert f"Expected {root}/train/<wnid>/*.JPEG and {root}/val/<wnid>/*.JPEG" in message
    assert "image-net.org" in message
    with pytest.raises(DatasetError):  # the loaders check the same way
        loaders(root, 4)


# ---- the augmentation -----------------------------------------------------------------------------

@pytest.mark.parametrize("width,height", [(500, 375), (375, 500), (224, 224), (1200, 800)])
def test_training_crops_have_the_authors_area_and_aspect_ranges(width, height):
    rng = np.random.default_rng(0)
    boxes = np.array([crop_window(width, height, rng) for _ in range(4000)])
    left, top, w, h = boxes.T
    assert (left >= 0).all() and (top >= 0).all() and (left + w <= width).all() and (top + h <= height).all()
    aspect, area = w / h, w * h / (width * height)
    assert aspect.min() >= 0.8 and aspect.max() <= 1.25
    assert aspect.min() < 0.81 and aspect.max() > 1.24
    assert area.min() >= 0.1 - 0.005 and area.max() <= 1.0
    largest = min(width, 1.25 * height) * min(height, width / 0.8) / (width * height)
    assert area.min() < 0.11 and area.max() > largest - 0.05
    if width == height:
        # on a square every crop of area <= 0.8 fits: there the area is uniform, and
        # the aspect ratio log-uniform around 1
        assert abs((area < 0.45).sum() / ((area >= 0.45) & (area < 0.8)).sum() - 1) < 0.1
        assert abs(np.median(np.log(aspect))) < 0.02
    # the position is uniform over the places where the crop fits
    spare = (width - w) > 0
    assert abs((left[spare] / (width - w[spare])).mean() - 0.5) < 0.03


def test_crops_that_cannot_be_drawn_fall_back_to_the_largest_allowed_window():
    rng = np.random.default_rng(0)
    assert crop_window(1000, 10, rng)[2:] == (12, 10)      # too wide: full height, aspect 1.25
    assert crop_window(10, 1000, rng)[2:] == (10, 12)      # too tall: full width, aspect 0.8
    assert crop_window(500, 375, rng, attempts=0)[2:] == (468, 375)   # no attempt left
    assert crop_window(300, 300, rng, attempts=0) == (0, 0, 300, 300)


def test_training_flips_half_the_images():
    rng = np.random.default_rng(1)
    flips = np.array([train_params(500, 375, rng)[4] for _ in range(20000)])
    assert abs(flips.mean() - 0.5) < 0.015


def test_training_transform_is_the_drawn_crop_resized_to_224_and_flipped():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8))
    flipped = set()
    for seed in range(12):
        left, top, w, h, flip = train_params(120, 90, np.random.default_rng(seed))
        expected = F.pil_to_tensor(F.resized_crop(image, top, left, h, w, [224, 224],
                                                  InterpolationMode.BILINEAR, antialias=True))
        out = train_transform(image, np.random.default_rng(seed))
        assert out.dtype == torch.uint8 and out.shape == (3, 224, 224)
        assert torch.equal(out, expected.flip(-1) if flip else expected)
        flipped.add(flip)
    assert flipped == {False, True}


def test_validation_resizes_the_shorter_side_to_256_and_takes_the_centre():
    assert val_size(401, 300) == (342, 256) and val_size(300, 401) == (256, 342)
    assert val_size(225, 224) == (257, 256) and val_size(256, 256) == (256, 256)
    # a ramp: red grows with x, green with y, so every output pixel says where it came from
    x, y = np.meshgrid(np.arange(401), np.arange(300))
    ramp = np.stack([x * 255 / 400, y * 255 / 299, np.full_like(x, 77)], -1)
    out = val_transform(Image.fromarray(ramp.round().astype(np.uint8))).double()
    assert out.shape == (3, CROP_SIZE, CROP_SIZE)
    # resized to 342x256, the centre 224x224 starts at (top 16, left 59)
    source_x = (59 + np.arange(224) + 0.5) * 401 / 342 - 0.5
    source_y = (16 + np.arange(224) + 0.5) * 300 / 256 - 0.5
    red, green = out[0, 112].numpy(), out[1, :, 112].numpy()
    assert np.abs(red[2:-2] - (source_x * 255 / 400)[2:-2]).max() < 1.5
    assert np.abs(green[2:-2] - (source_y * 255 / 299)[2:-2]).max() < 1.5
    assert (out[2] == 77).all()


# ---- sharding and steps -------------------------------------------------------------------------

def test_imagenet_steps_per_epoch_are_the_authors():
    assert steps_per_epoch(1_281_167, 256, 4) == 1252 == math.ceil(320_292 / 256)
    assert [b - a for a, b in (shard_bounds(1_281_167, r, 4) for r in range(4))] == [320_291] + [320_292] * 3
    assert [b - a for a, b in (shard_bounds(50_000, r, 4) for r in range(4))] == [12_500] * 4
    assert steps_per_epoch(1_281_167, 256, 1) == 5005
    assert steps_per_epoch(512, 256, 1) == 2 and steps_per_epoch(514, 256, 1) == 3
    assert steps_per_epoch(513, 256, 1) == 2    # no batch of one image
    assert steps_per_epoch(1025, 256, 4) == 1   # 257 per rank
    assert steps_per_epoch(1, 256, 1) == 1


@pytest.mark.parametrize("n", [15, 16])
def test_training_shards_of_two_ranks_are_disjoint_and_cover_the_set(n):
    shards = [train_shard(n, 4, rank, 2, seed=3, epoch=0)[0] for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 8
    both = np.concatenate(shards)
    assert set(both) == set(range(n))
    assert len(both) - len(set(both)) == 16 - n   # padding repeats only what the ranks lack
    positions = np.concatenate([train_shard(n, 4, rank, 2, 3, 0)[1] for rank in (0, 1)])
    assert sorted(positions) == list(range(16))
    again = train_shard(n, 4, 0, 2, seed=3, epoch=0)[0]
    assert np.array_equal(again, shards[0])
    assert not np.array_equal(train_shard(n, 4, 0, 2, seed=3, epoch=1)[0], shards[0])
    assert not np.array_equal(train_shard(n, 4, 0, 2, seed=4, epoch=0)[0], shards[0])


def test_training_batches_of_two_ranks_each_epoch(root):
    folders = check_imagenet(root)
    trains = [loaders(root, 4, rank=r, world=2, seed=5)[0] for r in (0, 1)]
    assert [len(train) for train in trains] == [2, 2]
    for epoch in range(2):
        seen = []
        for train in trains:
            keys = [i for i, _ in train.keys(epoch)]
            batches = list(train)
            assert len(batches) == 2 and [len(y) for _, y in batches] == [4, 4]
            assert labels_of(batches) == [folders.train[i][1] for i in keys]
            seen += keys
        assert set(seen) == set(range(15)) and len(seen) == 16
    assert trains[0].epoch == 2


def test_a_last_batch_of_one_image_is_left_out(root):
    train, _ = loaders(root, 7, rank=1, world=2)   # 8 per rank
    assert len(train) == 1
    assert [len(y) for _, y in train] == [7]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_every_validation_image_is_evaluated_exactly_once(root, world):
    folders = check_imagenet(root)
    labels, counts = [], []
    for rank in range(world):
        _, val = loaders(root, 2, rank=rank, world=world)
        batches = list(val)
        assert len(batches) == len(val)
        counts.append(sum(len(y) for _, y in batches))
        labels += labels_of(batches)
    assert sum(counts) == 9 and max(counts) - min(counts) <= 1
    assert labels == [y for _, y in folders.val]   # rank by rank, in order: each image once


def test_augmentation_does_not_depend_on_the_number_of_workers(root):
    runs = []
    for workers in (0, 2):
        train, _ = loaders(root, 4, workers, rank=1, world=2, seed=7)
        runs.append([(x.clone(), y.clone()) for x, y in train])
    for (x0, y0), (x2, y2) in zip(*runs):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


# ---- the batches ---------------------------------------------------------------------------------

def test_batches_are_normalised_float_images_and_int64_labels(root):
    train, val = loaders(root, 4)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for images, labels in list(train) + list(val):
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 224, 224)
        assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
        pixels = images * std + mean
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


def test_normalisation_of_known_colours(tmp_path):
    root = write_image_folders(str(tmp_path), 2, 1, 32)
    colours = {0: (200, 100, 30), 1: (10, 128, 250)}
    for (path, label) in check_imagenet(root).val:
        Image.new("RGB", (40, 30), colours[label]).save(path, "JPEG", quality=95)
    _, val = loaders(root, 2)
    (images, labels), = list(val)
    for image, label in zip(images, labels.tolist()):
        path = check_imagenet(root).val[label][0]
        decoded = np.asarray(Image.open(path).convert("RGB"))[0, 0] / 255   # JPEG moves colours a little
        expected = (torch.tensor(decoded, dtype=torch.float32) - torch.tensor(MEAN)) / torch.tensor(STD)
        assert np.abs(decoded * 255 - colours[label]).max() <= 3
        assert torch.allclose(image, expected.view(3, 1, 1).expand_as(image), atol=1e-5)


# ---- the DALI path --------------------------------------------------------------------------------

def test_without_dali_the_dali_path_says_how_to_install_it(root, monkeypatch):
    for name in ("nvidia.dali", "nvidia.dali.plugin.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)   # import fails as if not installed
    with pytest.raises(DatasetError) as error:
        loaders(root, 4, loader="dali-cpu")
    message = str(error.value)
    assert "\n" not in message
    assert "pip install nvidia-dali-cuda130" in message and "torchvision" in message


def test_dali_decoding_on_the_gpu_needs_a_cuda_device(root):
    with pytest.raises(DatasetError, match=r"needs a CUDA device, not cpu") as error:
        loaders(root, 4, loader="dali-gpu")
    assert "\n" not in str(error.value)


def test_dali_training_batches(root):
    pytest.importorskip("nvidia.dali")
    folders = check_imagenet(root)
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    trains = [loaders(root, 4, 1, rank=r, world=2, loader="dali-cpu")[0] for r in (0, 1)]
    for epoch in range(2):
        labels = []
        for train in trains:
            assert len(train) == 2
            batches = list(train)
            assert len(batches) == 2
            for images, y in batches:
                assert images.dtype == torch.float32 and images.shape[1:] == (3, 224, 224)
                assert y.dtype == torch.int64
                pixels = images * std + mean
                assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
            labels += labels_of(batches)
        # DALI's shards of 7 and 8 images, padding removed: the whole set once per epoch
        assert Counter(labels) == Counter(y for _, y in folders.train)


def test_dali_validation_is_the_torchvision_validation(root):
    pytest.importorskip("nvidia.dali")
    dali, ours = [], []
    for rank in (0, 1):
        dali += list(loaders(root, 2, 1, rank=rank, world=2, loader="dali-cpu")[1])
        ours += list(loaders(root, 2, rank=rank, world=2)[1])
    assert labels_of(dali) == labels_of(ours) == [y for _, y in check_imagenet(root).val]
    a, b = torch.cat([x for x, _ in dali]), torch.cat([x for x, _ in ours])
    assert a.shape == b.shape == (9, 3, 224, 224)
    distance = (a[:, None] - b[None]).abs().mean(dim=(2, 3, 4))    # DALI image i vs ours j
    assert (distance.diagonal() < 0.03).all()     # the same images, resized and cropped alike
    assert (distance.argmin(dim=1) == torch.arange(9)).all()


@pytest.mark.parametrize("loader,workers", [("torchvision", 2), ("dali-cpu", 1)])
def test_an_epoch_ended_early_is_followed_by_a_whole_one(root, loader, workers):
    if loader.startswith("dali"):
        pytest.importorskip("nvidia.dali")
    train, val = loaders(root, 2, workers, loader=loader)   # 15 images
    assert len(train) == 7
    for _ in range(2):
        for _ in train:
            break
        batches = list(train)
        assert [len(y) for _, y in batches] == [2] * 7
    for _ in val:
        break
    assert labels_of(val) == [y for _, y in check_imagenet(root).val]
    if loader == "torchvision":
        assert train.epoch == 4
        assert labels_of(batches) == [check_imagenet(root).train[i][1] for i, _ in train.keys(3)]
