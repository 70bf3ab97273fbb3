"""What the tests of the shell scripts share: where the repository is, how to run a
script, and small generated datasets in the real CIFAR on-disk format."""
import os
import re
import subprocess
import time

import numpy as np

from data.synthetic import structured_images, write_cifar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script_env(**overrides):
    """The environment for a script under test: one thread per process (the runs of a
    test share two cores; more threads only make them wait for each other)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.update({key: str(value) for key, value in overrides.items()})
    return env


def run_script(name, *args, timeout=300, **env):
    """Run ``bash <repo>/<name> args...`` with the environment overrides ``env``."""
    return subprocess.run(["bash", os.path.join(REPO, name), *args], env=script_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def write_tiny_cifar100(root, num_train=320, num_test=100, classes=5, seed=0):
    """A learnable CIFAR-100-format dataset: images of ``classes`` blocky colour
    templates plus noise (labels 0..classes-1), so a tiny network reaches accuracies that
    differ from seed to seed within two epochs."""
    write_cifar(root, "cifar100", *structured_images(num_train, num_test, classes, seed))
    return root


def wait_for(predicate, timeout=120, interval=0.05):
    """Poll until ``predicate()`` is true; AssertionError after ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {predicate}")
        time.sleep(interval)


EPOCH_LINE = re.compile(r"^Epoch (\d+)/(\d+) .* val loss \S+ Prec@1 (\S+) .* mean-net Prec@1 (\S+) ")
BEST_LINE = re.compile(r"^Best Prec@1: (\S+) \(epoch (\d+)/(\d+)\)$")


def read_log(path):
    """A run log as main.py writes it: {epoch: (val top-1, mean-net top-1)}, and the
    (best top-1, its epoch, epochs) of its last line (None if it is not a best line)."""
    with open(path) as f:
        lines = f.read().splitlines()
    epochs = {}
    for line in lines:
        found = EPOCH_LINE.match(line)
        if found:
            epochs[int(found.group(1))] = (float(found.group(3)), float(found.group(4)))
    best = BEST_LINE.match(lines[-1]) if lines else None
    return epochs, (float(best.group(1)), int(best.group(2)), int(best.group(3))) if best else None


def np_uint8_images(n, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
