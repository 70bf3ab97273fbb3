"""Seeds: the global generators of a process, and independent streams made from one seed.

A run has one seed. The network's initialisation comes from it directly (the same on
every rank); every other random stream - each rank's weight draws, each shard's
augmentation, each epoch's order of the data - gets a seed of its own derived from it
by name, so that the streams are independent of each other and of what else draws
random numbers, and a rank's stream is the same whichever process runs it.
"""
import hashlib
import random

import numpy as np
import torch


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(seed, *names) -> int:
    """A 62-bit seed for the stream ``names`` of the run seeded ``seed``."""
    text = ":".join(str(part) for part in (seed, *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 2


def generator(device, seed, *names) -> torch.Generator:
    """A generator on ``device`` for the stream ``names`` of the run seeded ``seed``."""
    return torch.Generator(device=device).manual_seed(derived_seed(seed, *names))
