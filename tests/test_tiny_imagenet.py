"""Tiny-ImageNet: the reader (the images and labels of torchvision's ImageFolder, the
cache beside the dataset, clear errors), the generated datasets, and the training
augmentation on the device against torchvision's RandomResizedCrop + flip."""
import math
import os
import shutil

import numpy as np
import pytest
import torch

import data.tiny_imagenet as tiny
from data import DATASETS, DatasetError, normalize
from data.device_loader import random_resized_crop_flip, resized_crop_boxes, resized_crop_flip
from data.synthetic import write_tiny_imagenet
from utils import files

SPEC = DATASETS["tiny-imagenet"]
MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def read(root, split):
    return SPEC.read(str(root), split)


@pytest.fixture
def dataset(tmp_path):
    """A small Tiny-ImageNet (4 classes, 6 + 3 images each, two greyscale JPEGs per
    split), val/ sorted as download_data.sh leaves it; returns (root, folder)."""
    folder = write_tiny_imagenet(str(tmp_path), classes=4, per_class=6, val_per_class=3, greyscale=2, seed=1)
    return tmp_path, folder


def test_registry_entry():
    assert (SPEC.num_classes, SPEC.image_size, SPEC.mean, SPEC.std) == (200, 64, MEAN, STD)
    assert [type(t).__name__ for t in SPEC.reference_augment()] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    crop = SPEC.reference_augment()[0]
    assert crop.size == (64, 64) and crop.scale == (0.08, 1.0)
    assert crop.ratio == pytest.approx((3 / 4, 4 / 3))
    # the CIFAR entries are as they were
    assert DATASETS["cifar100"].image_size == 32 and DATASETS["cifar100"].mean == (0.485, 0.456, 0.406)


# ---- the reader ------------------------------------------------------------------------------

def test_reader_gives_imagefolders_images_and_labels(dataset):
    """The authors read the folders with torchvision's ImageFolder: the same images
    (converted to RGB), in the same order, with the same labels - the position of the wnid
    among the sorted class folders, not its place in wnids.txt."""
    from torchvision.datasets import ImageFolder

    root, folder = dataset
    written = open(os.path.join(folder, "wnids.txt")).read().split()
    assert written != sorted(written)  # so that the order matters
    for split, sub in (("train", "train"), ("test", "val")):
        images, labels = read(root, split)
        reference = ImageFolder(os.path.join(folder, sub))
        assert reference.classes == sorted(written)
        assert images.dtype == torch.uint8 and images.shape == (len(reference), 3, 64, 64)
        assert labels.dtype == torch.int64 and labels.tolist() == reference.targets
        for k, (path, label) in enumerate(reference.samples):
            assert os.path.basename(os.path.dirname(os.path.dirname(path))) == sorted(written)[label]
            expected = np.asarray(reference.loader(path)).transpose(2, 0, 1)
            np.testing.assert_array_equal(images[k].numpy(), expected, err_msg=path)
    assert len(read(root, "train")[1]) == 24 and len(read(root, "test")[1]) == 12
    assert torch.equal(read(root, "val")[0], read(root, "test")[0])


def test_greyscale_images_become_three_equal_channels(dataset):
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root, folder = dataset
    for split, sub in (("train", "train"), ("test", "val")):
        images, _ = read(root, split)
        paths = [path for path, _ in ImageFolder(os.path.join(folder, sub)).samples]
        modes = [Image.open(path).mode for path in paths]
        assert modes.count("L") == 2 and modes.count("RGB") == len(paths) - 2  # as written
        for image, path, mode in zip(images, paths, modes):
            if mode == "L":
                assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
                np.testing.assert_array_equal(image[0].numpy(), np.asarray(Image.open(path)))
            else:
                assert not torch.equal(image[0], image[1])


def test_cache_is_written_once_beside_the_dataset_and_reused(dataset, monkeypatch, capsys):
    root, folder = dataset
    images, labels = read(root, "train")
    assert "decoding the 24 images" in capsys.readouterr().err
    cache = tiny.cache_path(str(root), "train")
    assert cache == os.path.join(str(root), "tiny-imagenet-200.train.pt")
    assert sorted(os.listdir(root)) == ["tiny-imagenet-200", "tiny-imagenet-200.train.pt"]  # no temporary, no lock
    stamp = os.stat(cache).st_mtime_ns
    content = torch.load(cache, weights_only=True)
    assert torch.equal(content["images"], images) and torch.equal(content["labels"], labels)

    def no_decoding(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(tiny, "_read_image", no_decoding)
    again_images, again_labels = read(root, "train")
    assert torch.equal(again_images, images) and torch.equal(again_labels, labels)
    assert os.stat(cache).st_mtime_ns == stamp
    assert capsys.readouterr().err == ""
    monkeypatch.undo()
    read(root, "test")  # val has a cache of its own
    assert sorted(os.listdir(root)) == ["tiny-imagenet-200", "tiny-imagenet-200.train.pt",
                                        "tiny-imagenet-200.val.pt"]


def test_cache_is_replaced_when_an_image_changes(dataset, capsys):
    from PIL import Image

    root, folder = dataset
    images, labels = read(root, "train")
    wnid = sorted(os.listdir(os.path.join(folder, "train")))[1]
    path = os.path.join(folder, "train", wnid, "images", f"{wnid}_2.JPEG")
    Image.new("RGB", (64, 64), (10, 200, 30)).save(path, "JPEG", quality=100)
    capsys.readouterr()
    changed, changed_labels = read(root, "train")
    assert "the images changed" in capsys.readouterr().err
    k = 6 + 2  # the third image of the second class
    assert (changed[k].float() - torch.tensor([10, 200, 30]).view(3, 1, 1)).abs().max() <= 3
    assert torch.equal(changed[:k], images[:k]) and torch.equal(changed[k + 1:], images[k + 1:])
    assert torch.equal(changed_labels, labels)
    # the replaced cache is used from now on
    assert torch.equal(read(root, "train")[0], changed)
    assert capsys.readouterr().err == ""

    # an added image, a removed one
    shutil.copy(path, os.path.join(folder, "train", wnid, "images", "extra.JPEG"))
    assert len(read(root, "train")[1]) == 25
    os.remove(path)
    os.remove(os.path.join(folder, "train", wnid, "images", "extra.JPEG"))
    assert read(root, "train")[1].tolist() == [0] * 6 + [1] * 5 + [2] * 6 + [3] * 6


def test_damaged_cache_is_decoded_again(dataset, capsys):
    root, _ = dataset
    images, _ = read(root, "test")
    cache = tiny.cache_path(str(root), "test")
    with open(cache, "r+b") as f:
        f.truncate(os.path.getsize(cache) // 2)
    capsys.readouterr()
    assert torch.equal(read(root, "test")[0], images)
    assert "cannot be read" in capsys.readouterr().err
    assert torch.equal(torch.load(cache, weights_only=True)["images"], images)


def test_a_cache_that_cannot_be_written_costs_only_the_decoding(dataset, monkeypatch, capsys):
    root, _ = dataset

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(files, "temporary_name", read_only)  # as a folder that cannot be written
    images, labels = read(root, "train")
    assert images.shape == (24, 3, 64, 64)
    assert "cannot write the cache (Permission denied)" in capsys.readouterr().err
    assert sorted(os.listdir(root)) == ["tiny-imagenet-200"]


def single_line(error):
    message = str(error.value)
    assert "\n" not in message
    return message


def test_missing_dataset_says_how_to_download_it(tmp_path):
    with pytest.raises(DatasetError) as error:
        read(tmp_path, "train")
    message = single_line(error)
    assert "tiny-imagenet not found" in message and "tiny-imagenet-200" in message
    assert f"DATA_ROOT={tmp_path} bash download_data.sh tiny-imagenet" in message


def test_unsorted_val_folder_is_reported(tmp_path):
    folder = write_tiny_imagenet(str(tmp_path), classes=2, per_class=2, val_per_class=2, sorted_val=False)
    assert read(tmp_path, "train")[0].shape == (4, 3, 64, 64)  # train/ is fine as the zip has it
    with pytest.raises(DatasetError) as error:
        read(tmp_path, "test")
    message = single_line(error)
    assert "not sorted into class folders" in message and os.path.join(folder, "val") in message
    assert "bash download_data.sh tiny-imagenet" in message


def test_val_with_other_classes_than_train_is_reported(dataset):
    root, folder = dataset
    wnid = sorted(os.listdir(os.path.join(folder, "val")))[0]
    shutil.rmtree(os.path.join(folder, "val", wnid))
    with pytest.raises(DatasetError, match=f"other class folders.*{wnid}"):
        read(root, "test")


def test_unreadable_image_is_named(dataset):
    root, folder = dataset
    wnid = sorted(os.listdir(os.path.join(folder, "train")))[2]
    path = os.path.join(folder, "train", wnid, "images", f"{wnid}_4.JPEG")
    with open(path, "r+b") as f:
        f.truncate(100)
    with pytest.raises(DatasetError) as error:
        read(root, "train")
    assert f"cannot read the image {path}" in single_line(error)
    assert not os.path.exists(tiny.cache_path(str(root), "train"))


def test_image_of_the_wrong_size_is_named(dataset):
    from PIL import Image

    root, folder = dataset
    wnid = sorted(os.listdir(os.path.join(folder, "val")))[3]
    images = os.path.join(folder, "val", wnid, "images")
    path = os.path.join(images, sorted(os.listdir(images))[0])
    Image.new("RGB", (65, 64)).save(path, "JPEG")
    with pytest.raises(DatasetError) as error:
        read(root, "test")
    message = single_line(error)
    assert path in message and "65x64" in message and "64x64" in message


def test_generated_dataset_has_learnable_class_structure(tmp_path):
    write_tiny_imagenet(str(tmp_path), classes=5, per_class=8, val_per_class=6, seed=3)
    train_x, train_y = read(tmp_path, "train")
    test_x, test_y = read(tmp_path, "test")
    means = torch.stack([train_x[train_y == c].float().mean(0) for c in range(5)]).flatten(1)
    nearest = torch.cdist(test_x.float().flatten(1), means).argmin(1)
    assert (nearest == test_y).float().mean() > 0.9


# ---- the augmentation ------------------------------------------------------------------------

def torchvision_boxes(n, height, width, scale, ratio):
    import torchvision.transforms as T

    image = torch.empty(3, height, width)
    return torch.tensor([T.RandomResizedCrop.get_params(image, list(scale), list(ratio))
                         for _ in range(n)]).T  # top, left, height, width


def fallback_box(height, width, ratio):
    """The centre crop get_params falls back to after 10 failed attempts."""
    if width / height < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def assert_same_histogram(ours, theirs, bins, name):
    """Two samples of the same size: every bin's counts within 5 standard deviations of
    the difference of two binomials."""
    n = len(ours)
    low = float(min(ours.min(), theirs.min()))
    high = float(max(ours.max(), theirs.max())) + 1e-9
    a, b = (torch.histc(sample.double(), bins, low, high) for sample in (ours, theirs))
    p = (a + b) / (2 * n)
    tolerance = 5 * torch.sqrt(2 * n * p * (1 - p)) + 1
    assert ((a - b).abs() <= tolerance).all(), (name, a.tolist(), b.tolist())


@pytest.mark.parametrize("height,width,scale", [(64, 64, (0.08, 1.0)), (64, 40, (0.6, 1.0)), (40, 64, (0.6, 1.0))])
def test_crop_boxes_have_the_distribution_of_torchvisions(height, width, scale):
    """Area fraction, aspect ratio, position and the rate of the centre-crop fallback.
    The real images are square and 64x64, where the fallback (10 failed attempts) has a
    chance of about 1e-9; the narrow images with scale (0.6, 1) make it common."""
    ratio = (3 / 4, 4 / 3)
    n = 6000
    torch.manual_seed(0)
    ours = torch.stack(resized_crop_boxes(n, height, width, scale, ratio))
    theirs = torchvision_boxes(n, height, width, scale, ratio)
    for boxes in (ours, theirs):
        top, left, h, w = boxes
        assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
    for name, of in (("area fraction", lambda b: b[2] * b[3] / (height * width)),
                     ("log aspect ratio", lambda b: torch.log(b[3] / b[2].double())),
                     ("relative top", lambda b: (b[0] + 0.5) / (height - b[2] + 1)),
                     ("relative left", lambda b: (b[1] + 0.5) / (width - b[3] + 1))):
        assert_same_histogram(of(ours), of(theirs), 12, name)
    fallback = torch.tensor(fallback_box(height, width, ratio)).view(4, 1)
    rates = [(boxes == fallback).all(0).double().mean().item() for boxes in (ours, theirs)]
    if (height, width) == (64, 64):
        assert rates[0] < 0.01 and rates[1] < 0.01  # only an attempt of (nearly) the whole image
    else:
        assert 0.05 < rates[1] < 0.3, rates  # the test means something
        assert abs(rates[0] - rates[1]) < 5 * math.sqrt(2 * rates[1] * (1 - rates[1]) / n), rates


@pytest.mark.parametrize("device", DEVICES)
def test_resized_crop_matches_torchvisions_pixels(device):
    """For given boxes and flips, torchvision's resized_crop (BILINEAR) + hflip of the PIL
    image, to within one of 255 (in fact: exactly, as PIL rounds)."""
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    torch.manual_seed(1)
    n = 150
    images = torch.randint(0, 256, (n, 3, 64, 64), dtype=torch.uint8)
    top, left, h, w = resized_crop_boxes(n, 64, 64)
    flip = torch.rand(n) < 0.5
    extremes = [(0, 0, 64, 64), (63, 63, 1, 1), (0, 10, 64, 17), (5, 0, 23, 64), (30, 40, 2, 3)]
    for k, box in enumerate(extremes):
        top[k], left[k], h[k], w[k] = box
    ours = resized_crop_flip(images.to(device), top.to(device), left.to(device), h.to(device),
                             w.to(device), flip.to(device), 64).cpu()
    assert ours.dtype == torch.uint8 and ours.shape == (n, 3, 64, 64)
    exact = 0
    for k in range(n):
        pil = Image.fromarray(images[k].permute(1, 2, 0).numpy())
        theirs = TF.resized_crop(pil, int(top[k]), int(left[k]), int(h[k]), int(w[k]), [64, 64],
                                 InterpolationMode.BILINEAR)
        if flip[k]:
            theirs = TF.hflip(theirs)
        theirs = torch.from_numpy(np.array(theirs)).permute(2, 0, 1)
        difference = (theirs.int() - ours[k].int()).abs()
        assert difference.max() <= 1, (k, top[k], left[k], h[k], w[k], flip[k])
        exact += int((difference == 0).sum())
    assert exact / ours.numel() > 0.99
    assert torch.equal(ours[0], images[0].flip(-1) if flip[0] else images[0])  # the whole image


def pattern_images(n):
    """R = 4 * row + 2, G = 4 * column + 2, B = 128: bilinear resizing keeps the ramps
    linear, so an augmented image says which box it was cut from."""
    ramp = torch.arange(64) * 4 + 2
    image = torch.stack([ramp.view(64, 1).expand(64, 64), ramp.view(1, 64).expand(64, 64),
                         torch.full((64, 64), 128)]).to(torch.uint8)
    return image.expand(n, 3, 64, 64).contiguous()


def to_pixels(normalised):
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    return torch.round((normalised * std + mean) * 255).to(torch.uint8)


def recover_boxes(pixels):
    """(top, left, h, w, flip) of augmented pattern images, from straight-line fits to
    the ramps away from the clamped edges: output row y shows row top + (y + 0.5) h / 64
    - 0.5 of the image, so R(y) = 4 top + (y + 0.5) h / 16."""
    rows = pixels[:, 0, :, 32].double()
    columns = pixels[:, 1, 32, :].double()
    flip = columns[:, -1] < columns[:, 0]
    columns = torch.where(flip.view(-1, 1), columns.flip(-1), columns)
    y = torch.arange(4, 60, dtype=torch.float64)

    def fit(profile):
        values = profile[:, 4:60]
        slope = ((y - y.mean()) * (values - values.mean(1, keepdim=True))).sum(1) / ((y - y.mean()) ** 2).sum()
        extent = torch.round(16 * slope)
        start = torch.round((values - (y + 0.5) * extent.view(-1, 1) / 16).mean(1) / 4)
        return start.long(), extent.long()

    (top, h), (left, w) = fit(rows), fit(columns)
    return top, left, h, w, flip


def test_training_batches_have_the_distribution_of_torchvisions():
    """Through the registry: the device loader's batches against the authors' pipeline
    (PIL, RandomResizedCrop(64) + RandomHorizontalFlip, ToTensor, Normalize). Every
    augmented image is the resized crop of the box read back from it; the boxes' area
    fractions and aspect ratios and the flips have the same distribution."""
    n = 2000
    images, labels = pattern_images(n), torch.zeros(n, dtype=torch.long)
    torch.manual_seed(0)
    ours = to_pixels(torch.cat([x for x, _ in SPEC.loader(images, labels, 500, True, "cpu")]))
    torch.manual_seed(0)
    theirs = to_pixels(torch.cat([x for x, _ in SPEC.reference_loader(images, labels, 500, True, workers=0)]))
    found = {}
    for name, batch, tolerance in (("ours", ours, 0), ("torchvision", theirs, 1)):
        top, left, h, w, flip = found[name] = recover_boxes(batch)
        assert (h >= 16).all() and (h <= 64).all() and (w >= 16).all() and (w <= 64).all(), name
        assert (top >= 0).all() and (top + h <= 64).all() and (left >= 0).all() and (left + w <= 64).all(), name
        remade = resized_crop_flip(images, top, left, h, w, flip, 64)
        assert (remade.int() - batch.int()).abs().max() <= tolerance, name
        assert abs(flip.double().mean().item() - 0.5) < 5 * math.sqrt(0.25 / n), name
    for what, of in (("area fraction", lambda b: b[2] * b[3] / 4096.0),
                     ("log aspect ratio", lambda b: torch.log(b[3] / b[2].double()))):
        assert_same_histogram(of(found["ours"]), of(found["torchvision"]), 10, what)


@pytest.mark.parametrize("device", DEVICES)
def test_augmentation_keeps_dtype_and_shape_and_evaluation_is_untouched(device):
    torch.manual_seed(2)
    images = torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8, device=device)
    out = random_resized_crop_flip(images, 64)
    assert out.dtype == torch.uint8 and out.shape == images.shape and out.device == images.device
    batches = list(SPEC.loader(images, torch.arange(7), 4, False, device))
    torch.testing.assert_close(torch.cat([x for x, _ in batches]), normalize(images, MEAN, STD), rtol=0, atol=0)


def test_the_recipe_trains_and_its_evaluate_script_reports_the_logged_mean_network(tmp_path):
    """Tiny-ImageNet end to end at a small width: main.py with the authors' recipe (the
    ResNet18 with the strided stem, 64x64 images augmented on the device), then the
    evaluate script on its checkpoint."""
    from helpers import run_main, run_results, run_script
    write_tiny_imagenet(str(tmp_path / "data"), classes=4, per_class=30, val_per_class=10)
    run = run_main("--recipe", "resnet18_1w32a_tiny-imagenet", "--width", 4, "--epochs", 1, "--warmup_epochs", 1,
                   "-b", 40, "-L", 1,
                   "--gpus", "cpu", "--seed", 1, "--data_root", tmp_path / "data",
                   "--results_dir", tmp_path / "results", "--save", "tiny")
    assert run.returncode == 0, run.stderr
    epochs, status = run_results(tmp_path / "results", "tiny")
    result = run_script("evaluation/evaluate_tiny-imagenet_resnet18_1W32A.sh",
                        tmp_path / "results" / "tiny" / "model_best.pth.tar", DATA_ROOT=tmp_path / "data", L=1,
                        GPU="cpu")
    assert result.returncode == 0, result.stderr
    assert "(resnet18, tiny-imagenet, K=8; epoch 1 of run tiny)" in result.stdout
    test_line = next(line for line in result.stdout.splitlines() if line.startswith("Test: "))
    assert test_line.endswith(f"mean network Prec@1 {epochs[1][1]:.2f}")
