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
``BinaryWeightOptimizer``, which the latent-weight STE baseline (optim/ste.py) shares.

The optimizer state of a binary weight ``p`` (``opt.state[p]``): "lamda", "mu",
"momentum", "step" (an int), and "prior_lamda" once a prior is set. Real parameters
have "momentum_buffer", as in torch.optim.SGD.
"""
import math
import numbers
from contextlib import contextmanager

import torch
from torch.optim.sgd import sgd as sgd_update


def _is_binary(param):
    """Binary layers mark their sign weights with ``param.binary = True``."""
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


def _relaxed(lamda, u, temperature):
    """The relaxed Bernoulli sample ``tanh((lamda + log(u / (1 - u)) / 2) / temperature)``,
    in the authors' order of operations."""
    return torch.tanh((torch.log(u / (1 - u)) / 2 + lamda) / temperature)


def _check_seed(seed):
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool) or seed < 0):
        raise ValueError(f"seed must be None or an integer >= 0, got {seed!r}")


class BinaryWeightOptimizer(torch.optim.Optimizer):
    """The protocol of VISPA's optimizer, for a method that keeps its own state per
    binary weight and one state tensor (``KEY``) whose ``.grad`` collects that weight's
    per-sample gradients. A subclass says how a sample and the mean network are
    written, what gradient a sample gives, and how the collected gradients update the
    state; everything else is here:

    - ``sampled_params(train=True)`` writes one training sample into every binary
      weight; leaving it turns the gradient ``backward()`` left on each weight into
      the method's own gradient (added to those of the samples before it; ``p.grad``
      is cleared), and the layers hold the mean network again;
    - ``step()`` applies the average over the collected samples, to the binary
      weights' state and, by SGD, to the real parameters;
    - draws come from ``opt.generator`` (seeded by ``seed``, saved in ``state_dict``),
      so that they do not depend on the data pipeline and a resumed run draws what an
      uninterrupted one would.
    """
    KEY = None

    def __init__(self, params, defaults, fused=None, seed=None):
        _check_seed(seed)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.fused = fused
        self.generator = None  # made by the first binary weight's group, on its device
        self._seed = seed
        self._samples = 0  # training samples whose gradients were collected since the last step
        super().__init__(params, defaults)
        if self.generator is None:
            raise ValueError(f"{type(self).__name__} found no binary weights among the parameters: binary "
                             f"layers must mark their sign weight with `param.binary = True`")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check(group)
        for p in group["params"]:
            if _is_binary(p):
                if self.generator is None:
                    self.generator = torch.Generator(device=p.device).manual_seed(self._seed)
                with torch.no_grad():
                    self._init_state(p, group)
                    self._write_mean(p)

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
    def _write_samples(self, train, draws=None, generator=None):
        """Write one sample into every binary weight (given ``draws``, or fresh ones from
        ``generator`` or the optimizer's own); returns the draws, one per weight."""
        if draws is not None and len(draws) != len(self.binary_params()):
            raise ValueError(f"{len(draws)} draws given for {len(self.binary_params())} binary weights")
        given = None if draws is None else iter(draws)
        generator = self.generator if generator is None else generator
        return [self._write_sample(group, p, None if given is None else next(given), generator, train)
                for group, params in self._binary_groups() for p in params]

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
        the optimizer's own. With ``train=True``, leaving the context collects the
        gradient that the enclosed ``backward()`` left on each binary weight (and clears
        it). On leaving, the layers hold the mean network again."""
        used = self._write_samples(train, draws, generator)
        completed = False
        try:
            yield used
            completed = True
        finally:
            if train:
                self._collect_gradients(used, keep=completed)
            self._write_means()

    @contextmanager
    def mean_params(self):
        """Run the enclosed forward pass on the method's deterministic network."""
        self._write_means()
        yield

    @torch.no_grad()
    def _collect_gradients(self, draws, keep=True):
        """Add each binary weight's gradient of the sample drawn with ``draws`` to
        ``state[KEY].grad``; ``keep=False`` (the enclosed code raised) drops the sample."""
        draws = iter(draws)
        collected = False
        for group, params in self._binary_groups():
            for p in params:
                draw = next(draws)
                g, p.grad = p.grad, None
                if g is None or not keep:
                    continue
                collected = True
                target = self.state[p][self.KEY]
                grad = self._sample_gradient(group, p, draw, g.contiguous())
                target.grad = grad if target.grad is None else target.grad.add_(grad)
        self._samples += collected

    def zero_grad(self, set_to_none: bool = True):
        """Clear the real parameters' gradients and the collected ones of the binary weights."""
        super().zero_grad(set_to_none=set_to_none)
        self._clear_collected()

    def _clear_collected(self):
        for p in self.binary_params():
            self.state[p][self.KEY].grad = None
        self._samples = 0

    def collected_gradients(self):
        """Every gradient the next ``step()`` uses, as tensors that may be changed in
        place (e.g. averaged across processes)."""
        grads = []
        for group in self.param_groups:
            for p in group["params"]:
                grad = self.state[p][self.KEY].grad if _is_binary(p) else p.grad
                if grad is not None:
                    grads.append(grad)
        return grads

    # ---- update ---------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        """One update with the average over the training samples collected since the last
        step. ``closure``, if given, must compute the loss and call ``backward()``; it is
        run inside ``sampled_params(train=True)``."""
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.sampled_params(train=True):
                loss = closure()
        if self._samples == 0:
            raise RuntimeError(f"{type(self).__name__}.step() needs the gradients of a training sample: run "
                               f"the forward and backward pass inside `opt.sampled_params(train=True)`")
        for group in self.param_groups:
            self._sgd_real(group)
            params = [p for p in group["params"] if _is_binary(p) and self.state[p][self.KEY].grad is not None]
            if params:
                self._update_binary(group, params)
        self._clear_collected()
        self._write_means()
        return loss

    def _sgd_real(self, group):
        """torch's SGD on the group's real parameters, with their gradients averaged over
        the samples: VISPA's update of its real parameters, call for call."""
        params = [p for p in group["params"] if not _is_binary(p) and p.grad is not None]
        if not params:
            return
        grads = [p.grad if self._samples == 1 else p.grad / self._samples for p in params]
        buffers = [self.state[p].get("momentum_buffer") for p in params]
        fused = self.fused if self.fused is not None else all(p.is_cuda for p in params)
        # The fused kernel starts the momentum of all its tensors or of none: tensors without
        # a buffer yet (first step) and the others are updated in two calls.
        for batch in ([i for i, b in enumerate(buffers) if b is None],
                      [i for i, b in enumerate(buffers) if b is not None]):
            if not batch:
                continue
            batch_buffers = [buffers[i] for i in batch]
            sgd_update([params[i] for i in batch], [grads[i] for i in batch], batch_buffers,
                       fused=fused or None, weight_decay=group["weight_decay"], momentum=group["momentum"],
                       lr=group["lr"], dampening=0.0, nesterov=False, maximize=False)
            for i, buf in zip(batch, batch_buffers):
                if buf is not None:
                    self.state[params[i]]["momentum_buffer"] = buf

    # ---- checkpoints ----------------------------------------------------------------

    def state_dict(self):
        """torch's optimizer state, plus the generator of draws (``"generator"``: the
        kind of device it draws on and its state)."""
        state = super().state_dict()
        state["generator"] = {"device": self.generator.device.type, "state": self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict):
        """Restore the method's state, the real parameters' momenta, the hyper-parameters
        and the generator of draws, and write the mean network into the layers. A
        generator saved on another kind of device cannot be restored; this optimizer's
        own then goes on drawing.

        Raises ValueError, before changing anything, for a state of another network or
        method (naming the tensors) or with invalid hyper-parameters."""
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        mismatched = self._shape_mismatches(state_dict)
        if mismatched:
            shown = "; ".join(mismatched[:3])
            shown += f"; ... ({len(mismatched)} in all)" if len(mismatched) > 3 else ""
            raise ValueError("optimizer state does not match this network: " + shown)
        for group in state_dict["param_groups"]:
            self._check(group)
        super().load_state_dict(state_dict)
        if generator is not None and generator["device"] == self.generator.device.type:
            self.generator.set_state(generator["state"].cpu())
        self._clear_collected()
        self._write_means()

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
                here = self.state[p].get(self.KEY) if _is_binary(p) else None
                there = state_dict["state"].get(index, {}).get(self.KEY)
                if (here is None) != (there is None):
                    problems.append(f"parameter {index}: {self.KEY} {'missing' if there is None else 'unexpected'}")
                elif here is not None and here.shape != there.shape:
                    problems.append(f"parameter {index}: {self.KEY} has shape {tuple(there.shape)} saved, "
                                    f"{tuple(here.shape)} here")
        return problems

    # ---- what a method says -----------------------------------------------------------

    def _check(self, group):
        """Raise ValueError for an invalid hyper-parameter of ``group``."""
        check_number("lr", group.get("lr"), low=0)
        check_number("momentum", group.get("momentum"), low=0)
        check_number("weight_decay", group.get("weight_decay"), low=0)

    def _init_state(self, p, group):
        raise NotImplementedError

    def _write_sample(self, group, p, draw, generator, train):
        raise NotImplementedError

    def _write_mean(self, p):
        raise NotImplementedError

    def _sample_gradient(self, group, p, draw, g):
        raise NotImplementedError

    def _update_binary(self, group, params):
        raise NotImplementedError


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
    KEY = "lamda"

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
                draw = torch.bernoulli(torch.sigmoid(2 * lamda), generator=generator)
        else:
            draw = draw.to(p.device, p.dtype).reshape(lamda.shape)
        if train:
            p.copy_(_relaxed(lamda, draw, group["temperature"]))
        else:
            p.copy_(2 * draw - 1)
        return draw

    def _write_mean(self, p):
        """+1 where mu > 0, -1 where mu <= 0 (the authors' mean network, from the lagging mu)."""
        p.copy_(torch.where(self.state[p]["mu"] <= 0, -1.0, 1.0))

    def _sample_gradient(self, group, p, draw, g):
        """``g (1 - w^2 + 1e-10) / temperature / (1 - mu^2 + 1e-10)``; ``g`` itself in the
        point-estimate mode. The sample w is computed again from its draw, not read from
        the layer, which an evaluation pass inside the context may have overwritten."""
        if group["point_estimate"]:
            return g
        state, tau = self.state[p], group["temperature"]
        w, mu = _relaxed(state["lamda"], draw, tau), state["mu"]
        return (1 - w * w + 1e-10) / tau / (1 - mu * mu + 1e-10) * g

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
