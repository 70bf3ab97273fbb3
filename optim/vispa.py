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
the uninterrupted one would have drawn. The protocol (the contexts, the collection
of per-sample gradients, the generator, the checkpoints) is shared with the other
methods of the library: ``optim/binary_optimizer.py``.

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

import torch

from .binary_optimizer import BinaryWeightOptimizer, check_number, is_binary, refuse_signs


class VISPA(BinaryWeightOptimizer):
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
    KEYS = ("M", "Z")
    DISTRIBUTION = ("M", "Z")

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, K=8, S=100.0, projection=None,
                 fused=None, seed=None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, K=K, S=S, projection=projection)
        super().__init__(params, defaults, fused=fused, seed=seed)

    def _check(self, group):
        super()._check(group)
        K = group["K"]
        if isinstance(K, numbers.Integral) and not isinstance(K, bool):
            K = group["K"] = int(K)  # numpy's integers too
        if not (type(K) is int and K >= 0):
            raise ValueError(f"K must be a whole number >= 0, got {K!r}")
        check_number("S", group["S"], low=0, low_open=True)
        if group["projection"] not in (None, "sphere"):
            raise ValueError(f"projection must be None or 'sphere', got {group['projection']!r}")
        kinds = {(p.dtype, p.device) for p in group["params"] if is_binary(p)}
        if len(kinds) > 1:  # a group's draws are taken in one call, of one dtype on one device
            raise ValueError(f"the binary weights of one parameter group are of several dtypes or devices "
                             f"({', '.join(sorted(f'{d} on {v}' for d, v in kinds))}): convert the network to one "
                             f"(model.to(dtype), model.to(device)) before building VISPA, or give each its own "
                             f"parameter group")

    @torch.no_grad()
    def _init_state(self, p, group):
        K = group["K"]
        if p.numel() and not p.any():
            raise ValueError(
                f"a binary weight of shape {tuple(p.shape)} is all zeros: its value is the initial mean M, "
                f"whose sign is the network, and sign(0) is 0. Initialise it (the binary layers start "
                f"Xavier-normal) before building the optimizer")
        refuse_signs(p, "mean M")
        M = p.detach().clone(memory_format=torch.contiguous_format)
        Z = torch.zeros((K,) + tuple(p.shape), dtype=p.dtype, device=p.device)
        if K > 0:
            torch.nn.init.xavier_normal_(Z)
        self.state[p].update(M=M, Z=Z)

    def _state_shapes(self, p, group):
        s, K = tuple(p.shape), group["K"]
        return {"M": s, "Z": (K,) + s, "M_momentum": s, "Z_momentum": (K,) + s,
                "r": (K,)}  # "r": the draw a state of before the optimizer's own generator kept

    def _complete_state(self, p, group):
        self.state[p].pop("r", None)

    # ---- sampling -------------------------------------------------------------------

    def _checked_draw(self, group, p, r, train):
        K = group["K"]
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != (K,):
            shape = tuple(r.shape) if isinstance(r, torch.Tensor) else type(r).__name__
            raise ValueError(f"a draw for a binary weight of rank K={K} must be a tensor of shape ({K},), got {shape}")
        return r.to(p.device, p.dtype)

    def _write_group(self, group, params, draws, generator, train):
        """Write ``sign(M + r.Z)`` into every binary weight of the group, one ``r`` per
        tensor: drawn for the whole group in one call (from ``generator``), or given.
        Returns the draws (shape (K,), already scaled by ``1/sqrt(S)``; empty for K = 0)."""
        K, S = group["K"], group["S"]
        if draws is None:
            first = params[0]
            fresh = torch.randn(len(params), K, dtype=first.dtype, device=first.device, generator=generator)
            draws = list(fresh.mul_(1.0 / math.sqrt(S)))
        for p, r in zip(params, draws):
            M, Z = self.state[p]["M"], self.state[p]["Z"]
            if K == 0:
                torch.sign(M, out=p)
            else:
                latent = torch.addmv(M.view(-1), Z.view(K, -1).t(), r)
                # straight into the layer's weight, in its own memory format (channels_last on CUDA)
                torch.sign(latent.view(p.shape), out=p)
        return draws

    def _write_mean(self, p):
        """``sign(M)``: what the layers hold outside the contexts."""
        torch.sign(self.state[p]["M"], out=p)

    def _sample_gradients(self, group, p, r, g):
        """``g`` for M and ``sqrt(S) r g`` for Z, with the sample's own draw ``r``."""
        K, S = group["K"], group["S"]
        grads = {"M": g}
        if K > 0:
            grads["Z"] = (math.sqrt(S) * r.view((K,) + (1,) * g.dim())) * g
        return grads

    # ---- update ---------------------------------------------------------------------

    def _update_binary(self, group, params):
        """SGD on M and Z (their own momenta), then, with ``projection="sphere"``, the
        paper's constraint."""
        entries = []
        for p in params:
            state = self.state[p]
            for key in ("M", "Z"):
                if state[key].grad is not None:
                    entries.append((state[key], state[key].grad, state, f"{key}_momentum"))
        self._sgd(group, entries)
        if group["projection"] == "sphere":
            for p in params:
                project_to_sphere(self.state[p]["M"], self.state[p]["Z"], group["S"])

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


@torch.no_grad()
def project_to_sphere(M, Z, S):
    """Rescale entry i of (M, Z) so that ``M_i^2 + ||Z[:, i]||^2 / S = 1`` (the paper's
    constraint; ``sign`` ignores the positive scale, the next update does not)."""
    norm = (M.square() + Z.square().sum(0) / S).sqrt_().clamp_(min=torch.finfo(M.dtype).tiny)
    M.div_(norm)
    Z.div_(norm)
