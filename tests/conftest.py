"""Fixtures shared by the test modules: small generated datasets in the real CIFAR
on-disk format, written once per session."""
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # the repository's packages, wherever pytest is started from

from utils import environment  # noqa: E402

import torch  # noqa: E402

from data.synthetic import structured_images, write_cifar, write_structured_cifar  # noqa: E402

def pytest_configure(config):
    """A torch and torchvision that do not work together would fail dozens of tests with
    tracebacks: the suite stops before collecting anything, with the one line that says so."""
    broken = environment.problem()
    if broken:
        pytest.exit(f"error: {broken}", returncode=pytest.ExitCode.USAGE_ERROR)


# The suite runs in two processes on two cores (pytest -n 2): one thread each, as the
# runs they start (helpers.ENV), unless OMP_NUM_THREADS says how many.
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 1))


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory):
    """A structured CIFAR-10 (300 training + 100 test images): with helpers.TINY, 5
    training steps per epoch."""
    root = tmp_path_factory.mktemp("cifar10")
    write_structured_cifar(str(root), "cifar10", num_train=300, num_test=100, seed=0)
    return str(root)


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory):
    """A learnable CIFAR-100-format dataset (320 + 100 images of 5 blocky colour classes):
    a tiny network reaches accuracies that differ from seed to seed within two epochs."""
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar(str(root), "cifar100", *structured_images(320, 100, 5, seed=0))
    return str(root)
