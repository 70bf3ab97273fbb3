"""Several processes training one run: torchrun's environment, and the few collective
operations the training program needs.

``torchrun --nproc_per_node N main.py ...`` starts N processes with RANK, WORLD_SIZE
and LOCAL_RANK in their environment. Each is one rank: it trains on its shard of the
data with its own weight sample per step, the ranks average their gradients (VISPA's
M and Z gradients and the real parameters' ones) before every step, and rank 0 writes
the logs and checkpoints. Without torchrun there is one rank, and every operation
here does nothing.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes."""
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.size > 1


def from_environment() -> World:
    """The World torchrun describes (one rank without it)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    return World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))


def start(world: World, device: torch.device):
    """Join the other ranks: NCCL between GPUs, gloo between CPU processes."""
    if world.several and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                rank=world.rank, world_size=world.size,
                                device_id=device if device.type == "cuda" else None)


def finish(world: World):
    if world.several and dist.is_initialized():
        dist.destroy_process_group()


def average_(tensors, world: World):
    """Replace each tensor by its mean over the ranks (one all-reduce per dtype and device)."""
    if not world.several or not tensors:
        return
    for group in _by_kind(tensors):
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(world.size)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def sum_(tensor, world: World):
    """Replace ``tensor`` by its sum over the ranks."""
    if world.several:
        dist.all_reduce(tensor)
    return tensor


def summing(world: World):
    """``sum_`` over ``world`` as a function of the tensor (what engine.py takes as ``total``)."""
    return lambda tensor: sum_(tensor, world)


def broadcast_(tensors, world: World, source=0):
    """Give every rank rank ``source``'s values of ``tensors``."""
    if world.several:
        for t in tensors:
            dist.broadcast(t, source)


def maximum(value: int, world: World, device) -> int:
    """The largest of the ranks' ``value`` (every rank gets the same answer)."""
    if not world.several:
        return value
    tensor = torch.tensor([value], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def gather(obj, world: World) -> list:
    """Every rank's ``obj`` (plain data and CPU tensors), in rank order, on every rank."""
    if not world.several:
        return [obj]
    gathered = [None] * world.size
    dist.all_gather_object(gathered, obj)
    return gathered


def _by_kind(tensors):
    groups = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups.values()
