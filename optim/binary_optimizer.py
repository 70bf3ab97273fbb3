"""What every method of this library that trains binary weights shares: the protocol the
training engine, the evaluation, the checkpoints and a user's own loop rely on.

    with opt.sampled_params(train=True):   # one training sample in every binary weight
        loss_fn(model(x), y).backward()     # leaving turns dLoss/db into the method's gradients
    opt.step()                              # the method's update, and SGD on the real parameters
    with opt.sampled_params(): ...          # one network as the method draws them at test time
    with opt.mean_params(): ...             # the method's deterministic network

A method (VISPA, BayesBiNN, the latent-weight STE) keeps state tensors per binary weight
(``KEYS`` collect its per-sample gradients in their ``.grad``; ``DISTRIBUTION`` is what
model_best keeps) and says how a sample and the mean network are written, what gradient
a sample gives, and how the collected gradients update the state. Everything else is here:

- several samples before one ``step()`` (Monte Carlo samples, gradient accumulation, the
  ranks of a multi-GPU step) are collected one by one, and the step applies their
  average, to the method's state and, by torch's SGD (momentum, weight decay, no
  dampening, no Nesterov), to the real parameters: in a comparison only the binary
  weights' method differs;
- the draws come from ``opt.generator`` (seeded by ``seed``, saved in ``state_dict``), or
  from a generator given to ``sampled_params``, or are given: they do not depend on the
  data pipeline, and a resumed run draws what an uninterrupted one would;
- outside the contexts the layers hold the mean network; the contexts do not nest (an
  inner context would leave the outer one's forward pass on the wrong network);
- ``state_dict`` / ``load_state_dict`` restore everything, and refuse (before changing
  anything) a state of another network, method or shape, or invalid hyper-parameters.
"""
import math
import numbers
from contextlib import contextmanager

import torch
from torch.optim.sgd import sgd as sgd_update


def is_binary(param):
    """Binary layers mark their sign weights with ``param.binary = True`` (``mark_binary``)."""
    return getattr(param, "binary", False)


def check_number(name, value, low=None, high=None, low_open=False, high_open=False):
    """Refuse anything but a finite real number within the bounds, with a message that
    names the setting. bools are refused: ``True`` is an int to Python, not a number
    anyone means as a learning rate."""
    bounds = [f"{'>' if low_open else '>='} {low}"] if low is not None else []
    bounds += [f"{'<' if high_open else '<='} {high}"] if high is not None else []
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise ValueError(f"{name} must be a finite number{' ' + ' and '.join(bounds) if bounds else ''}, "
                         f"got {value!r}")


class BinaryWeightOptimizer(torch.optim.Optimizer):
    KEYS = ()          # the state tensors whose .grad collect a binary weight's per-sample gradients
    DISTRIBUTION = ()  # the state that is the distribution itself; the rest is the optimizer's memory
    DRAWS_AT_INIT = False  # whether the initial state is drawn from the optimizer's generator

    def __init__(self, params, defaults, fused=None, seed=None):
        if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")
        self.fused = fused
        self.generator = None  # on the first binary weight's device
        self._seed = seed
        self._samples = 0      # training samples whose gradients were collected since the last step
        self._sampling = False  # inside sampled_params()
        if self._seed is None and self.DRAWS_AT_INIT:
            self._seed = _global_seed()
        super().__init__(params, defaults)
        binary = self.binary_params()
        if not binary:
            raise ValueError(f"{type(self).__name__} found no binary weights among the parameters: binary "
                             f"layers (BinaryConv2d, BinaryLinear) mark theirs; mark a weight of your own with "
                             f"mark_binary(param) (from vispa or models)")
        if self.generator is None:  # after the initial state, which draws from torch's global generator
            self.generator = torch.Generator(device=binary[0].device).manual_seed(
                _global_seed() if self._seed is None else self._seed)

    def add_param_group(self, param_group):
        params = param_group["params"] if isinstance(param_group, dict) else param_group
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter is listed twice: give each of the network's parameters once "
                             "(model.parameters() does)")
        super().add_param_group(dict(param_group, params=params) if isinstance(param_group, dict) else params)
        group = self.param_groups[-1]
        self._check(group)
        for p in group["params"]:
            if is_binary(p):
                if self.generator is None and self.DRAWS_AT_INIT:
                    self.generator = torch.Generator(device=p.device).manual_seed(self._seed)
                with torch.no_grad():
                    self._init_state(p, group)
                    self._write_mean(p)

    def _binary_groups(self):
        """(group, its binary weights) for every group that has some."""
        for group in self.param_groups:
            params = [p for p in group["params"] if is_binary(p)]
            if params:
                yield group, params

    def binary_params(self):
        """The binary weights, in the order of the parameter groups: the order of the
        draws that ``sampled_params`` takes and yields."""
        return [p for _, params in self._binary_groups() for p in params]

    # ---- sampling -------------------------------------------------------------------

    @torch.no_grad()
    def _write_samples(self, train, draws=None, generator=None):
        """Write one sample into every binary weight (given ``draws``, every one checked
        before any is written, or fresh ones from ``generator`` or the optimizer's own);
        returns the draws, one per weight."""
        groups = list(self._binary_groups())
        given = None
        if draws is not None:
            draws = list(draws)
            count = sum(len(params) for _, params in groups)
            if len(draws) != count:
                raise ValueError(f"{len(draws)} draws given for {count} binary weights")
            given = iter([self._checked_draw(group, p, draw, train)
                          for (group, params), parts in zip(groups, _split(draws, groups))
                          for p, draw in zip(params, parts)])
        used = []
        for group, params in groups:
            self._check_layout(params)
            mine = None if given is None else [next(given) for _ in params]
            used += self._write_group(group, params, mine, self.generator if generator is None else generator, train)
        return used

    def _write_group(self, group, params, draws, generator, train):
        """Write a sample into every weight of ``group`` (``draws`` None: fresh ones);
        returns the draws used. A method draws per weight unless it says otherwise."""
        return [self._write_sample(group, p, None if draws is None else draws[i], generator, train)
                for i, p in enumerate(params)]

    def _check_layout(self, params):
        """ValueError, with what to do, when a binary weight no longer has its state's dtype
        or device (``model.double()`` or ``model.to(...)`` after the optimizer was built)."""
        for p in params:
            kept = self.state[p][self.DISTRIBUTION[0]]
            if p.dtype != kept.dtype or p.device != kept.device:
                raise ValueError(f"a binary weight is {p.dtype} on {p.device}, and its state {kept.dtype} on "
                                 f"{kept.device}: the network was converted after {type(self).__name__} was "
                                 f"built. Convert the network first (model.double(), model.to(device)), then "
                                 f"build the optimizer (or move a saved state with load_state_dict)")

    @torch.no_grad()
    def _write_means(self):
        for p in self.binary_params():
            self._write_mean(p)

    @contextmanager
    def sampled_params(self, train: bool = False, draws=None, generator=None):
        """Run the enclosed forward pass on one sample of the binary weights: a training
        sample with ``train=True``, else one network as the method draws them at test
        time. Yields the draws (one per binary weight, in ``binary_params()`` order);
        ``draws`` replays given ones; ``generator`` draws from another generator than
        the optimizer's own (the virtual ranks of a multi-GPU step, each with its own).
        With ``train=True``, leaving the context turns the gradient that the enclosed
        ``backward()`` left on each binary weight into the method's gradients of this
        sample, added to those of the samples before it (the weight's own ``.grad`` is
        cleared). On leaving, the layers hold the mean network again."""
        if self._sampling:
            raise RuntimeError("sampled_params() is already open: a forward pass runs on one sample; close "
                               "the first context before opening another (they do not nest)")
        used = self._write_samples(train, draws, generator)
        self._sampling = True
        completed = False
        try:
            yield used
            completed = True
        finally:
            self._sampling = False
            if train:
                self._collect_gradients(used, keep=completed)
            self._write_means()

    @contextmanager
    def mean_params(self):
        """Run the enclosed forward pass on the method's deterministic network."""
        if self._sampling:
            raise RuntimeError("mean_params() inside sampled_params(): the enclosing forward pass would run on "
                               "the mean network instead of its sample; close sampled_params() first")
        self._write_means()
        yield

    @torch.no_grad()
    def _collect_gradients(self, draws, keep=True):
        """Add each binary weight's gradients of the sample drawn with ``draws`` to the
        ``.grad`` of its state tensors; ``keep=False`` (the enclosed code raised) drops
        the sample."""
        draws = iter(draws)
        collected = False
        for group, params in self._binary_groups():
            for p in params:
                draw = next(draws)
                g, p.grad = p.grad, None
                if g is None or not keep:
                    continue
                collected = True
                # the state's layout; a copy only for channels_last weights
                for key, grad in self._sample_gradients(group, p, draw, g.contiguous()).items():
                    target = self.state[p][key]
                    target.grad = grad if target.grad is None else target.grad.add_(grad)
        self._samples += collected

    def zero_grad(self, set_to_none: bool = True):
        """Clear the real parameters' gradients and the collected ones of the binary weights."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear_collected()

    def _clear_collected(self):
        for p in self.binary_params():
            for key in self.KEYS:
                self.state[p][key].grad = None
        self._samples = 0

    def collected_gradients(self):
        """Every gradient the next ``step()`` uses, as tensors that may be changed in
        place (e.g. averaged across processes)."""
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                if is_binary(p):
                    grads += [self.state[p][key].grad for key in self.KEYS if self.state[p][key].grad is not None]
                elif p.grad is not None:
                    grads.append(p.grad)
        return grads

    # ---- update ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One update with the average of the gradients of the training samples collected
        since the last step. ``closure``, if given, must compute the loss and call
        ``backward()``; it is run inside ``sampled_params(train=True)``."""
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.sampled_params(train=True):
                loss = closure()
        if self._samples == 0:
            raise RuntimeError(f"{type(self).__name__}.step() needs the gradients of a training sample: run the "
                               f"forward and backward pass inside `opt.sampled_params(train=True)`")
        for group in self.param_groups:
            self._sgd(group, [(p, p.grad, self.state[p], "momentum_buffer") for p in group["params"]
                              if not is_binary(p) and p.grad is not None])
            params = [p for p in group["params"] if is_binary(p) and self.state[p][self.KEYS[0]].grad is not None]
            if params:
                self._update_binary(group, params)
        self._clear_collected()
        self._write_means()
        return loss

    def _sgd(self, group, entries):
        """torch's SGD on ``entries`` (tensor, its summed gradient, the state dict and key
        of its momentum buffer) with the gradients averaged over the samples: the fused
        kernel where every tensor is on CUDA (or ``fused=True``), torch's default elsewhere.
        The fused kernel starts the momentum of all its tensors or of none: tensors
        without a buffer yet (first step) and the others are updated in two calls."""
        if not entries:
            return
        tensors = [t for t, _, _, _ in entries]
        grads = [g if self._samples == 1 else g / self._samples for _, g, _, _ in entries]
        buffers = [state.get(key) for _, _, state, key in entries]
        fused = self.fused if self.fused is not None else all(t.is_cuda for t in tensors)
        for batch in ([i for i, b in enumerate(buffers) if b is None], [i for i, b in enumerate(buffers) if b is not None]):
            if not batch:
                continue
            batch_buffers = [buffers[i] for i in batch]
            sgd_update([tensors[i] for i in batch], [grads[i] for i in batch], batch_buffers, fused=fused or None,
                       weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                       dampening=0.0, nesterov=False, maximize=False)
            for i, buf in zip(batch, batch_buffers):
                if buf is not None:
                    _, _, state, key = entries[i]
                    state[key] = buf

    # ---- checkpoints ----------------------------------------------------------------

    def state_dict(self):
        """torch's optimizer state, plus the generator of draws (``"generator"``: the
        kind of device it draws on and its state)."""
        state = super().state_dict()
        state["generator"] = {"device": self.generator.device.type, "state": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict):
        """Restore the method's state, the real parameters' momenta, the hyper-parameters
        and the generator of draws, and write the mean network into the layers. A state
        without the optimizer's memory (model_best.pth.tar: the distribution only) starts
        that memory afresh. A generator saved on another kind of device (a CUDA run
        evaluated on the CPU) cannot be restored; this optimizer's own then goes on drawing.

        Raises ValueError, before changing anything, for a state of another network or
        method (naming the tensors) or with invalid hyper-parameters."""
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        mismatched = self._mismatches(state_dict)
        if mismatched:
            shown = "; ".join(mismatched[:3])
            shown += f"; ... ({len(mismatched)} in all)" if len(mismatched) > 3 else ""
            raise ValueError("optimizer state does not match this network: " + shown)
        super().load_state_dict(state_dict)
        for group, params in self._binary_groups():
            for p in params:
                self._complete_state(p, group)
        if isinstance(generator, dict) and generator.get("device") == self.generator.device.type:
            self.generator.set_state(generator["state"].cpu())
        self._clear_collected()
        self._write_means()

    def _mismatches(self, state_dict):
        """What keeps ``state_dict`` from being this optimizer's: every check that loading
        would otherwise fail on deep inside torch (or not at all)."""
        saved_groups, saved_state = state_dict.get("param_groups"), state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict) or \
                not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups):
            return ["it has no list of parameter groups and dict of states"]
        if len(saved_groups) != len(self.param_groups):
            return [f"{len(saved_groups)} parameter groups saved, {len(self.param_groups)} here"]
        problems = []
        for saved, group in zip(saved_groups, self.param_groups):
            try:
                self._check(dict(group, **{k: v for k, v in saved.items() if k in self.defaults}))
            except ValueError as error:
                problems.append(f"a parameter group's {error}")
                continue
            if len(saved["params"]) != len(group["params"]):
                problems.append(f"{len(saved['params'])} parameters saved, {len(group['params'])} here")
                continue
            merged = dict(group, **{k: v for k, v in saved.items() if k in self.defaults})
            for index, p in zip(saved["params"], group["params"]):
                entry = saved_state.get(index, {})
                if not isinstance(entry, dict):
                    problems.append(f"parameter {index}: its state is not a dict")
                    continue
                shapes = self._state_shapes(p, group) if is_binary(p) else {"momentum_buffer": tuple(p.shape)}
                for key in (self.DISTRIBUTION[:1] if is_binary(p) else ()):
                    if key not in entry:
                        problems.append(f"parameter {index}: {key} missing (not a state of {type(self).__name__})")
                for key, there in entry.items():
                    if key == "step":
                        continue
                    if key not in shapes:
                        problems.append(f"parameter {index}: {key} unexpected (not a state of {type(self).__name__})")
                    elif not isinstance(there, torch.Tensor):
                        problems.append(f"parameter {index}: {key} is a {type(there).__name__}, not a tensor")
                    elif tuple(there.shape) != shapes[key]:
                        problems.append(f"parameter {index}: {key} has shape {tuple(there.shape)} saved, "
                                        f"{shapes[key]} here")
                if not problems and is_binary(p) and self._state_shapes(p, merged) != shapes:
                    settings = ", ".join(f"{k}={merged[k]!r}" for k in self.defaults if merged[k] != group[k])
                    problems.append(f"parameter {index}: its group's settings ({settings}) do not fit its state")
        return problems

    # ---- what a method says -----------------------------------------------------------

    def _check(self, group):
        """Raise ValueError for an invalid hyper-parameter of ``group``."""
        check_number("lr", group.get("lr"), low=0)
        check_number("momentum", group.get("momentum"), low=0)
        check_number("weight_decay", group.get("weight_decay"), low=0)

    def _init_state(self, p, group):
        """The state of the binary weight ``p`` when the optimizer is built."""
        raise NotImplementedError

    def _state_shapes(self, p, group):
        """{state key: shape} of a binary weight's state (what a saved state must match)."""
        raise NotImplementedError

    def _complete_state(self, p, group):
        """After loading: start afresh what a state of the distribution alone lacks."""

    def _checked_draw(self, group, p, draw, train):
        """A given draw for ``p``, checked (ValueError) and on ``p``'s device and dtype."""
        raise NotImplementedError

    def _write_sample(self, group, p, draw, generator, train):
        raise NotImplementedError

    def _write_mean(self, p):
        raise NotImplementedError

    def _sample_gradients(self, group, p, draw, g):
        """{state key: its gradient} of one sample whose binary weight's gradient is ``g``."""
        raise NotImplementedError

    def _update_binary(self, group, params):
        raise NotImplementedError


def refuse_signs(p, what):
    """ValueError when the binary weight ``p`` already holds signs: its value would not be
    the initial ``what`` (its layer is managed by another optimizer, or was filled from a
    state_dict)."""
    if p.numel() and torch.isin(p, p.new_tensor([-1.0, 0.0, 1.0])).all():
        raise ValueError(
            f"a binary weight of shape {tuple(p.shape)} already holds signs, so it cannot be the initial {what}: "
            f"its layer is managed by another optimizer, or was filled from a state_dict. Build the optimizer on "
            f"a freshly constructed network, then load a saved state with opt.load_state_dict")


def _global_seed():
    """A seed drawn from torch's global generator, so that ``torch.manual_seed`` decides it."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _split(items, groups):
    """``items`` cut into one list per group, as long as the group's binary weights."""
    parts, start = [], 0
    for _, params in groups:
        parts.append(items[start:start + len(params)])
        start += len(params)
    return parts


# The state of every method that is the distribution itself (what model_best keeps).
DISTRIBUTION_KEYS = frozenset({"M", "Z", "lamda", "mu", "prior_lamda", "latent"})


def without_memory(state_dict: dict) -> dict:
    """An optimizer's ``state_dict`` with only the distribution of each binary weight (its
    momenta, Adam moments and step counts left out, and the real parameters' momenta):
    what model_best.pth.tar holds, for any method."""
    state = {index: {k: v for k, v in entry.items() if k in DISTRIBUTION_KEYS}
             for index, entry in state_dict["state"].items()}
    return dict(state_dict, state=state)


def has_memory(state_dict: dict) -> bool:
    """Whether an optimizer's ``state_dict`` holds more than the distribution."""
    return any(k not in DISTRIBUTION_KEYS for entry in state_dict["state"].values() for k in entry)
