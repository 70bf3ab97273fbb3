"""VISPA as a library in a project of one's own: ``pip install`` of the repository installs
one import package, ``vispa``, and the examples run with it from a folder outside the
clone, where the repository's own folders (optim/, models/, ...) cannot be imported."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ENV, REPO
from models import build_model, is_binary, load_packed, packed

# What `pip install .` reads: the project file, the files it names and the library's folders.
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "vispa", "optim", "models", "utils"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The folder that ``pip install --target`` filled from a copy of the repository's
    sources (the build writes into the folder it builds; the clone stays as it is)."""
    source, target = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("site-packages")
    for name in SOURCES:
        path = os.path.join(REPO, name)
        copy = shutil.copytree if os.path.isdir(path) else shutil.copy
        copy(path, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")} if os.path.isdir(path) else {}))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--no-index", "--target", str(target), str(source)],
                             capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr
    return target


def outside(installed, tmp_path, *command):
    """``python command...`` in an empty folder, with the installed library on the path."""
    env = dict(ENV, PYTHONPATH=str(installed))
    return subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_the_installed_package_is_vispa_and_nothing_else(installed, tmp_path):
    top = sorted(name for name in os.listdir(installed) if not name.endswith((".dist-info", ".egg-info")))
    assert top == ["vispa"]
    probe = outside(installed, tmp_path, "-c", """
import importlib.util, vispa
from vispa import VISPA, BinaryConv2d, BinaryLinear, mark_binary, load_packed
print(vispa.__file__)
print([name for name in ("optim", "models", "data", "utils", "config", "engine", "training")
       if importlib.util.find_spec(name) is not None])
""")
    assert probe.returncode == 0, probe.stderr
    where, clashes = probe.stdout.splitlines()
    assert where.startswith(str(installed))
    assert clashes == "[]"


def test_the_own_network_example_trains_from_outside_the_clone(installed, tmp_path):
    run = outside(installed, tmp_path, os.path.join(REPO, "examples", "own_network.py"))
    assert run.returncode == 0, run.stderr
    accuracy = [line for line in run.stdout.splitlines() if line.startswith("test accuracy:")]
    assert len(accuracy) == 1, run.stdout
    sampled, mean = [float(word.rstrip("%")) for word in accuracy[0].split() if word.endswith("%")][:2]
    assert sampled > 80 and mean > 80, accuracy[0]  # chance is 25%
    assert "take the values [-1.0, 1.0]" in run.stdout


def test_the_load_packed_example_runs_an_exported_network(installed, tmp_path):
    """An exported narrow ResNet18: the example's predictions are those of the network
    that ``load_packed`` of the clone gives for the same images."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, width=4)
    means = {name: p.detach().clone() for name, p in model.named_parameters() if is_binary(p)}
    path = str(tmp_path / "model.bnn")
    packed.save(packed.pack(model, means, "resnet18", 4, 10, 32, "cifar10", (0.5,) * 3, (0.25,) * 3,
                                       "a test"), path)
    run = outside(installed, tmp_path, os.path.join(REPO, "examples", "load_packed.py"), path)
    assert run.returncode == 0, run.stderr
    assert "resnet18 (width 4) for cifar10, 10 classes, 32x32 images" in run.stdout

    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_packed(path)((images.float() / 255 - 0.5) / 0.25).argmax(1).tolist()
    printed = [int(line.split()[3]) for line in run.stdout.splitlines() if line.startswith("image ")]
    assert printed == expected
