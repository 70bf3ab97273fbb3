"""Several processes training one run: torchrun's environment, and the few collective
operations the training program needs.

``torchrun --nproc_per_node N main.py ...`` starts N processes with RANK, WORLD_SIZE
and LOCAL_RANK in their environment. Each is one rank: it trains on its shard of the
data with its own weight sample per step, the ranks average their gradients (VISPA's
M and Z gradients and the real parameters' ones) before every step, and rank 0 writes
the logs and checkpoints. Without torchrun there is one rank, and every operation
here does nothing.
"""
import datetime
import math
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


class RankError(Exception):
    """torchrun's environment does not describe a rank (or the ranks do not meet); the
    message says what is wrong."""


def from_environment(environment=os.environ) -> World:
    """The World torchrun describes (one rank without it). RankError, one line, for
    variables that do not make a rank: not whole numbers, RANK missing, RANK outside
    WORLD_SIZE."""
    def whole(name, default=None):
        text = environment.get(name, default)
        if text is None or not text.strip().isdigit():
            raise RankError(f"{name}={text!r} is not a whole number" if text is not None else
                            f"WORLD_SIZE={environment.get('WORLD_SIZE')} is set but {name} is not: start the ranks "
                            f"with torchrun, which sets both")
        return int(text)

    if "WORLD_SIZE" not in environment:
        return World()
    size = whole("WORLD_SIZE")
    if size < 1:
        raise RankError(f"WORLD_SIZE={size}: there must be at least one rank")
    if size == 1:
        return World()
    rank, local = whole("RANK"), whole("LOCAL_RANK", "0")
    if rank >= size:
        raise RankError(f"RANK={rank} is not one of the WORLD_SIZE={size} ranks (0 to {size - 1})")
    return World(rank, size, local)


def rendezvous_seconds(environment=os.environ) -> float:
    """How long the ranks wait for each other: at the start, and at every collective
    operation (VISPA_RENDEZVOUS_SECONDS, default 600)."""
    text = environment.get("VISPA_RENDEZVOUS_SECONDS", "600")
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 1 <= seconds <= 7 * 24 * 3600):
        raise RankError(f"VISPA_RENDEZVOUS_SECONDS={text!r}: give the seconds the ranks wait for each other, a "
                        f"number from 1 to 604800 (a week); the default is 600")
    return seconds


def start(world: World, device: torch.device):
    """Join the other ranks: NCCL between GPUs, gloo between CPU processes. RankError if
    they have not all joined within ``rendezvous_seconds``."""
    if world.several and not dist.is_initialized():
        seconds = rendezvous_seconds()
        try:
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=world.rank,
                                    world_size=world.size, timeout=datetime.timedelta(seconds=seconds),
                                    device_id=device if device.type == "cuda" else None)
        except Exception as error:  # torch's kinds of rendezvous failure differ by version and store
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RankError(f"rank {world.rank} of {world.size}: the ranks did not all meet within {seconds:g} s "
                            f"({first[:200]}); start every rank with the same torchrun command "
                            f"(VISPA_RENDEZVOUS_SECONDS sets the time limit)") from None


def agree(value, world: World, what: str):
    """RankError unless every rank has the same ``value`` (a dict of settings), naming
    the first setting that differs and its value on each rank."""
    if not world.several:
        return
    values = gather(value, world)
    for key in value:
        seen = [v.get(key) for v in values]
        if any(v != seen[0] for v in seen):
            where = ", ".join(f"{v!r} on rank {r}" for r, v in enumerate(seen))
            raise RankError(f"the ranks were started with different {what}: {key} is {where}; start every rank "
                            f"with the same command")
    if any(set(v) != set(value) for v in values):
        raise RankError(f"the ranks were started with different {what}")


def finish(world: World):
    """Leave the other ranks, once all of them are done (a rank that tore down its
    connections while another still used them would take that one down)."""
    if world.several and dist.is_initialized():
        try:
            dist.barrier()
        finally:
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
    """``sum_`` over ``world`` as a function of the tensor (what engine.py and
    ``optim.recalibrate`` take as ``total``); None for one process, where there is nothing
    to sum (and ``recalibrate`` takes torch's own BatchNorm path, as ``update_bn``)."""
    return (lambda tensor: sum_(tensor, world)) if world.several else None


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
