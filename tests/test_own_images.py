"""One's own images in the training program: ``--dataset imagefolder --data-root DIR`` with
DIR/train/<class>/ and DIR/val/<class>/, of any image size. A run trains on generated class
folders, stops and resumes exactly, is evaluated with --ood against a second folder, and
exports the network to deploy, whose figures are the evaluation's."""
import os
import re
import shutil
import signal

import pytest
import torch

from data import DATASETS
from data.synthetic import write_image_folders
from helpers import (assert_bit_identical, assert_clear_error, folder_digest, load_checkpoint, metrics_without_seconds,
                     read_text, run_main, send_when_logged, start_main)

OWN = ["--dataset", "imagefolder", "--model", "resnet18", "--width", "4", "-b", "32", "-L", "2", "-K", "2",
       "--warmup-epochs", "1", "--seed", "3", "--gpus", "cpu"]


@pytest.fixture(scope="module")
def own_images(tmp_path_factory):
    """Three classes of 40 x 56 JPEGs (not square, not 32): 60 training and 20 test images each."""
    return write_image_folders(str(tmp_path_factory.mktemp("own")), ["cat", "dog", "fish"], (60, 20), (40, 56))


def test_the_class_folders_are_read_as_imagefolder_reads_them(own_images):
    images, labels = DATASETS["imagefolder"].read(own_images, "train", 24)
    assert images.shape == (180, 3, 24, 24) and images.dtype == torch.uint8
    assert labels.tolist() == [0] * 60 + [1] * 60 + [2] * 60  # cat, dog, fish: sorted, class by class
    test_images, test_labels = DATASETS["imagefolder"].read(own_images, "test", 24)
    assert test_images.shape == (60, 3, 24, 24) and test_labels.bincount().tolist() == [20, 20, 20]
    assert DATASETS["imagefolder"].class_names(own_images) == ["cat", "dog", "fish"]


def test_an_image_is_resized_by_its_shorter_side_and_centre_cropped(tmp_path):
    """A 20 x 40 image, black at its left and right sides (6 pixels each) and white between:
    resized to 16 x 32, its centre 16 x 16 is white (what lies 8 pixels from each side)."""
    from PIL import Image
    for split in ("train", "val"):
        for name in ("a", "b"):
            os.makedirs(tmp_path / split / name)
            pixels = torch.zeros(20, 40, 3, dtype=torch.uint8)
            pixels[:, 6:34] = 255
            Image.fromarray(pixels.numpy()).save(tmp_path / split / name / "x.png")
    images, _ = DATASETS["imagefolder"].read(str(tmp_path), "train", 16)
    assert images.shape == (2, 3, 16, 16) and bool((images >= 250).all())


def test_a_16_bit_greyscale_image_keeps_its_shades(tmp_path):
    """PNG, TIFF and PGM of 16 bits per pixel: the top 8 bits of each, not white wherever
    it passes 255 (as a plain conversion to RGB would have it)."""
    from PIL import Image
    import numpy as np
    shades = np.array([[1000, 30000], [50000, 65535]], dtype=np.uint16).repeat(8, 0).repeat(8, 1)
    for split in ("train", "val"):
        for name, kind in (("a", "png"), ("b", "tiff")):
            os.makedirs(tmp_path / split / name)
            Image.fromarray(shades).save(tmp_path / split / name / f"x.{kind}")
        with open(tmp_path / split / "b" / "y.pgm", "wb") as f:  # PGM of 16 bits, written by hand
            f.write(b"P5 16 16 65535\n" + shades.astype(">u2").tobytes())
    images, _ = DATASETS["imagefolder"].read(str(tmp_path), "train", 16)
    assert len(images) == 3
    for image in images:
        assert torch.equal(image, torch.from_numpy((shades >> 8).astype(np.uint8)).expand(3, 16, 16))


def test_a_run_trains_resumes_exactly_is_told_apart_from_other_images_and_exports(own_images, tmp_path):
    whole = tmp_path / "whole"
    r = run_main(*OWN, "--epochs", 3, "--data-root", own_images, "--results-dir", whole, "--save", "own")
    assert r.returncode == 0, r.stderr
    with open(whole / "own" / "config.json") as f:
        settings = f.read()
    assert '"folder_classes": 3' in settings and '"folder_image_size": null' in settings  # counted; the default size

    stopped = tmp_path / "stopped"
    output = tmp_path / "out.txt"
    process = start_main(*OWN, "--epochs", 3, "--data-root", own_images, "--results-dir", stopped, "--save", "own",
                         output=output)
    send_when_logged(process, output, r"^Epoch 1/", signal.SIGTERM)
    assert process.returncode == 128 + signal.SIGTERM, read_text(output)
    r = run_main("--resume", stopped / "own", "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert metrics_without_seconds(stopped / "own" / "metrics.csv") == metrics_without_seconds(whole / "own" /
                                                                                               "metrics.csv")
    ours, theirs = load_checkpoint(stopped / "own" / "checkpoint.pth.tar"), load_checkpoint(whole / "own" /
                                                                                            "checkpoint.pth.tar")
    assert_bit_identical(ours["model"], theirs["model"], "network")
    assert_bit_identical(ours["optimizer"], theirs["optimizer"], "VISPA state")

    other = write_image_folders(str(tmp_path / "other"), ["car", "tree"], (4, 30), 48, seed=7)
    shutil.rmtree(os.path.join(other, "train"))  # its test images alone are read
    best = whole / "own" / "model_best.pth.tar"
    r = run_main("--evaluate", best, "--gpus", "cpu", "-L", 2, "--ood", "imagefolder", "--ood-data-root", other)
    assert r.returncode == 0, r.stderr
    assert "against that of --ood imagefolder (60 images, out)" in r.stdout
    assert len(re.findall(r"^  (predictive entropy|mutual information|max probability).* +\d+\.\d\d +\d+\.\d\d$",
                          r.stdout, re.M)) == 4
    deployed = re.search(r"^Deployed network.*: Prec@1 (\S+)  Prec@5 \S+  (NLL .*)$", r.stdout, re.M).groups()

    r = run_main("--export", best, "--out", tmp_path / "own.bnn", "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    r = run_main("--evaluate", tmp_path / "own.bnn", "--gpus", "cpu")  # its data folder: the run's
    assert r.returncode == 0, r.stderr
    assert f"Calibration: {deployed[1]}" in r.stdout and f"Prec@1 {deployed[0]}  " in r.stdout


def test_a_network_is_given_only_the_classes_it_was_trained_on(own_images, tmp_path):
    """The run, its checkpoints and its export name the class folders, label by label: a
    folder whose classes differ, even by a name and not by their count, would shift every
    label, and is refused in one line by every command, with nothing written."""
    results = tmp_path / "results"
    r = run_main(*OWN, "--epochs", 1, "--data-root", own_images, "--results-dir", results, "--save", "own")
    assert r.returncode == 0, r.stderr
    best = results / "own" / "model_best.pth.tar"
    assert load_checkpoint(best)["classes"] == ["cat", "dog", "fish"]
    assert run_main("--export", best, "--out", tmp_path / "own.bnn", "--gpus", "cpu").returncode == 0
    assert torch.load(tmp_path / "own.bnn", weights_only=True)["classes"] == ["cat", "dog", "fish"]

    renamed, more = tmp_path / "renamed", tmp_path / "more"
    shutil.copytree(own_images, renamed)
    for split in ("train", "val"):
        os.rename(renamed / split / "cat", renamed / split / "zz_cat")  # cat's images become the last label
    shutil.copytree(own_images, more)
    for split in ("train", "val"):
        shutil.copytree(more / split / "fish", more / split / "frog")
    for folder, fragment in ((renamed, "no cat; also zz_cat"), (more, "also frog")):
        for command in (["--evaluate", best], ["--evaluate", tmp_path / "own.bnn"],
                        ["--export", best, "--out", tmp_path / "other.bnn"],
                        ["--resume", best, "--fork", "--save", "forked", "--epochs", 2]):
            before = folder_digest(tmp_path)
            r = run_main(*command, "--data-root", folder, "--gpus", "cpu")
            assert folder_digest(tmp_path) == before, command
            assert_clear_error(r, "are not the 3 classes the network was trained on", fragment,
                               "give --data-root a folder with the classes cat, dog, fish")


def test_a_class_name_of_any_folder_name_goes_into_the_export_and_back(tmp_path):
    """A no-break space in a folder's name (no printable character for Python): the run,
    its export and the export's evaluation. A control character is refused at the start."""
    root = write_image_folders(str(tmp_path / "data"), ["hot\u00a0dog", "cat"], (20, 6), 32)
    results = tmp_path / "results"
    r = run_main(*OWN, "--epochs", 1, "--data-root", root, "--results-dir", results, "--save", "own")
    assert r.returncode == 0, r.stderr
    assert run_main("--export", results / "own" / "model_best.pth.tar", "--out", tmp_path / "own.bnn",
                    "--gpus", "cpu").returncode == 0
    r = run_main("--evaluate", tmp_path / "own.bnn", "--gpus", "cpu")
    assert r.returncode == 0, r.stderr
    assert torch.load(tmp_path / "own.bnn", weights_only=True)["classes"] == ["cat", "hot\u00a0dog"]
    for split in ("train", "val"):
        os.rename(os.path.join(root, split, "cat"), os.path.join(root, split, "c\tat"))
    assert_clear_error(run_main(*OWN, "--epochs", 1, "--data-root", root, "--results-dir", results, "--save", "tab"),
                       "has a class folder whose name holds a control character ('c\\tat'): rename it")


@pytest.mark.parametrize("layout, message", [
    ("missing", "imagefolder not found"),
    ("one class", "has 1 class folder: a classifier needs at least 2"),
    ("other classes", "has other class folders than"),
    ("damaged", "cannot read the image"),
    ("empty class", "train/.ipynb_checkpoints holds no images"),
    ("fewer classes asked", "has 2 class folders (cat, dog), and the network has 3 classes"),
], ids=["no train folder", "one class", "val with other classes", "a damaged image", "a class without images",
        "--classes other than the folders"])
def test_a_folder_that_is_not_a_dataset_of_class_folders_is_one_line(tmp_path, layout, message):
    root = tmp_path / "data"
    if layout != "missing":
        names = ["cat"] if layout == "one class" else ["cat", "dog"]
        write_image_folders(str(root), names, 3, 16)
    if layout == "other classes":
        os.rename(root / "val" / "dog", root / "val" / "bird")
    if layout == "damaged":
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    if layout == "empty class":  # a folder a notebook leaves: ImageFolder would count it as a class too
        os.makedirs(root / "train" / ".ipynb_checkpoints")
    classes = ["--classes", 3] if layout == "fewer classes asked" else []
    before = folder_digest(tmp_path)
    r = run_main(*OWN, *classes, "--data-root", root, "--results-dir", tmp_path / "results")
    assert folder_digest(tmp_path) == before
    assert_clear_error(r, message)


def test_the_image_size_and_classes_of_the_papers_datasets_are_theirs(tmp_path):
    r = run_main("--dataset", "cifar10", "--image-size", "64", "--gpus", "cpu", "--results-dir", tmp_path)
    assert r.returncode == 2 and "--image-size 64: cifar10 has 32; --image-size is for --dataset imagefolder" in r.stderr
