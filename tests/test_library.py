"""VISPA as a library in a project of one's own: ``pip install`` of the repository installs
one import package, ``vispa``, and the examples run with it from a folder outside the
clone, where the repository's own folders (optim/, models/, ...) cannot be imported.

The rule: inside the clone, import the folders (``from optim import VISPA``); outside it,
import ``vispa``. Each name loads the library's modules once: the clone has no ``vispa``
of its own, and an installed ``vispa`` has no ``optim``, ``models`` or ``utils`` beside it."""
import glob
import importlib.machinery
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ENV, REPO
from models import build_model, is_binary, load_packed, packed

# What `pip install .` reads: the project file, the files it names and the library's folders.
SOURCES = ["pyproject.toml", "README.md", "LICENSE", "src", "optim", "models", "utils"]

# What the training program needs beyond the library's declared dependencies (torch, numpy):
# requirements.txt's progress bars, plots, event files, datasets and test tools.
UNDECLARED = ["tqdm", "matplotlib", "tensorboard", "torchvision", "torchmetrics", "sklearn", "PIL", "pytest"]


def copy_of_the_sources(folder):
    """The files ``pip install`` reads, copied to ``folder``: a build writes into the folder
    it builds (build/, *.egg-info), and the clone stays as it is."""
    folder.mkdir(exist_ok=True)
    for name in SOURCES:
        path = os.path.join(REPO, name)
        if os.path.isdir(path):
            shutil.copytree(path, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(path, folder / name)
    return folder


def pip_install(*args):
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                              "--no-index", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stdout + install.stderr


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The folder that ``pip install --target`` filled from a copy of the repository's sources."""
    target = tmp_path_factory.mktemp("site-packages")
    pip_install("--target", target, copy_of_the_sources(tmp_path_factory.mktemp("source")))
    return target


def shipped(installed):
    """{module name: file} of every module the install holds."""
    files = glob.glob(os.path.join(installed, "vispa", "**", "*.py"), recursive=True)
    names = [os.path.relpath(file, installed)[:-3].replace(os.sep, ".").removesuffix(".__init__") for file in files]
    return dict(sorted(zip(names, files)))


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


def test_every_installed_module_imports_with_torch_and_numpy_alone(installed, tmp_path):
    """The declared dependencies are all the library needs: every module it ships imports
    with the training program's other requirements out of reach, and none comes from the clone."""
    probe = outside(installed, tmp_path, "-c", f"""
import importlib, importlib.abc, os, sys

class Undeclared(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {UNDECLARED!r}:
            raise ImportError(f"{{name}} is not a dependency of the library")

sys.meta_path.insert(0, Undeclared())
for name in {list(shipped(installed))!r}:
    importlib.import_module(name)
ours = tuple(os.path.join({REPO!r}, name, "") for name in ("src", "optim", "models", "utils", "data"))
print(sorted(m.__name__ for m in list(sys.modules.values()) if (getattr(m, "__file__", None) or "").startswith(ours)
             or os.path.dirname(getattr(m, "__file__", None) or "") == {REPO!r}))
""")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def test_the_library_ships_its_parts_and_of_utils_the_files_alone(installed, tmp_path):
    """Of utils/ the library uses files.py (models/packed.py reads and writes with it); the
    training program's modules (its run, config, progress bars) are not installed."""
    assert [name for name in shipped(installed) if name.startswith("vispa.utils")] == ["vispa.utils",
                                                                                      "vispa.utils.files"]
    probe = outside(installed, tmp_path, "-c", """
import importlib
for name in ("vispa.training", "vispa.main", "vispa.config", "vispa.engine", "vispa.data", "vispa.utils.progress"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as error:
        assert error.name == name, error
    else:
        print(name)
""")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout == ""


def test_in_the_clone_the_library_is_its_folders_and_loads_once():
    """The clone's root holds no ``vispa`` (only an install puts one on the path), so the
    library's modules load once, as optim, models and utils; the exported network's files
    are read and written by the training program's own utils.files (one FileError)."""
    from utils import files
    assert importlib.machinery.PathFinder.find_spec("vispa", [REPO]) is None
    assert packed.files is files


def test_an_editable_install_is_the_folders_themselves(tmp_path):
    """``pip install -e .``, for work on the library: vispa is src/vispa and its parts the
    folders, so an edit takes effect without reinstalling."""
    source, prefix = copy_of_the_sources(tmp_path / "source"), tmp_path / "prefix"
    pip_install("--prefix", prefix, "--editable", source)
    [pth] = glob.glob(os.path.join(prefix, "**", "__editable__*.pth"), recursive=True)
    env = {key: value for key, value in ENV.items() if key != "PYTHONPATH"}
    probe = subprocess.run([sys.executable, "-c", f"""
import site
site.addsitedir({os.path.dirname(pth)!r})
import vispa, vispa.models.packed, vispa.utils.files
print(vispa.__file__, vispa.optim.__file__, vispa.models.packed.__file__)
assert vispa.models.packed.files is vispa.utils.files
"""], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(source / "src" / "vispa" / "__init__.py"),
                                    str(source / "optim" / "__init__.py"), str(source / "models" / "packed.py")]


def test_the_own_network_example_trains_from_outside_the_clone(installed, tmp_path):
    run = outside(installed, tmp_path, os.path.join(REPO, "examples", "own_network.py"))
    assert run.returncode == 0, run.stderr
    accuracy = [line for line in run.stdout.splitlines() if line.startswith("test accuracy:")]
    assert len(accuracy) == 1, run.stdout
    sampled, mean, deployed = [float(word.rstrip("%")) for word in accuracy[0].split() if word.endswith("%")][:3]
    assert sampled > 80 and mean > 80 and deployed > 80, accuracy[0]  # chance is 25%
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

    # a network of one's own images names its classes
    names = [f"kind {i}" for i in range(10)]
    packed.save(packed.pack(model, means, "resnet18", 4, 10, 32, "imagefolder", (0.5,) * 3, (0.25,) * 3, "a test",
                            classes=names), path)
    run = outside(installed, tmp_path, os.path.join(REPO, "examples", "load_packed.py"), path)
    assert run.returncode == 0, run.stderr
    assert [line.split(" (probability")[0] for line in run.stdout.splitlines() if line.startswith("image ")] == \
        [f"image {i}: class {label} ({names[label]})" for i, label in enumerate(expected)]
