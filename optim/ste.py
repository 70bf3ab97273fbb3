"""The latent-weight straight-through estimator with Adam and clipping: the baseline
that the BayesBiNN authors' code runs as ``--optim STE``, behind the protocol of
VISPA's optimizer.

For every binary weight the optimizer keeps a real latent weight. The network runs on
its sign (+1 where latent >= 0, -1 elsewhere, as their binarize function), the gradient
``g = dLoss/db`` of the binary weight is passed straight through to the latent weight,
and after each Adam step the latent weights are clipped to [-1, 1]:

    latent <- clip(Adam(latent, mean over the samples of g), -1, 1).

The Adam is theirs: ``torch.optim.Adam(model.parameters(), lr=args.lr)``, so torch's
defaults, betas (0.9, 0.999), eps 1e-8, no weight decay, no AMSGrad; here it is torch's
own Adam update. The latent weight starts as the layer's initial real weight,
unclipped, as theirs (their layers copy it on the first forward pass; the clip comes
after each step).

This is not VISPA with K = 0: that one trains an unclipped mean by SGD with momentum.
The network is deterministic: ``sampled_params(train=True)``, ``sampled_params()`` and
``mean_params()`` all write sign(latent), and the draws are empty tensors (one per
binary weight, so that the protocol's lengths hold). Real parameters are trained by
SGD exactly as VISPA trains them (their Adam trains the few real parameters a network
may have; here only the binary weights' method differs between the optimizers).

The optimizer state of a binary weight ``p`` (``opt.state[p]``): "latent", and Adam's
"exp_avg", "exp_avg_sq" and "step" (a tensor, as torch.optim.Adam keeps it). Real
parameters have "momentum_buffer", as in torch.optim.SGD.
"""
import torch
from torch.optim.adam import adam as adam_update

from .binary_optimizer import BinaryWeightOptimizer, check_number, refuse_signs


class STE(BinaryWeightOptimizer):
    """Args (defaults: the BayesBiNN authors' CIFAR scripts with ``--optim STE``):
        params: the network's parameters (or parameter groups); binary weights by their
            ``binary`` mark.
        lr: 3e-4 (``--lr``), Adam's step on the latent weights; the real parameters
            take it too.
        betas, eps: torch.optim.Adam's defaults (0.9, 0.999) and 1e-8, which their
            script leaves as they are (and no weight decay on the latent weights).
        momentum, weight_decay, fused: the real parameters' SGD, as VISPA's (its
            defaults: momentum 0.9, no weight decay).
        seed: seed of ``opt.generator``. This method draws nothing; the generator is
            kept, and saved, for the protocol's sake.

    A layer that already holds signs (built into another optimizer, or filled from a
    state_dict) is refused: its weight would not be the initial latent weight.
    """
    KEYS = ("latent",)
    DISTRIBUTION = ("latent",)

    def __init__(self, params, lr=3e-4, betas=(0.9, 0.999), eps=1e-8, momentum=0.9, weight_decay=0.0,
                 fused=None, seed=None):
        defaults = dict(lr=lr, betas=betas, eps=eps, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, fused=fused, seed=seed)

    def _check(self, group):
        super()._check(group)
        betas = group.get("betas")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        check_number("betas[0]", betas[0], low=0, high=1, high_open=True)
        check_number("betas[1]", betas[1], low=0, high=1, high_open=True)
        check_number("eps", group.get("eps"), low=0)

    def _init_state(self, p, group):
        refuse_signs(p, "latent weight")
        latent = p.detach().clone(memory_format=torch.contiguous_format)
        self.state[p].update(latent=latent, exp_avg=torch.zeros_like(latent),
                             exp_avg_sq=torch.zeros_like(latent), step=torch.tensor(0.0))

    def _state_shapes(self, p, group):
        s = tuple(p.shape)
        return {"latent": s, "exp_avg": s, "exp_avg_sq": s}

    def _complete_state(self, p, group):
        """A state of the latent weight alone (model_best) starts Adam's moments afresh."""
        state = self.state[p]
        for key in ("exp_avg", "exp_avg_sq"):
            state.setdefault(key, torch.zeros_like(state["latent"]))
        state.setdefault("step", torch.tensor(0.0))

    def _checked_draw(self, group, p, draw, train):
        if not (isinstance(draw, torch.Tensor) and draw.numel() == 0):
            raise ValueError("the latent-weight STE draws nothing: give empty tensors as its draws")
        return draw

    def _write_sample(self, group, p, draw, generator, train):
        self._write_mean(p)
        return p.new_empty(0)

    def _write_mean(self, p):
        """sign(latent), with +1 at 0 as their binarize function."""
        p.copy_(torch.where(self.state[p]["latent"] >= 0, 1.0, -1.0))

    def _sample_gradients(self, group, p, draw, g):
        return {"latent": g}  # straight through

    def _update_binary(self, group, params):
        """torch's Adam (the implementation torch.optim.Adam would pick) with the mean of
        the collected gradients, then the clip to [-1, 1]."""
        states = [self.state[p] for p in params]
        latents = [s["latent"] for s in states]
        grads = [t.grad if self._samples == 1 else t.grad / self._samples for t in latents]
        beta1, beta2 = group["betas"]
        adam_update(latents, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], [],
                    [s["step"] for s in states], has_complex=False, amsgrad=False, beta1=beta1, beta2=beta2,
                    lr=group["lr"], weight_decay=0.0, eps=group["eps"], maximize=False)
        for latent in latents:
            latent.clamp_(-1, 1)
