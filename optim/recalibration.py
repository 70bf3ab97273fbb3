"""BatchNorm statistics of the mean network ``sign(M)``, the one binary network to deploy.

During training every forward pass runs on a sampled network, so the BatchNorm running
statistics are those of the samples, not of ``sign(M)``: evaluated on them, the mean
network loses accuracy it does not have to lose. ``recalibrate`` recomputes them for
``sign(M)`` in one pass over training images, as ``torch.optim.swa_utils.update_bn``
recomputes them for an averaged network::

    images = recalibrate(model, opt, batches)          # then evaluate inside opt.mean_params()

It takes any optimizer with a ``mean_params()`` context (VISPA, or a rival with the
same protocol), or None for a network taken as it is (an exported one, say). Where
several processes each hold a shard of the images, ``total``
(a function that sums a tensor over them) makes every BatchNorm use, at every step,
the statistics of the union of the processes' batches, as SyncBatchNorm does: the
result is that of one process running on the concatenated batches.
"""
import contextlib
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def recalibrate(model, opt, batches, total=None) -> int:
    """Recompute the running statistics of every BatchNorm of ``model`` for the network
    that ``opt.mean_params()`` gives (``opt`` None: the network as it is), from
    ``batches`` (an iterable of (images, labels)
    or of images), and return the number of images used (over all processes with
    ``total``).

    The semantics are ``update_bn``'s: the running statistics are reset and become the
    cumulative average over the batches of each batch's mean and unbiased variance
    (momentum None: each batch weighs the same), with the model in train mode and no
    gradients. Afterwards each BatchNorm has its momentum back, every module its own
    train/eval mode, and the layers hold what ``mean_params`` leaves (for VISPA,
    ``sign(M)``, what they hold outside its contexts). Nothing else changes: not the
    optimizer's state, not the parameters, not the global random generators (random
    layers such as dropout draw in train mode, from generators restored afterwards).
    On an error the running statistics are left as they were.

    ``total``: where each process (torchrun rank) holds a shard of the images, a
    function that sums a tensor over the processes, in place or returning the sum
    (``utils.distributed.summing(world)``). Every process must then give the same
    number of batches: this is checked at every step, so that a process that runs out
    early raises the same ValueError on every process instead of a hang.

    Raises ValueError for a network without BatchNorm, a BatchNorm without running
    statistics, and no images at all.
    """
    norms = _batch_norms(model)
    device = norms[0].running_mean.device
    settings = [(m.momentum, m.__dict__.get("forward")) for m in norms]
    kept = [[b.clone() for b in _running(m)] for m in norms]
    modes = [(m, m.training) for m in model.modules()]
    images = 0
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            if total is not None:
                m.forward = partial(_union_forward, m, total)
        model.train()
        with _random_states_kept(device), (opt.mean_params() if opt is not None else contextlib.nullcontext()):
            for x, count in _steps(batches, device, total):
                model(x)
                images += count
        if images == 0:
            raise ValueError("recalibrate: no images: `batches` gave none, and the BatchNorm "
                             "statistics need at least one batch")
    except BaseException:
        for m, values in zip(norms, kept):
            for buffer, value in zip(_running(m), values):
                buffer.copy_(value)
        raise
    finally:
        for m, (momentum, forward) in zip(norms, settings):
            m.momentum = momentum
            m.__dict__.pop("forward", None)  # back to the class's forward, or to the module's own
            if forward is not None:
                m.forward = forward
        for module, training in modes:
            module.training = training
    return images


def _batch_norms(model):
    """Every BatchNorm of ``model``; ValueError if there is none, or one keeps no
    running statistics (there would be nothing to recompute in it)."""
    norms = []
    for name, m in model.named_modules():
        if isinstance(m, _BatchNorm):
            if not m.track_running_stats or any(b is None for b in _running(m)):
                raise ValueError(f"recalibrate: the BatchNorm {name or type(m).__name__!r} keeps no running "
                                 f"statistics (track_running_stats=False, or no running buffers), so they "
                                 f"cannot be recomputed")
            norms.append(m)
    if not norms:
        raise ValueError(f"recalibrate: {type(model).__name__} has no BatchNorm: there are no statistics "
                         f"to recompute")
    return norms


def _running(m):
    return m.running_mean, m.running_var, m.num_batches_tracked


def _random_states_kept(device):
    """The global generators of the CPU and of ``device``, restored on leaving."""
    return torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type)


def _steps(batches, device, total):
    """(images on ``device``, how many) per step. With ``total``, every step first sums
    over the processes how many of them have a batch (and how many images): a
    ValueError on every process unless all or none of them do, and the count is that
    of the union."""
    iterator = iter(batches)
    step = 0
    while True:
        x = next(iterator, None)
        if isinstance(x, (list, tuple)):
            x = x[0]
        count = 0 if x is None else len(x)
        if total is not None:
            flags = torch.tensor([1, int(x is not None), count], device=device)
            processes, having, count = _summed(total, flags).tolist()
            if having not in (0, processes):
                raise ValueError(f"recalibrate: the processes gave different numbers of batches: at step "
                                 f"{step + 1}, {having} of {processes} had one; give every process as many")
        if x is None:
            return
        yield x.to(device, non_blocking=True), count
        step += 1


def _summed(total, tensor):
    summed = total(tensor)
    return tensor if summed is None else summed


def _union_forward(m, total, x):
    """The train-mode forward of the BatchNorm ``m`` with the statistics of the union of
    the processes' batches: the per-channel counts and sums, then the sums of squared
    deviations from the union mean, summed over the processes (two passes, so that the
    variance keeps its precision where the mean is large). It normalises with the
    biased variance and averages the unbiased one into the running variance, as torch's
    BatchNorm does with one batch."""
    m._check_input_dim(x)
    dims = [0] + list(range(2, x.dim()))
    shape = [1, -1] + [1] * (x.dim() - 2)
    values = x.to(torch.promote_types(x.dtype, torch.float32))
    first = _summed(total, torch.cat([values.sum(dims), values.new_tensor([x.numel() // x.shape[1]])]))
    n, mean = first[-1], first[:-1] / first[-1]
    squares = _summed(total, (values - mean.view(shape)).square_().sum(dims))
    m.num_batches_tracked.add_(1)
    factor = 1.0 / float(m.num_batches_tracked)
    dtype = m.running_mean.dtype
    m.running_mean.mul_(1 - factor).add_(mean.to(dtype), alpha=factor)
    m.running_var.mul_(1 - factor).add_((squares / (n - 1)).to(dtype), alpha=factor)
    return F.batch_norm(x, mean.to(dtype), (squares / n).to(dtype), m.weight, m.bias, False, 0.0, m.eps)
