"""Training and evaluation of a binary network with VISPA: one epoch, one L-sample
evaluation, one evaluation of the mean network.

The functions take the network, the optimizer and an iterable of (images,
labels) batches, and return the epoch's loss and accuracies. They know nothing of
files, signals or progress bars: the caller wraps the batches to show progress or
to stop early (an iterable that ends early ends the epoch early).

One training step, in this order: the batch -> inside
``opt.sampled_params(train=True)`` the forward pass on one sign sample of the
binary weights, the loss, backward (leaving the context turns this sample's weight
gradient into M and Z gradients) -> ``opt.step()`` -> loss and accuracy
accumulated on the device (read once, at the end).

A step of N ranks (``Ranks``): each rank draws its own sample of the binary weights
and trains it on its own batch, with BatchNorm statistics of that batch; the step
applies the average of the N samples' gradients, and the running statistics are
those of rank 0. The N ranks may be N processes (torchrun: ``average`` all-reduces
the gradients), N virtual ranks of one process (one batch each, in turn, then
VISPA's average over the samples it collected), or both.
"""
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from utils.meters import Accumulator


@dataclass
class Ranks:
    """How this process takes part in a step: one sample per virtual rank, each drawn
    from its own generator, in turn; then ``average`` makes the gradients the mean over
    the processes, and ``total`` sums a tensor over them (None: one process)."""
    generators: list = field(default_factory=lambda: [None])
    average: Optional[Callable] = None
    total: Optional[Callable] = None


def _device(model):
    return next(model.parameters()).device


def autocast(device, bf16):
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def full_precision(logits):
    """Losses and averages in at least float32, also when the forward pass ran in bf16."""
    return logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits


def train_one_epoch(model, opt, batches, lr_at, first_iteration=0, bf16=False, ranks=None) -> dict:
    """One pass over ``batches``. Each step takes one batch per virtual rank of ``ranks``
    (one without), in turn; the learning rate of step i is ``lr_at(first_iteration + i)``
    (set before the step)."""
    ranks = ranks or Ranks()
    device = _device(model)
    model.train()
    meter = Accumulator(device)
    for i, step in enumerate(_groups(batches, len(ranks.generators))):
        lr = lr_at(first_iteration + i)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        for k, ((images, labels), generator) in enumerate(zip(step, ranks.generators)):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            with _running_statistics_kept(model, k > 0), opt.sampled_params(train=True, generator=generator):
                with autocast(device, bf16):
                    logits = model(images)
                loss = F.cross_entropy(full_precision(logits), labels)
                loss.backward()
            meter.add(loss, logits, labels)
        if ranks.average is not None:
            ranks.average(opt.collected_gradients())
        opt.step()
    return meter.result(ranks.total)


def _groups(batches, n):
    """Consecutive groups of ``n`` batches (an incomplete last group is left out: the
    iterable ended early)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []


@contextmanager
def _running_statistics_kept(model, kept):
    """With ``kept``, the BatchNorm running statistics are as before once the enclosed
    forward pass is over: the ranks after the first move their batch statistics, not
    the running ones (the running statistics of a multi-GPU run are rank 0's)."""
    if not kept:
        yield
        return
    buffers = [b for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
               for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None]
    saved = [b.clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


@torch.no_grad()
def predict(model, opt, images, labels, L, bf16=False):
    """The released code's protocol for one batch: L passes, each on a fresh sample of
    every binary tensor. Returns the averaged logits and the mean of the L per-pass
    losses. The part before the first binary layer (``model.stem``) does not depend
    on the draws and is computed once."""
    device = images.device
    with autocast(device, bf16):
        features = model.stem(images)
    logits_sum, loss_sum = 0.0, 0.0
    for _ in range(L):
        with opt.sampled_params(), autocast(device, bf16):
            logits = full_precision(model.body(features))
        logits_sum = logits_sum + logits
        loss_sum = loss_sum + F.cross_entropy(logits, labels)
    return logits_sum / L, loss_sum / L


@torch.no_grad()
def evaluate(model, opt, batches, L, bf16=False, total=None) -> dict:
    """Loss, top-1 and top-5 of the L-sample protocol (``predict``) over ``batches``,
    BatchNorm on its running statistics. ``total`` sums the counts over the processes
    (each evaluates its shard)."""
    return _evaluated(model, batches, lambda images, labels: predict(model, opt, images, labels, L, bf16), total)


@torch.no_grad()
def evaluate_mean(model, opt, batches, bf16=False, total=None) -> dict:
    """The same for the deterministic network b = sign(M): the one binary network to deploy."""
    with opt.mean_params():
        return evaluate_deterministic(model, batches, bf16, total)


@torch.no_grad()
def evaluate_deterministic(model, batches, bf16=False, total=None) -> dict:
    """Loss, top-1 and top-5 of a network as it is (an exported one, say)."""
    def forward(images, labels):
        with autocast(images.device, bf16):
            logits = full_precision(model(images))
        return logits, F.cross_entropy(logits, labels)
    return _evaluated(model, batches, forward, total)


def _evaluated(model, batches, forward, total):
    """The meter of ``forward(images, labels) -> (logits, mean loss)`` over ``batches``."""
    device = _device(model)
    model.eval()
    meter = Accumulator(device)
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits, loss = forward(images, labels)
        meter.add(loss, logits, labels)
    return meter.result(total)


@torch.no_grad()
def state_is_finite(model, opt) -> bool:
    """Whether every parameter and buffer of the network and every tensor of the
    optimizer's state (M, Z, momenta) is finite: one host sync for all of them."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(checks).all()) if checks else True
