"""Fixtures shared by the test modules: small generated datasets in the real CIFAR
on-disk format, written once per session."""
import ast
import inspect
import os
import re
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


@pytest.fixture(scope="module")
def one_epoch(cifar10_root, tmp_path_factory):
    """A results folder holding the run "run" after its first of one epoch (the tiny
    network of helpers.TINY), made once per module that uses it."""
    from helpers import train_tiny
    results = tmp_path_factory.mktemp("one-epoch")
    train_tiny(cifar10_root, results, "run", epochs=1)
    return results


@pytest.fixture(scope="session")
def cifar100_root(tmp_path_factory):
    """A learnable CIFAR-100-format dataset (320 + 100 images of 5 blocky colour classes):
    a tiny network reaches accuracies that differ from seed to seed within two epochs."""
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar(str(root), "cifar100", *structured_images(320, 100, 5, seed=0))
    return str(root)


# ---- markers: the fast loop ---------------------------------------------------------------------

# A test is "e2e" when it starts main.py, a script or another process: its body, a function
# of its module it calls, or a fixture it uses (and what those call) does. "golden" when it
# reads the reference data produced by the authors' code. The fast loop while editing is
# `python -m pytest -m "not e2e" ...`; CI runs everything.
STARTS_A_PROCESS = re.compile(r"\b(run_main|start_main|run_script|train_tiny|Forked|subprocess|mp\.spawn|"
                              r"multiprocessing)\b")
READS_GOLDEN = re.compile(r"\bgolden\b|GOLDEN")


def _functions(module):
    """{name: source} of the functions defined at the top of ``module``."""
    try:
        tree = ast.parse(inspect.getsource(module))
    except (OSError, TypeError, SyntaxError):
        return {}
    lines = inspect.getsource(module).splitlines()
    return {node.name: "\n".join(lines[node.lineno - 1:node.end_lineno]) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def _reaches(source, functions, pattern, seen):
    """Whether ``source``, or a function of the module it calls (transitively), matches."""
    if pattern.search(source):
        return True
    for name in set(re.findall(r"\b(\w+)\(", source)) - seen:
        if name in functions:
            seen.add(name)
            if _reaches(functions[name], functions, pattern, seen):
                return True
    return False


def _uses(item, pattern, cache={}):  # noqa: B006 - one cache of module sources for the session
    module = item.module
    if module not in cache:
        cache[module] = _functions(module)
    functions = dict(cache[module])
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    sources = [inspect.getsource(item.function)]
    for name in item.fixturenames:
        for definition in definitions.get(name, ()):
            try:
                sources.append(inspect.getsource(definition.func))
            except (OSError, TypeError):
                pass
            owner = inspect.getmodule(definition.func)
            if owner is not None and owner is not module:
                if owner not in cache:
                    cache[owner] = _functions(owner)
                functions.update({k: v for k, v in cache[owner].items() if k not in functions})
    return any(_reaches(source, functions, pattern, set()) for source in sources)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("e2e") is None and _uses(item, STARTS_A_PROCESS):
            item.add_marker(pytest.mark.e2e)
        if _uses(item, READS_GOLDEN):
            item.add_marker(pytest.mark.golden)
