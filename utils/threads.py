"""How many threads a process computes with on the CPU.

torch starts one thread per core of the machine. Two things make that a bad choice
for a training run: a container or a job scheduler may grant the process fewer cores
than the machine has (an affinity mask, a cgroup CPU quota), and processes of one job
that share a machine (torchrun's ranks, the benchmark scripts' seeds) would each take
every core. Threads that outnumber the cores they get wait for each other at every
operation: on a 2-core machine with another job busy, a width-8 demo took 75 s with two
threads and 37 s with one.

A process here takes the cores it may use, shared among the processes of its job on
the machine, unless ``--threads`` or ``OMP_NUM_THREADS`` says how many. Results on the
CPU depend on the thread count (sums are added in another order), so a run's log says
it, and a resumed run keeps the count it started with.
"""
import math
import os

import torch


def usable_cores() -> int:
    """The cores this process may run on: its affinity mask, capped by a cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def _cgroup_quota():
    """The CPU quota of the process's cgroup in cores (cgroup v2 ``cpu.max``, or v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``), or None when there is none."""
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda text: text.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            with open(path) as f:
                text = f.read()
            if parse is None:
                with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
                    quota, period = text.strip(), f.read().strip()
            else:
                quota, period = parse(text)
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError):
            continue
    return None


def choose(requested=None, environment=os.environ) -> int:
    """The thread count: ``requested`` (``--threads``), else ``OMP_NUM_THREADS``, else the
    usable cores shared among the job's processes on this machine (torchrun's
    ``LOCAL_WORLD_SIZE``)."""
    if requested:
        return requested
    if environment.get("OMP_NUM_THREADS", "").isdigit() and int(environment["OMP_NUM_THREADS"]) > 0:
        return int(environment["OMP_NUM_THREADS"])
    local = environment.get("LOCAL_WORLD_SIZE", "1")
    return max(1, usable_cores() // (int(local) if local.isdigit() and int(local) > 0 else 1))


def use(threads: int):
    """Compute with ``threads`` threads from now on."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def describe(threads: int) -> str:
    """``"2 CPU threads"``, with advice when other work already keeps the cores busy (the
    load average of the last minute), so that the threads would wait for each other."""
    text = f"{threads} CPU thread{'s' if threads != 1 else ''}"
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return text
    cores = usable_cores()
    if threads > 1 and load + threads > cores + 0.5:
        fewer = max(1, min(threads - 1, round(cores - load)))
        text += (f" (the CPU was busy at the start, load {load:.1f} on {cores} cores: with fewer threads, "
                 f"--threads {fewer}, this run may be faster)")
    return text
