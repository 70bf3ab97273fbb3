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


def rng_states(device: torch.device) -> dict:
    """Every global random-number state a run on ``device`` draws from, as plain data
    (a checkpoint holds it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_rng_states(states: dict, device: torch.device):
    """Restore what ``rng_states`` returned. The states are CPU tensors whatever device
    the checkpoint was loaded onto (``map_location`` moves them with everything else)."""
    torch.set_rng_state(states["torch"].cpu())
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].cpu().numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu(), device)
