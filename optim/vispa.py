"""VISPA: binary weights trained by Gaussian variational inference with a low-rank
(Burer-Monteiro) covariance factor.

For every binary weight tensor of shape ``s`` the optimizer keeps

    M  (shape s)          the mean,
    Z  (shape (K,) + s)   the rank-K factor: entries i and j covary by Z[:, i] . Z[:, j],

and the network runs on samples ``b = sign(M + sum_k r_k Z_k)`` with ONE vector
``r ~ N(0, I_K / S)`` per tensor per forward pass (hyperplane rounding: the
shared ``r`` is what turns the factor into correlations between entries).

With ``g = dLoss/db`` (straight-through: sign passed as the identity) the
gradients are ``grad M = g`` and ``grad Z_k = sqrt(S) r_k g``; ``M``, ``Z`` and
every full-precision parameter of the network are then updated by
torch.optim.SGD's own update (momentum, no dampening, weight decay added to the
gradient). This is what the authors' released code computes.

The training loop::

    opt = VISPA(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, K=8, S=100)
    for x, y in loader:
        opt.zero_grad()
        with opt.sampled_params(train=True):   # writes a sign sample into the binary layers
            loss_fn(model(x), y).backward()     # one forward pass per sample
        opt.step()                              # updates M, Z and the real parameters

Evaluation runs the network inside ``sampled_params()`` (one fresh sample per
pass) or ``mean_params()`` (the deterministic network ``sign(M)``). Outside
these contexts the binary layers keep whatever was written last.

The optimizer state of a binary weight ``p`` (``opt.state[p]``):

    "M", "Z"                        the distribution,
    "M_momentum", "Z_momentum"      SGD momentum buffers (after the first step),
    "r"                             the draw (shape (K,), scale 1/sqrt(S)) of the last
                                    training sample: the one step() uses.

Full-precision parameters have "momentum_buffer", as in torch.optim.SGD.

On CUDA the update is torch's fused SGD kernel: per element it reads parameter,
gradient and momentum once and writes parameter and momentum once (3 reads, 2
writes), where torch's default multi-tensor path makes four passes (weight decay
into a new tensor, momentum scale, momentum add, parameter update: 7 reads, 4
writes). The state of a binary layer is (K + 1) times its weights, so this
memory traffic is most of the optimizer's share of a training step.
"""
import math
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

    ``K``, ``S`` and ``projection`` may differ between parameter groups. The
    initial mean M is the binary layer's initial (real) weight; Z is
    Xavier-normal on its own shape ``(K,) + s``. From construction on, the binary
    layers hold ``sign(M)``.
    """

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, K=8, S=100.0, projection=None,
                 fused=None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        K=K, S=S, projection=projection)
        self._training_sample_drawn = False
        self.fused = fused
        super().__init__(params, defaults)
        if not any(_is_binary(p) for group in self.param_groups for p in group["params"]):
            raise ValueError("VISPA found no binary weights among the parameters: binary "
                             "layers must mark their sign weight with `param.binary = True`")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_hyperparameters(group)
        for p in group["params"]:
            if _is_binary(p):
                self._init_distribution(p, group["K"])

    @torch.no_grad()
    def _init_distribution(self, p, K):
        M = p.detach().clone(memory_format=torch.contiguous_format)
        Z = torch.zeros((K,) + tuple(p.shape), dtype=p.dtype, device=p.device)
        if K > 0:
            torch.nn.init.xavier_normal_(Z)
        self.state[p].update(M=M, Z=Z, r=torch.zeros(K, dtype=p.dtype, device=p.device))
        p.copy_(torch.sign(M))

    def _binary_groups(self):
        """(group, its binary weights) for every group that has some."""
        for group in self.param_groups:
            params = [p for p in group["params"] if _is_binary(p)]
            if params:
                yield group, params

    # ---- sampling -------------------------------------------------------------------

    @torch.no_grad()
    def _write_samples(self, mean: bool, record: bool):
        """Write ``sign(M + r.Z)`` into every binary weight, one fresh ``r`` per tensor
        (drawn for a whole group in one call), or ``sign(M)`` when ``mean``."""
        for group, params in self._binary_groups():
            K, S = group["K"], group["S"]
            if mean or K == 0:
                for p in params:
                    p.copy_(torch.sign(self.state[p]["M"]))
                continue
            first = params[0]
            draws = torch.randn(len(params), K, dtype=first.dtype, device=first.device)
            draws.mul_(1.0 / math.sqrt(S))
            for p, r in zip(params, draws):
                state = self.state[p]
                M, Z = state["M"], state["Z"]
                latent = torch.addmv(M.view(-1), Z.view(K, -1).t(), r.to(M.device))
                # straight into the layer's weight, in its own memory format (channels_last on CUDA)
                torch.sign(latent.view(p.shape), out=p)
                if record:
                    state["r"] = r

    @contextmanager
    def sampled_params(self, train: bool = False):
        """Run the enclosed forward pass on one sample of the binary weights.

        With ``train=True`` the draw is recorded for the next ``step()``; draws
        made with ``train=False`` (evaluation) leave the recorded draw alone, so
        evaluating between ``backward()`` and ``step()`` does not corrupt the update.
        """
        self._write_samples(mean=False, record=train)
        if train:
            self._training_sample_drawn = True
        yield

    @contextmanager
    def mean_params(self):
        """Run the enclosed forward pass on the deterministic network ``b = sign(M)``."""
        self._write_samples(mean=True, record=False)
        yield

    # ---- update ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step on M, Z and the real parameters from the gradients of the last
        training sample. ``closure``, if given, must compute the loss and call
        ``backward()``; it is run inside ``sampled_params(train=True)``."""
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.sampled_params(train=True):
                loss = closure()
        if not self._training_sample_drawn:
            raise RuntimeError("VISPA.step() needs the gradients of a training sample: run the "
                               "forward and backward pass inside `opt.sampled_params(train=True)`")
        for group in self.param_groups:
            params, grads, buffers, owners = self._update_lists(group)
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
                    if _is_binary(p) and p.grad is not None:
                        project_to_sphere(self.state[p]["M"], self.state[p]["Z"], group["S"])
        self._training_sample_drawn = False
        return loss

    def _update_lists(self, group):
        """The tensors SGD updates for ``group``, with their gradients, momentum
        buffers, and where each buffer is kept."""
        params, grads, buffers, owners = [], [], [], []

        def add(tensor, grad, state, key):
            params.append(tensor)
            grads.append(grad)
            buffers.append(state.get(key))
            owners.append((state, key))

        K, S = group["K"], group["S"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not _is_binary(p):
                add(p, p.grad, state, "momentum_buffer")
                continue
            g = p.grad.contiguous()  # M's layout; a copy only for channels_last weights (n floats)
            add(state["M"], g, state, "M_momentum")
            if K > 0:
                r = state["r"].view((K,) + (1,) * g.dim())
                add(state["Z"], (math.sqrt(S) * r) * g, state, "Z_momentum")
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


    def load_state_dict(self, state_dict):
        """Restore the distribution (and momenta) and write ``sign(M)`` into the layers.

        Raises ValueError naming the tensors whose shapes do not match this
        optimizer's (another network, another K)."""
        mismatched = self._shape_mismatches(state_dict)
        if mismatched:
            shown = "; ".join(mismatched[:3])
            shown += f"; ... ({len(mismatched)} in all)" if len(mismatched) > 3 else ""
            raise ValueError("optimizer state does not match this network: " + shown)
        super().load_state_dict(state_dict)
        self._training_sample_drawn = False
        self._write_samples(mean=True, record=False)

    def _shape_mismatches(self, state_dict):
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) != len(self.param_groups):
            return [f"{len(saved_groups)} parameter groups saved, {len(self.param_groups)} here"]
        problems = []
        for saved, group in zip(saved_groups, self.param_groups):
            if len(saved["params"]) != len(group["params"]):
                problems.append(f"{len(saved['params'])} parameters saved, {len(group['params'])} here")
                continue
            for index, p in zip(saved["params"], group["params"]):
                saved_state = state_dict["state"].get(index, {})
                for key in ("M", "Z"):
                    here = self.state[p].get(key) if _is_binary(p) else None
                    there = saved_state.get(key)
                    if (here is None) != (there is None):
                        problems.append(f"parameter {index}: {key} {'missing' if there is None else 'unexpected'}")
                    elif here is not None and here.shape != there.shape:
                        problems.append(f"parameter {index}: {key} has shape {tuple(there.shape)} "
                                        f"saved, {tuple(here.shape)} here")
        return problems


@torch.no_grad()
def project_to_sphere(M, Z, S):
    """Rescale entry i of (M, Z) so that ``M_i^2 + ||Z[:, i]||^2 / S = 1`` (the paper's
    constraint; ``sign`` ignores the positive scale, the next update does not)."""
    norm = (M.square() + Z.square().sum(0) / S).sqrt_().clamp_(min=torch.finfo(M.dtype).tiny)
    M.div_(norm)
    Z.div_(norm)


def _check_hyperparameters(group):
    if not group["lr"] >= 0:
        raise ValueError(f"lr must be >= 0, got {group['lr']}")
    if not group["momentum"] >= 0:
        raise ValueError(f"momentum must be >= 0, got {group['momentum']}")
    if not group["weight_decay"] >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {group['weight_decay']}")
    if not (isinstance(group["K"], int) and group["K"] >= 0):
        raise ValueError(f"K must be an integer >= 0, got {group['K']}")
    if not group["S"] > 0:
        raise ValueError(f"S must be > 0, got {group['S']}")
    if group["projection"] not in (None, "sphere"):
        raise ValueError(f"projection must be None or 'sphere', got {group['projection']!r}")
