"""BayesBiNN: binary weights trained by the Bayesian learning rule on a mean-field
Bernoulli distribution (Meng, Bachmann and Khan, ICML 2020), as its authors' code
computes it, behind the protocol of VISPA's optimizer.

For every binary weight tensor the optimizer keeps a Bernoulli over {-1, +1} per
entry, in its natural parameter

    lamda   (shape of the weight)   P(w = +1) = sigmoid(2 lamda),
    mu      = tanh(lamda)           the mean (see the lag below),
    momentum                        the Adam-style first moment of the lamda update.

Training samples are relaxed (Gumbel-softmax / concrete): with one ``u ~ U(0, 1)``
per entry,

    w = tanh((lamda + log(u / (1 - u)) / 2) / temperature),

and the gradient ``g = dLoss/dw`` of a sample becomes the lamda gradient

    g * (1 - w^2 + 1e-10) / temperature / (1 - mu^2 + 1e-10)

(the chain rule through w, divided by the Fisher information of the Bernoulli, with
the authors' 1e-10 guards). ``step()`` takes the average over the samples collected
since the last step times the training-set size N, adds ``reweight * (lamda -
prior)`` (the KL to the prior: a zero prior unless one is set) and makes a
bias-corrected momentum step:

    m      <- beta m + (1 - beta) (N mean(g_hat) + reweight (lamda - prior))
    lamda  <- lamda - lr m / (1 - beta^t)
    mu     <- tanh(lamda before this update)

The last line is the authors' code as it runs: mu is computed from the lamda read
before the update, so it lags lamda by one step, and both the next gradient scale and
the mean network use the lagging mu. The point-estimate mode (``point_estimate``; their
``num_samples = 0``) trains on ``w = tanh(lamda)`` and takes ``N g`` as is.

Test time: ``mean_params()`` is the network with +1 where mu > 0 and -1 elsewhere
(their default, ``test_samples = 0``); ``sampled_params()`` draws one network
``2 b - 1`` with ``b ~ Bernoulli(sigmoid(2 lamda))``: unlike the relaxed training
samples, these are binary. Outside the contexts the layers hold the mean network.

Every other ("real") parameter is trained by torch's SGD exactly as VISPA trains it
(momentum, weight decay, no dampening, no Nesterov), with the average of its gradients
over the collected samples, so that beside VISPA only the binary weights' method
differs. The protocol (``sampled_params``, ``mean_params``, ``collected_gradients``,
``step``, the generator, ``state_dict``) is VISPA's and lives in
``optim/binary_optimizer.py``, which VISPA and the latent-weight STE share.

The optimizer state of a binary weight ``p`` (``opt.state[p]``): "lamda", "mu",
"momentum", "step" (an int), and "prior_lamda" once a prior is set. Real parameters
have "momentum_buffer", as in torch.optim.SGD.
"""
import math

import torch

from .binary_optimizer import BinaryWeightOptimizer, check_number


def _relaxed(lamda, u, temperature):
    """The relaxed Bernoulli sample ``tanh((lamda + log(u / (1 - u)) / 2) / temperature)``,
    in the authors' order of operations."""
    return torch.tanh((torch.log(u / (1 - u)) / 2 + lamda) / temperature)


class BayesBiNN(BinaryWeightOptimizer):
    """Args (defaults: the authors' CIFAR-100 script ``main_cifar100.py``, unless said):
        params: the network's parameters (or parameter groups). Binary weights are
            recognised by their ``binary`` mark; every other parameter is trained by
            SGD with ``lr``, ``momentum`` and ``weight_decay``.
        train_set_size: N, which scales the data term of the lamda gradient. Required:
            it depends on the data; the authors' scripts use the training split times
            ``--trainset_scale`` 10 (to count the augmented copies).
        lr: 3e-4 (``--lr``), the step on lamda; the real parameters take it too.
        beta: 0.0, the momentum of the lamda update (their ``betas``, the scripts'
            ``--momentum``, whose help text says 0.9 while its value is 0.0).
        temperature: 1e-8 (``--temperature``; the CIFAR-10 script has 1e-10), of the
            relaxed training samples.
        lamda_init, lamda_std: 10 and 0 (``--lamda``, ``--lamda-std``): lamda starts as
            a random sign times ``lamda_init`` plus ``sqrt(lamda_std)`` N(0, 1), drawn
            from the optimizer's generator.
        reweight: 1.0 (the optimizer's default; the scripts do not set it), the weight
            of the KL term ``lamda - prior``.
        point_estimate: False (``--train-samples 1``): train on ``tanh(lamda)`` instead
            of relaxed samples (their ``num_samples = 0``).
        momentum, weight_decay, fused: the real parameters' SGD, as VISPA's (its
            defaults: momentum 0.9, no weight decay; the authors' CIFAR networks have
            no real parameters, ``--bn-affine 0``).
        seed: seed of the optimizer's generator, which draws the initial lamda and
            every sample (default: one drawn from torch's global generator).

    Every setting but ``seed`` and ``fused`` may differ between parameter groups.
    ``set_distribution`` sets lamda given; ``set_prior`` a prior's lamda.
    """
    KEYS = ("lamda",)
    DISTRIBUTION = ("lamda", "mu", "prior_lamda")
    DRAWS_AT_INIT = True  # lamda starts as random signs from the optimizer's generator

    def __init__(self, params, train_set_size, lr=3e-4, beta=0.0, temperature=1e-8, lamda_init=10.0,
                 lamda_std=0.0, reweight=1.0, point_estimate=False, momentum=0.9, weight_decay=0.0,
                 fused=None, seed=None):
        defaults = dict(lr=lr, train_set_size=train_set_size, beta=beta, temperature=temperature,
                        lamda_init=lamda_init, lamda_std=lamda_std, reweight=reweight,
                        point_estimate=point_estimate, momentum=momentum, weight_decay=weight_decay)
        super().__init__(params, defaults, fused=fused, seed=seed)

    def _check(self, group):
        super()._check(group)
        check_number("train_set_size", group.get("train_set_size"), low=0, low_open=True)
        check_number("beta", group.get("beta"), low=0, high=1, high_open=True)
        check_number("temperature", group.get("temperature"), low=0, low_open=True)
        check_number("lamda_init", group.get("lamda_init"))
        check_number("lamda_std", group.get("lamda_std"), low=0)
        check_number("reweight", group.get("reweight"), low=0)
        if not isinstance(group.get("point_estimate"), bool):
            raise ValueError(f"point_estimate must be True or False, got {group.get('point_estimate')!r}")

    @torch.no_grad()
    def _init_state(self, p, group):
        """lamda: a random sign times lamda_init, plus sqrt(lamda_std) N(0, 1), as the
        authors draw it, from the optimizer's own generator; momentum zero."""
        like = dict(dtype=p.dtype, device=p.device)
        sign = torch.randint(0, 2, p.shape, generator=self.generator, **like).mul_(2).sub_(1)
        noise = torch.randn(p.shape, generator=self.generator, **like)
        lamda = sign * group["lamda_init"] + math.sqrt(group["lamda_std"]) * noise
        self.state[p].update(lamda=lamda, mu=torch.tanh(lamda), momentum=torch.zeros_like(lamda), step=0)

    @torch.no_grad()
    def set_distribution(self, param, lamda):
        """Replace lamda of the binary weight ``param`` (mu becomes tanh(lamda)) and
        write the mean network into it."""
        state = self.state[param]
        if tuple(lamda.shape) != tuple(state["lamda"].shape):
            raise ValueError(f"lamda has shape {tuple(lamda.shape)}, expected {tuple(state['lamda'].shape)}")
        state["lamda"].copy_(lamda)
        torch.tanh(state["lamda"], out=state["mu"])
        self._write_mean(param)

    @torch.no_grad()
    def set_prior(self, param, prior_lamda):
        """The lamda of the prior of ``param`` (the posterior of a previous task, in
        continual learning); without one the prior is lamda = 0, as in the authors' code."""
        lamda = self.state[param]["lamda"]
        if tuple(prior_lamda.shape) != tuple(lamda.shape):
            raise ValueError(f"prior_lamda has shape {tuple(prior_lamda.shape)}, expected {tuple(lamda.shape)}")
        self.state[param]["prior_lamda"] = prior_lamda.to(lamda.device, lamda.dtype).clone()

    def _state_shapes(self, p, group):
        s = tuple(p.shape)
        return {"lamda": s, "mu": s, "momentum": s, "prior_lamda": s}

    def _complete_state(self, p, group):
        """A state of the distribution alone (model_best) starts its momentum afresh."""
        state = self.state[p]
        state.setdefault("momentum", torch.zeros_like(state["lamda"]))
        state.setdefault("step", 0)

    def _checked_draw(self, group, p, draw, train):
        if train and group["point_estimate"]:
            if not (isinstance(draw, torch.Tensor) and draw.numel() == 0):
                raise ValueError("the point estimate draws nothing: give empty tensors as its draws")
            return draw
        if not isinstance(draw, torch.Tensor) or draw.numel() != p.numel():
            found = tuple(draw.shape) if isinstance(draw, torch.Tensor) else type(draw).__name__
            raise ValueError(f"a draw for a binary weight of shape {tuple(p.shape)} must be a tensor of "
                             f"{p.numel()} values (one per weight), got {found}")
        return draw.to(p.device, p.dtype).reshape(p.shape)

    def _write_sample(self, group, p, draw, generator, train):
        """Training: ``tanh((lamda + log(u/(1-u))/2) / temperature)`` with ``u ~ U(0, 1)``
        (the draw), or ``tanh(lamda)`` in the point-estimate mode (no draw). Test:
        ``2 b - 1`` with ``b ~ Bernoulli(sigmoid(2 lamda))`` (the draw)."""
        lamda = self.state[p]["lamda"]
        if train and group["point_estimate"]:
            p.copy_(torch.tanh(lamda))
            return p.new_empty(0)
        if draw is None:
            if train:
                draw = torch.rand(lamda.shape, generator=generator, dtype=p.dtype, device=p.device)
            else:
                # a lamda gone NaN (a diverging run) draws a fair coin: the run reports the
                # divergence at the end of the epoch, as it does for every method
                draw = torch.bernoulli(torch.sigmoid(2 * lamda).nan_to_num(0.5), generator=generator)
        if train:
            p.copy_(_relaxed(lamda, draw, group["temperature"]))
        else:
            p.copy_(2 * draw - 1)
        return draw

    def _write_mean(self, p):
        """+1 where mu > 0, -1 where mu <= 0 (the authors' mean network, from the lagging mu)."""
        p.copy_(torch.where(self.state[p]["mu"] <= 0, -1.0, 1.0))

    def _sample_gradients(self, group, p, draw, g):
        """``g (1 - w^2 + 1e-10) / temperature / (1 - mu^2 + 1e-10)``; ``g`` itself in the
        point-estimate mode. The sample w is computed again from its draw."""
        if group["point_estimate"]:
            return {"lamda": g}
        state, tau = self.state[p], group["temperature"]
        w, mu = _relaxed(state["lamda"], draw, tau), state["mu"]
        return {"lamda": (1 - w * w + 1e-10) / tau / (1 - mu * mu + 1e-10) * g}

    def _update_binary(self, group, params):
        """The bias-corrected momentum step on lamda; mu from the lamda before it. The
        operations are the authors', in their order: given the same gradients, the
        results round as theirs do."""
        beta, lr = group["beta"], group["lr"]
        data_scale = group["train_set_size"] / self._samples
        for p in params:
            state = self.state[p]
            lamda, m = state["lamda"], state["momentum"]
            pull = lamda - state["prior_lamda"] if "prior_lamda" in state else lamda
            m.mul_(beta).add_((1 - beta) * (lamda.grad.mul(data_scale) + group["reweight"] * pull))
            state["step"] += 1
            torch.tanh(lamda, out=state["mu"])
            lamda.sub_(lr * m / (1 - beta ** state["step"]))
