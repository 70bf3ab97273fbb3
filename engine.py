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
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from optim import recalibrate
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
    (set before the step). Returns the epoch's loss and accuracies (over the processes)
    and ``step_losses``: this process's loss of every step (the mean over its virtual
    ranks), read from the device once."""
    ranks = ranks or Ranks()
    device = _device(model)
    model.train()
    meter = Accumulator(device)
    step_losses = []  # on the device: read once, at the end
    for i, step in enumerate(_groups(batches, len(ranks.generators))):
        lr = lr_at(first_iteration + i)
        for group in opt.param_groups:  # a group may run its own peak on the same schedule (lr_scale)
            group["lr"] = lr * group.get("lr_scale", 1.0)
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
            step_losses.append(loss.detach().float())
        if ranks.average is not None:
            ranks.average(opt.collected_gradients())
        opt.step()
    result = meter.result(ranks.total)
    per_step = torch.stack(step_losses).view(-1, len(ranks.generators)).mean(1) if step_losses else torch.zeros(0)
    return dict(result, step_losses=per_step.cpu().tolist())


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


class Prediction(NamedTuple):
    """What L sampled networks say of a batch."""
    logits: torch.Tensor            # (B, C) the L passes' logits averaged: the released code's accuracy
    loss: torch.Tensor              # the mean of the L per-pass losses (the released code's loss)
    log_probs: torch.Tensor         # (B, C) log of the predictive, the mean of the L softmaxes
    expected_entropy: torch.Tensor  # (B,) the mean over the passes of each pass's entropy


@torch.no_grad()
def predict(model, opt, images, labels, L, bf16=False) -> Prediction:
    """The released code's protocol for one batch: L passes, each on a fresh sample of
    every binary tensor; and the predictive distribution of the L networks. The part
    before the first binary layer (``model.stem``) does not depend on the draws and is
    computed once. ``labels`` None: no loss (images of another dataset)."""
    device = images.device
    with autocast(device, bf16):
        features = model.stem(images)
    logits_sum, loss_sum, log_probs, entropy_sum = 0.0, 0.0, None, 0.0
    for _ in range(L):
        with opt.sampled_params(), autocast(device, bf16):
            logits = full_precision(model.body(features))
        logits_sum = logits_sum + logits
        log_p = F.log_softmax(logits, dim=1)
        if labels is not None:
            loss_sum = loss_sum + F.nll_loss(log_p, labels)  # F.cross_entropy, its log-softmax kept
        log_probs = log_p if log_probs is None else torch.logaddexp(log_probs, log_p)
        entropy_sum = entropy_sum + _entropy(log_p)
    return Prediction(logits_sum / L, loss_sum / L, log_probs - math.log(L), entropy_sum / L)


def _entropy(log_probs):
    """The entropy of each row's distribution, in nats (0 log 0 = 0)."""
    return -(log_probs.exp() * log_probs).nan_to_num(0.0).sum(1)


@torch.no_grad()
def evaluate(model, opt, batches, L, bf16=False, total=None, keep=False) -> dict:
    """Loss, top-1 and top-5 of the L-sample protocol (``predict``) over ``batches``,
    BatchNorm on its running statistics, and the calibration of the predictive
    distribution (NLL, ECE, Brier: ``utils.meters``). ``total`` sums the counts over the
    processes (each evaluates its shard). ``keep``: also this process's per-image
    ``probs`` (the predictive), ``logits`` (averaged), ``labels``, ``image_nll`` (-log of
    the label's probability), ``entropy`` (of the predictive) and ``mutual_information``
    (between the prediction and the weights: the entropy of the predictive minus the mean
    entropy of the L networks), as CPU tensors."""
    def forward(images, labels):
        p = predict(model, opt, images, labels, L, bf16)
        entropy = _entropy(p.log_probs)
        return p.logits, p.loss, p.log_probs, {"logits": p.logits.float(), "entropy": entropy,
                                                "mutual_information": entropy - p.expected_entropy}
    return _evaluated(model, batches, forward, total, keep)


@torch.no_grad()
def evaluate_mean(model, opt, batches, bf16=False, total=None, keep=False) -> dict:
    """The same for the deterministic network b = sign(M): the one binary network to deploy."""
    with opt.mean_params():
        return evaluate_deterministic(model, batches, bf16, total, keep)


@torch.no_grad()
def evaluate_deployed(model, opt, images, batches, bf16=False, total=None, keep=False) -> dict:
    """The deployed network: the mean network sign(M) (``opt`` None: the network as it is)
    with BatchNorm statistics of its own, recomputed on ``images`` (``optim.recalibrate``:
    training images, in train mode, the union over the processes with ``total``), then
    evaluated on ``batches`` as ``evaluate_deterministic``; ``"images"``: how many were
    used. The network's running statistics are as before afterwards: the training goes
    on with those of its samples."""
    buffers = list(model.buffers())
    kept = [b.clone() for b in buffers]
    try:
        used = recalibrate(model, opt, images, total)
        result = evaluate_mean(model, opt, batches, bf16, total, keep) if opt is not None else \
            evaluate_deterministic(model, batches, bf16, total, keep)
    finally:
        for buffer, value in zip(buffers, kept):
            buffer.copy_(value)
    return dict(result, images=used)


@torch.no_grad()
def evaluate_deterministic(model, batches, bf16=False, total=None, keep=False) -> dict:
    """Loss, top-1, top-5 and calibration of a network as it is (an exported one, say);
    ``keep``: its per-image ``probs``, ``labels``, ``image_nll`` and ``max_prob``."""
    def forward(images, labels):
        with autocast(images.device, bf16):
            logits = full_precision(model(images))
        log_probs = F.log_softmax(logits, dim=1)
        return logits, F.nll_loss(log_probs, labels), log_probs, {"max_prob": log_probs.max(1).values.exp()}
    return _evaluated(model, batches, forward, total, keep)


def _evaluated(model, batches, forward, total, keep):
    """The meter of ``forward(images, labels) -> (logits, mean loss, log-probabilities,
    per-image scores)`` over ``batches``; with ``keep``, the per-image outputs too
    (gathered on the device, moved to the host once)."""
    device = _device(model)
    model.eval()
    meter = Accumulator(device)
    kept = []
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits, loss, log_probs, scores = forward(images, labels)
        meter.add(loss, logits, labels, log_probs)
        if keep:
            nll = -log_probs.gather(1, labels.view(-1, 1)).view(-1).double()  # in log space: no underflow
            kept.append(dict(scores, probs=log_probs.exp().float(), labels=labels, image_nll=nll))
    result = meter.result(total)
    if keep:
        for key in (kept[0] if kept else {}):
            result[key] = torch.cat([k[key] for k in kept]).cpu()
    return result


@torch.no_grad()
def state_is_finite(model, opt) -> bool:
    """Whether every parameter and buffer of the network and every tensor of the
    optimizer's state (M, Z, momenta) is finite: one host sync for all of them."""
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [t for state in opt.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    checks = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(checks).all()) if checks else True
