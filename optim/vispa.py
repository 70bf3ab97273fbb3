"""VISPA: binary weights trained by Gaussian variational inference with a low-rank
(Burer-Monteiro) covariance factor.

For every binary weight tensor of shape ``s`` the optimizer keeps

    M  (shape s)          the mean,
    Z  (shape (K,) + s)   the rank-K factor: entries i and j covary by Z[:, i] . Z[:, j],

and the network runs on samples ``b = sign(M + sum_k r_k Z_k)`` with ONE vector
``r ~ N(0, I_K / S)`` per tensor per forward pass (hyperplane rounding: the
shared ``r`` is what turns the factor into correlations between entries).

With ``g = dLoss/db`` (straight-through: sign passed as the identity) the
gradients of one sample are ``grad M = g`` and ``grad Z_k = sqrt(S) r_k g``;
``M``, ``Z`` and every full-precision parameter of the network are then updated
by torch.optim.SGD's own update (momentum, no dampening, weight decay added to
the gradient). This is what the authors' released code computes.

The training loop::

    opt = VISPA(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, K=8, S=100)
    for x, y in loader:
        opt.zero_grad()
        with opt.sampled_params(train=True):   # writes a sign sample into the binary layers
            loss_fn(model(x), y).backward()     # one forward pass per sample
        opt.step()                              # updates M, Z and the real parameters

Leaving ``sampled_params(train=True)`` turns that sample's weight gradient ``g``
into its M and Z gradients (``M.grad``, ``Z.grad`` of the state tensors), with
the sample's own ``r``. Several training samples before one ``step()`` (Monte
Carlo samples, gradient accumulation, the ranks of a multi-GPU step) are
collected one by one, and ``step()`` applies the average of the per-sample
gradients - of M, Z and the real parameters alike. With one sample per step this
is exactly the released code's update.

Evaluation runs the network inside ``sampled_params()`` (one fresh sample per
pass) or ``mean_params()`` (the deterministic network ``sign(M)``). Outside
these contexts the binary layers hold ``sign(M)``: ``model(x)`` and
``model.state_dict()`` are the mean network.

The draws come from the optimizer's own ``torch.Generator`` (on the weights'
device), seeded by ``seed`` and saved in ``state_dict()``: they do not depend on
what else draws random numbers (the data pipeline), and a resumed run draws what
the uninterrupted one would have drawn.

The optimizer state of a binary weight ``p`` (``opt.state[p]``):

    "M", "Z"                        the distribution,
    "M_momentum", "Z_momentum"      SGD momentum buffers (after the first step).

Full-precision parameters have "momentum_buffer", as in torch.optim.SGD.

On CUDA the update is torch's fused SGD kernel: per element it reads parameter,
gradient and momentum once and writes parameter and momentum once (3 reads, 2
writes), where torch's default multi-tensor path makes four passes (weight decay
into a new tensor, momentum scale, momentum add, parameter update: 7 reads, 4
writes). The state of a binary layer is (K + 1) times its weights, so this
memory traffic is most of the optimizer's share of a training step.
"""
import math
import numbers
from contextlib import contextmanager

import torch
from torch.optim.sgd import sgd as sgd_update


def _is_binary(param):
    """Binary layers mark their sign weights with ``param.binary = True``."""
    return getattr(param, "binary", False)


class VISPA(torch.optim.Optimizer):
    """Args:
        params: the network's parameters (or parameter groups). Binary weights are
            recognised by their ``binary`` mark; every other parameter is trained
            by plain SGD with the same hyper-parameters.
        lr, momentum, weight_decay: as torch.optim.SGD (no dampening, no Nesterov).
        K: rank of the covariance factor. ``K = 0`` trains plain latent weights
            through sign and straight-through (the "without Z" ablation).
        S: scale; the draw is ``r ~ N(0, I_K / S)``.
        projection: ``None`` (the released code) or ``"sphere"``: after every
            update rescale each entry so that ``M_i^2 + ||Z[:, i]||^2 / S = 1``,
            the paper's constraint. The released code does not apply it.
        fused: the implementation of the SGD update (same formula, rounding may
            differ in the last bit): ``None`` = torch's fused kernel where every
            tensor is on CUDA, torch's default elsewhere; ``True`` = the fused
            kernel on any device; ``False`` = torch's default (multi-tensor
            "foreach" on CUDA).
        seed: seed of the optimizer's generator of draws (default: one drawn from
            torch's global generator, so ``torch.manual_seed`` decides it).

    ``K``, ``S`` and ``projection`` may differ between parameter groups. The
    initial mean M is the binary layer's initial (real) weight; Z is
    Xavier-normal on its own shape ``(K,) + s``. From construction on, the binary
    layers hold ``sign(M)``; a layer that already holds signs (built into another
    VISPA, or filled from a state_dict) is refused.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, K=8, S=100.0, projection=None,
                 fused=None, seed=None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        K=K, S=S, projection=projection)
        self.fused = fused
        self._samples = 0  # training samples whose gradients were collected since the last step
        self._sampling = False  # inside sampled_params()
        super().__init__(params, defaults)
        binary = [p for group in self.param_groups for p in group["params"] if _is_binary(p)]
        if not binary:
            raise ValueError("VISPA found no binary weights among the parameters: binary "
                             "layers must mark their sign weight with `param.binary = True`")
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.generator = torch.Generator(device=binary[0].device).manual_seed(seed)

    def add_param_group(self, param_group):
        params = param_group["params"] if isinstance(param_group, dict) else param_group
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        if len({id(p) for p in params}) != len(params):
            raise ValueError("a parameter is listed twice: give each of the network's parameters once "
                             "(model.parameters() does)")
        super().add_param_group(dict(param_group, params=params) if isinstance(param_group, dict) else params)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        for p in group["params"]:
            if _is_binary(p):
                self._init_distribution(p, group["K"])

    @torch.no_grad()
    def _init_distribution(self, p, K):
        if p.numel() and not p.any():
            raise ValueError(
                f"a binary weight of shape {tuple(p.shape)} is all zeros: its value is the initial mean M, "
                f"whose sign is the network, and sign(0) is 0. Initialise it (the binary layers start "
                f"Xavier-normal) before building the optimizer")
        if p.numel() and torch.isin(p, p.new_tensor([-1.0, 0.0, 1.0])).all():
            raise ValueError(
                f"a binary weight of shape {tuple(p.shape)} already holds signs, so it cannot be "
                f"the initial mean M: its layer is managed by another VISPA, or was filled from a "
                f"state_dict. Build the optimizer on a freshly constructed network, then load a "
                f"saved distribution with opt.load_state_dict")
        M = p.detach().clone(memory_format=torch.contiguous_format)
        Z = torch.zeros((K,) + tuple(p.shape), dtype=p.dtype, device=p.device)
        if K > 0:
            torch.nn.init.xavier_normal_(Z)
        self.state[p].update(M=M, Z=Z)
        p.copy_(torch.sign(M))

    def _binary_groups(self):
        """(group, its binary weights) for every group that has some."""
        for group in self.param_groups:
            params = [p for p in group["params"] if _is_binary(p)]
            if params:
                yield group, params

    def binary_params(self):
        """The binary weights, in the order of the parameter groups: the order of the
        draws that ``sampled_params`` takes and yields."""
        return [p for _, params in self._binary_groups() for p in params]

    # ---- sampling -------------------------------------------------------------------

    @torch.no_grad()
    def _write_samples(self, draws=None, generator=None):
        """Write ``sign(M + r.Z)`` into every binary weight, one fresh ``r`` per tensor
        (drawn for a whole group in one call, from ``generator`` or the optimizer's own)
        or the given ones. Returns the draws, one per binary weight (shape (K,), empty
        for K = 0)."""
        given = None
        if draws is not None:
            draws = list(draws)
            if len(draws) != len(self.binary_params()):
                raise ValueError(f"{len(draws)} draws given for {len(self.binary_params())} binary weights")
            ranks = [group["K"] for group, params in self._binary_groups() for _ in params]
            given = iter([_given_draw(r, K, p) for r, K, p in zip(draws, ranks, self.binary_params())])
        used = []
        for group, params in self._binary_groups():
            K, S = group["K"], group["S"]
            first = params[0]
            _check_layout(params, self.state)
            if given is None:
                fresh = torch.randn(len(params), K, dtype=first.dtype, device=first.device,
                                    generator=self.generator if generator is None else generator)
                fresh.mul_(1.0 / math.sqrt(S))
            for i, p in enumerate(params):
                r = fresh[i] if given is None else next(given)
                state = self.state[p]
                M, Z = state["M"], state["Z"]
                if K == 0:
                    torch.sign(M, out=p)
                else:
                    latent = torch.addmv(M.view(-1), Z.view(K, -1).t(), r)
                    # straight into the layer's weight, in its own memory format (channels_last on CUDA)
                    torch.sign(latent.view(p.shape), out=p)
                used.append(r)
        return used

    @torch.no_grad()
    def _write_means(self):
        """Write ``sign(M)`` into every binary weight: what the layers hold outside the
        contexts."""
        for p in self.binary_params():
            torch.sign(self.state[p]["M"], out=p)

    @contextmanager
    def sampled_params(self, train: bool = False, draws=None, generator=None):
        """Run the enclosed forward pass on one sample of the binary weights.

        Yields the draws ``r`` (one per binary weight, in ``binary_params()`` order,
        already scaled by ``1/sqrt(S)``). ``draws`` replays given ones instead of
        drawing fresh ones; ``generator`` draws from another generator than the
        optimizer's own (the virtual ranks of a multi-GPU step, each with its
        own). With ``train=True``, leaving the context turns the gradient that the
        enclosed ``backward()`` left on each binary weight into the M and Z
        gradients of this sample and adds them to those of the samples before it (the weight's own ``.grad`` is then cleared). On leaving,
        the layers hold ``sign(M)`` again.
        """
        if self._sampling:
            raise RuntimeError("sampled_params() is already open: a forward pass runs on one sample; close "
                               "the first context before opening another (they do not nest)")
        used = self._write_samples(draws, generator)
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
        """Run the enclosed forward pass on the deterministic network ``b = sign(M)``."""
        if self._sampling:
            raise RuntimeError("mean_params() inside sampled_params(): the enclosing forward pass would run on "
                               "sign(M) instead of its sample; close sampled_params() first")
        self._write_means()
        yield

    @torch.no_grad()
    def _collect_gradients(self, draws, keep=True):
        """Add ``g`` to ``M.grad`` and ``sqrt(S) r g`` to ``Z.grad`` for the sample drawn
        with ``draws``; ``keep=False`` (the enclosed code raised) drops the sample."""
        draws = iter(draws)
        collected = False
        for group, params in self._binary_groups():
            K, S = group["K"], group["S"]
            for p in params:
                r = next(draws)
                g, p.grad = p.grad, None
                if g is None or not keep:
                    continue
                collected = True
                M, Z = self.state[p]["M"], self.state[p]["Z"]
                g = g.contiguous()  # M's layout; a copy only for channels_last weights (n floats)
                M.grad = g if M.grad is None else M.grad.add_(g)
                if K > 0:
                    grad_Z = (math.sqrt(S) * r.view((K,) + (1,) * g.dim())) * g
                    Z.grad = grad_Z if Z.grad is None else Z.grad.add_(grad_Z)
        self._samples += collected

    def zero_grad(self, set_to_none: bool = True):
        """Clear the real parameters' gradients and the collected M and Z gradients."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear_collected()

    def _clear_collected(self):
        for p in self.binary_params():
            self.state[p]["M"].grad = None
            self.state[p]["Z"].grad = None
        self._samples = 0

    def collected_gradients(self):
        """Every gradient the next ``step()`` uses (M, Z and real parameters), as
        tensors that may be changed in place - e.g. averaged across processes."""
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                if _is_binary(p):
                    grads += [t.grad for t in (self.state[p]["M"], self.state[p]["Z"]) if t.grad is not None]
                elif p.grad is not None:
                    grads.append(p.grad)
        return grads

    # ---- update ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step on M, Z and the real parameters with the average of the
        gradients of the training samples collected since the last step. ``closure``,
        if given, must compute the loss and call ``backward()``; it is run inside
        ``sampled_params(train=True)``."""
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.sampled_params(train=True):
                loss = closure()
        if self._samples == 0:
            raise RuntimeError("VISPA.step() needs the gradients of a training sample: run the "
                               "forward and backward pass inside `opt.sampled_params(train=True)`")
        for group in self.param_groups:
            params, grads, buffers, owners = self._update_lists(group, self._samples)
            if not params:
                continue
            fused = self.fused if self.fused is not None else all(t.is_cuda for t in params)
            # The fused kernel starts the momentum of all its tensors or of none: tensors
            # without a buffer yet (first step) and the others are updated in two calls.
            for batch in ([i for i, b in enumerate(buffers) if b is None],
                          [i for i, b in enumerate(buffers) if b is not None]):
                if not batch:
                    continue
                batch_buffers = [buffers[i] for i in batch]
                sgd_update([params[i] for i in batch], [grads[i] for i in batch], batch_buffers,
                           fused=fused or None, weight_decay=group["weight_decay"],
                           momentum=group["momentum"], lr=group["lr"], dampening=0.0,
                           nesterov=False, maximize=False)
                for i, buf in zip(batch, batch_buffers):
                    if buf is not None:
                        state, key = owners[i]
                        state[key] = buf
            if group["projection"] == "sphere":
                for p in group["params"]:
                    if _is_binary(p) and self.state[p]["M"].grad is not None:
                        project_to_sphere(self.state[p]["M"], self.state[p]["Z"], group["S"])
        self._clear_collected()
        self._write_means()
        return loss

    def _update_lists(self, group, samples):
        """The tensors SGD updates for ``group``, with their gradients (averaged over
        ``samples``), momentum buffers, and where each buffer is kept."""
        params, grads, buffers, owners = [], [], [], []

        def add(tensor, grad, state, key):
            params.append(tensor)
            grads.append(grad if samples == 1 else grad / samples)
            buffers.append(state.get(key))
            owners.append((state, key))

        for p in group["params"]:
            state = self.state[p]
            if not _is_binary(p):
                if p.grad is not None:
                    add(p, p.grad, state, "momentum_buffer")
                continue
            M, Z = state["M"], state["Z"]
            if M.grad is not None:
                add(M, M.grad, state, "M_momentum")
            if Z.grad is not None:
                add(Z, Z.grad, state, "Z_momentum")
        return params, grads, buffers, owners

    # ---- checkpoints ----------------------------------------------------------------

    @torch.no_grad()
    def set_distribution(self, param, M, Z):
        """Replace the distribution of the binary weight ``param`` (e.g. from a file
        in another layout) and write ``sign(M)`` into it."""
        state = self.state[param]
        for key, value in (("M", M), ("Z", Z)):
            if tuple(value.shape) != tuple(state[key].shape):
                raise ValueError(f"{key} has shape {tuple(value.shape)}, expected {tuple(state[key].shape)}")
            state[key].copy_(value)
        param.copy_(torch.sign(state["M"]))

    def state_dict(self):
        """torch's optimizer state, plus the generator of draws (``"generator"``: the
        kind of device it draws on and its state)."""
        state = super().state_dict()
        state["generator"] = {"device": self.generator.device.type, "state": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict):
        """Restore the distribution, the momenta and the generator of draws, and write
        ``sign(M)`` into the layers. A generator saved on another kind of device
        (a CUDA run evaluated on the CPU) cannot be restored; this optimizer's own
        then goes on drawing.

        Raises ValueError naming the tensors whose shapes do not match this
        optimizer's (another network, another K)."""
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        mismatched = self._shape_mismatches(state_dict)
        if mismatched:
            shown = "; ".join(mismatched[:3])
            shown += f"; ... ({len(mismatched)} in all)" if len(mismatched) > 3 else ""
            raise ValueError("optimizer state does not match this network: " + shown)
        super().load_state_dict(state_dict)
        for p in self.binary_params():  # what a state of before the draws had their own generator
            self.state[p].pop("r", None)
        if generator is not None and generator["device"] == self.generator.device.type:
            self.generator.set_state(generator["state"].cpu())
        self._clear_collected()
        self._write_means()

    def _shape_mismatches(self, state_dict):
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
                _check_hyperparameters(dict(group, **{k: v for k, v in saved.items() if k in self.defaults}))
            except ValueError as error:
                problems.append(f"a parameter group's {error}")
            if len(saved["params"]) != len(group["params"]):
                problems.append(f"{len(saved['params'])} parameters saved, {len(group['params'])} here")
                continue
            for index, p in zip(saved["params"], group["params"]):
                entry = saved_state.get(index, {})
                if not isinstance(entry, dict):
                    problems.append(f"parameter {index}: its state is not a dict")
                    continue
                for key, there in entry.items():
                    if key not in ("step",) and not isinstance(there, torch.Tensor):
                        problems.append(f"parameter {index}: {key} is a {type(there).__name__}, not a tensor")
                for key in ("M", "Z", "M_momentum", "Z_momentum", "momentum_buffer"):
                    here = p if key == "momentum_buffer" else \
                        self.state[p].get(key[0]) if key.endswith("momentum") and _is_binary(p) else \
                        self.state[p].get(key) if _is_binary(p) else None
                    there = entry.get(key)
                    if key in ("M", "Z") and (here is None) != (there is None):
                        problems.append(f"parameter {index}: {key} {'missing' if there is None else 'unexpected'}")
                    elif here is not None and isinstance(there, torch.Tensor) and here.shape != there.shape:
                        problems.append(f"parameter {index}: {key} has shape {tuple(there.shape)} "
                                        f"saved, {tuple(here.shape)} here")
        return problems


def _check_layout(params, state):
    """ValueError, with what to do, when a binary weight no longer has its distribution's
    dtype or device (``model.double()`` or ``model.to(...)`` after the optimizer was built)."""
    for p in params:
        M = state[p]["M"]
        if p.dtype != M.dtype or p.device != M.device:
            raise ValueError(f"a binary weight is {p.dtype} on {p.device}, and its distribution {M.dtype} on "
                             f"{M.device}: the network was converted after VISPA was built. Convert the network "
                             f"first (model.double(), model.to(device)), then build the optimizer (or move a "
                             f"saved state with load_state_dict)")


def _given_draw(r, K, p):
    if not isinstance(r, torch.Tensor) or tuple(r.shape) != (K,):
        shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
        raise ValueError(f"a draw for a binary weight of rank K={K} must be a tensor of shape ({K},), got {shape}")
    return r.to(p.device, p.dtype)


@torch.no_grad()
def project_to_sphere(M, Z, S):
    """Rescale entry i of (M, Z) so that ``M_i^2 + ||Z[:, i]||^2 / S = 1`` (the paper's
    constraint; ``sign`` ignores the positive scale, the next update does not)."""
    norm = (M.square() + Z.square().sum(0) / S).sqrt_().clamp_(min=torch.finfo(M.dtype).tiny)
    M.div_(norm)
    Z.div_(norm)


def _check_hyperparameters(group):
    def finite_at_least(name, low):
        value = group[name]
        if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                and value >= low):
            raise ValueError(f"{name} must be a finite number >= {low}, got {value!r}")

    finite_at_least("lr", 0)
    finite_at_least("momentum", 0)
    finite_at_least("weight_decay", 0)
    K = group["K"]
    if isinstance(K, numbers.Integral) and not isinstance(K, bool):
        K = group["K"] = int(K)  # numpy's integers too
    if not (type(K) is int and K >= 0):
        raise ValueError(f"K must be a whole number >= 0, got {K!r}")
    S = group["S"]
    if not (isinstance(S, numbers.Real) and not isinstance(S, bool) and math.isfinite(S) and S > 0):
        raise ValueError(f"S must be a finite number > 0, got {S!r}")
    if group["projection"] not in (None, "sphere"):
        raise ValueError(f"projection must be None or 'sphere', got {group['projection']!r}")
