"""The speed benchmarks run end to end at toy sizes on the CPU and print every row of
their tables (the figures themselves belong to speed/README.md, not to tests)."""
import re
import subprocess
import sys

import pytest

from helpers import ENV, REPO

TOY = ["--train-images", "64", "--test-images", "32", "--width", "4", "--steps", "1", "--repeats", "1",
       "--L", "2", "--workers", "0"]


def benchmark(*args):
    result = subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


NUMBER = r"\s+[0-9.]+"
RATIO = r"\s+[0-9.]+x"


@pytest.mark.parametrize("recipe", ["resnet18_1w32a_cifar100", "vgg_small_1w1a_cifar10"])
def test_speed_tables_of_a_cifar_recipe(recipe):
    """Three modes side by side and the two speed-ups on every timed row."""
    out = benchmark("speed/cifar.py", "--recipes", recipe, *TOY)
    assert f"{recipe}: " in out and "EXTRAPOLATED to 50k / 10k" in out
    for row in ("training images/s", r"training epoch, 50k images \(s\)", r"evaluation L=2, 10k images \(s\)",
                r"full epoch, train \+ eval \(s\)", r"training step, batch on device \(ms\)",
                r"run of all epochs \(h\)"):
        assert re.search(rf"^{row}{NUMBER * 3}{RATIO * 2}$", out, re.M), (row, out)
    assert re.search(r"^peak GPU memory \(MiB\)\s+n/a\s+n/a\s+n/a\s*$", out, re.M), out
    assert re.search(r"^checkpoint every epoch \(\d+ MB with momenta\): [0-9.]+ s written in the loop", out, re.M)


def test_speed_of_concurrent_runs():
    out = benchmark("speed/cifar.py", "--concurrent", "2", *TOY)
    assert re.search(r"seconds per full epoch [0-9.]+ alone, [0-9.]+ each of 2 at once; 2 runs of 500 "
                     r"epochs: [0-9.]+ h one after another, [0-9.]+ h all at once", out), out


def test_imagenet_speed_table():
    """Every network of the four ImageNet recipes, and the torchvision loader (DALI where
    installed, else a line that says why not)."""
    out = benchmark("speed/imagenet.py", "--batch", "2", "--repeats", "1", "--images", "128",
                    "--workers", "1")
    for recipe in ("alexnet_1w1a_imagenet", "alexnet_1w32a_imagenet", "birealnet18_1w1a_imagenet",
                   "resnet18_1w32a_imagenet"):
        assert re.search(rf"^{recipe}{NUMBER * 3}$", out, re.M), out
    assert re.search(r"^\s+torchvision \(1 CPU workers\)\s+\d+ images/s$", out, re.M), out
    assert re.search(r"^\s+dali.*(images/s|n/a \(.+\))$", out, re.M), out
