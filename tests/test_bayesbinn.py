"""The BayesBiNN optimizer against its authors' own code and against independent float64
derivations.

``reference/golden/bayesbinn_small.pt`` was produced by running the authors' optimizer
unchanged on a two-layer network in float64, every uniform noise served from the file:
three cases (temperature 1 with two samples and beta 0.9; temperature 1e-8 with one
sample and beta 0; the point estimate with beta 0.9), three steps each, after every step
the loss, lamda, mu, momentum and the BatchNorm running statistics, then the test logits
of the mean network and of three Bernoulli networks. It is the judge: our optimizer,
driven through its public protocol only, must reproduce all of it to float64 rounding.

The network, read off the file: Linear(10, 8) and Linear(8, 4), both without bias and
both binary (80 + 32 = 112 entries, flattened in that order), with BatchNorm1d(8,
momentum 0.2, eps 1e-5, affine=False) and ReLU between them: the running statistics are
0.2 of the first batch's, and the first step's loss agrees to the last bit with ReLU and
eps 1e-5 (not with hardtanh, tanh, sign or eps 1e-4), the settings of the authors'
CIFAR networks.
"""
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import restore_through_a_file
from models import BinaryConv2d, BinaryLinear, is_binary
from models.binary import mark_binary
from optim.bayesbinn import BayesBiNN

GOLDEN = os.path.join(os.path.dirname(__file__), "reference", "golden", "bayesbinn_small.pt")
CASES = ["t1_s2_b0.9", "t1e-8_s1_b0", "point_estimate_b0.9"]
# Relative to the largest entry of the authors' tensor: float64 rounding differs between
# BLAS builds by a few 1e-16 of the size of the terms summed (we see at most 3e-15).
TOLERANCE = 1e-12


def assert_float64_equal(ours, theirs, what):
    scale = theirs.abs().max().item()
    torch.testing.assert_close(ours, theirs, rtol=0.0, atol=TOLERANCE * scale, msg=lambda m: f"{what}: {m}")


class GoldenNet(nn.Module):
    """The network of the golden file."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 8, bias=False)
        self.bn = nn.BatchNorm1d(8, eps=1e-5, momentum=0.2, affine=False)
        self.fc2 = nn.Linear(8, 4, bias=False)
        mark_binary(self.fc1.weight)
        mark_binary(self.fc2.weight)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x))))


def pieces(flat, params):
    """A flat vector over ``params`` (the authors' parameters_to_vector) cut into their shapes."""
    sizes = [p.numel() for p in params]
    return [piece.view(p.shape) for piece, p in zip(flat.split(sizes), params)]


def flat(opt, key):
    return torch.cat([opt.state[p][key].flatten() for p in opt.binary_params()])


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN, weights_only=True)


@pytest.mark.parametrize("name", CASES)
def test_golden_file_is_the_network_and_its_mu_lags_lamda_by_one_step(golden, name):
    case = golden["cases"][name]
    assert [tuple(s) for s in case["param_shapes"]] == [tuple(p.shape) for p in GoldenNet().parameters()]
    assert torch.equal(case["mu_init"], torch.tanh(case["lamda_init"]))
    steps = case["steps"]
    assert torch.equal(steps[0]["mu"], case["mu_init"])  # the authors' quirk, in their own output
    for before, after in zip(steps, steps[1:]):
        assert torch.equal(after["mu"], torch.tanh(before["lamda"]))
    assert len(steps[0]["uniform_noises"]) == case["num_samples"]


@pytest.mark.parametrize("name", CASES)
def test_training_and_test_networks_reproduce_the_authors_optimizer(golden, name):
    case = golden["cases"][name]
    model = GoldenNet().double()
    opt = BayesBiNN(model.parameters(), train_set_size=case["train_set_size"], lr=case["lr"], beta=case["beta"],
                    temperature=case["temperature"], reweight=case["reweight"],
                    point_estimate=case["num_samples"] == 0, seed=0)
    params = opt.binary_params()
    assert params == [model.fc1.weight, model.fc2.weight]
    for p, lamda in zip(params, pieces(case["lamda_init"], params)):
        opt.set_distribution(p, lamda)
    assert torch.equal(flat(opt, "mu"), case["mu_init"])

    model.train()
    for t, step in enumerate(case["steps"]):
        opt.zero_grad(set_to_none=True)
        losses = []
        for noise in step["uniform_noises"] or [None]:  # the point estimate: one pass, no noise
            draws = None if noise is None else pieces(noise, params)
            with opt.sampled_params(train=True, draws=draws) as used:
                loss = F.cross_entropy(model(step["inputs"]), step["labels"])
                loss.backward()
            losses.append(loss.detach())
            if noise is not None:
                assert all(torch.equal(u, d) for u, d in zip(used, draws))
        opt.step()
        assert_float64_equal(torch.stack(losses).mean(), step["loss"], f"step {t} loss")
        for key in ("lamda", "mu", "momentum"):
            assert_float64_equal(flat(opt, key), step[key], f"step {t} {key}")
        assert_float64_equal(model.bn.running_mean, step["running_mean"], f"step {t} running_mean")
        assert_float64_equal(model.bn.running_var, step["running_var"], f"step {t} running_var")

    model.eval()
    test = case["test"]
    with torch.no_grad():
        with opt.mean_params():
            assert_float64_equal(model(test["inputs"]), test["mean_logits"], "mean network logits")
        for i, (noise, logits) in enumerate(zip(test["bernoulli_noises"], test["mc_logits"])):
            with opt.sampled_params(draws=pieces(noise, params)):
                assert_float64_equal(model(test["inputs"]), logits, f"Bernoulli network {i} logits")


# ---- independent float64 checks -------------------------------------------------------------------


class Small(nn.Module):
    """Two binary layers of different shapes, BatchNorm with affine parameters and a real
    bias, in float64. ``stem`` and ``body`` split it as the engine's evaluation wants."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Identity()
        self.conv = BinaryConv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = BinaryLinear(3 * 4 * 4, 5)
        self.bias = nn.Parameter(torch.randn(5))

    def body(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).flatten(1)) + self.bias

    def forward(self, x):
        return self.body(self.stem(x))


def small(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Small().double()
    settings = dict(train_set_size=50, lr=1e-3, beta=0.9, temperature=1.0, lamda_init=1.0, lamda_std=0.5,
                    momentum=0.9, weight_decay=1e-3, seed=seed)
    settings.update(kwargs)
    return model, BayesBiNN(model.parameters(), **settings)


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=g), torch.randint(0, 5, (n,), generator=g)


def np64(t):
    return t.detach().cpu().double().numpy().copy()


@pytest.mark.parametrize("temperature", [1.0, 0.3])
def test_sample_gradient_is_the_relaxed_samples_autograd_over_the_bernoullis_fisher(temperature):
    """The lamda gradient of a sample: autograd of the loss through
    w = tanh((lamda + log(u/(1-u))/2) / temperature), divided by 1 - mu^2 (the Fisher
    information of the Bernoulli in lamda), with the authors' 1e-10 guards:
    collected (1 - mu^2 + 1e-10) = dLoss/dlamda + 1e-10 dLoss/dw / temperature."""
    model, opt = small(seed=1, temperature=temperature)
    x, y = batch(1)
    params = opt.binary_params()
    with opt.sampled_params(train=True) as draws:
        written = [p.detach().clone() for p in params]
        F.cross_entropy(model(x), y).backward()
    assert all(p.grad is None for p in params)  # collected, and the weight's own gradient cleared

    # The same loss as a function of lamda, written out (BatchNorm on the batch's statistics).
    lamdas = [opt.state[p]["lamda"].clone().requires_grad_() for p in params]
    samples = [torch.tanh((lam + torch.log(u / (1 - u)) / 2) / temperature) for lam, u in zip(lamdas, draws)]
    for s, w in zip(samples, written):
        assert torch.equal(s.detach(), w)
        s.retain_grad()
    h = F.conv2d(x, samples[0], padding=1) * model.conv.alpha
    h = F.relu(F.batch_norm(h, None, None, model.bn.weight, model.bn.bias, training=True, eps=model.bn.eps))
    logits = F.linear(h.flatten(1), samples[1]) * model.fc.alpha + model.bias
    F.cross_entropy(logits, y).backward()
    for p, lam, s in zip(params, lamdas, samples):
        mu = opt.state[p]["mu"]
        expected = (lam.grad + 1e-10 * s.grad / temperature) / (1 - mu * mu + 1e-10)
        torch.testing.assert_close(opt.state[p]["lamda"].grad, expected, rtol=1e-12,
                                   atol=1e-12 * expected.abs().max().item())


def test_the_contexts_do_not_nest():
    """An evaluation pass inside the training context would leave the rest of the training
    sample's forward pass on the mean network: refused, and the sample's gradient is the
    one it would be alone."""
    model, opt = small(seed=13)
    x, y = batch(13)
    opt.zero_grad()
    with opt.sampled_params(train=True) as draws:
        with pytest.raises(RuntimeError, match="inside sampled_params"):
            with opt.mean_params():
                pass
        with pytest.raises(RuntimeError, match="do not nest"):
            with opt.sampled_params():
                pass
        F.cross_entropy(model(x), y).backward()
    nested = [opt.state[p]["lamda"].grad.clone() for p in opt.binary_params()]
    opt.zero_grad()
    with opt.sampled_params(train=True, draws=draws):
        F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(a, p_grad) for a, p_grad in zip(nested, [opt.state[p]["lamda"].grad
                                                                   for p in opt.binary_params()]))


def test_steps_match_the_float64_derivation_with_groups_prior_and_several_samples():
    """lamda, mu and the momentum after three steps of two samples each, derived in numpy
    from the samples and weight gradients read inside the contexts: groups with their own
    settings, a prior on one weight, reweight != 1."""
    torch.manual_seed(2)
    model = Small().double()
    opt = BayesBiNN([{"params": [model.conv.weight, model.conv.alpha], "temperature": 0.5, "beta": 0.9,
                      "reweight": 0.5, "lr": 1e-2},
                     {"params": [model.fc.weight, model.fc.alpha, model.bn.weight, model.bn.bias, model.bias]}],
                    train_set_size=40, lr=1e-3, beta=0.5, temperature=1.0, lamda_init=1.0, lamda_std=1.0, seed=2)
    params = opt.binary_params()
    settings = [dict(tau=0.5, beta=0.9, reweight=0.5, lr=1e-2), dict(tau=1.0, beta=0.5, reweight=1.0, lr=1e-3)]
    prior = torch.randn(model.fc.weight.shape, dtype=torch.float64)
    opt.set_prior(model.fc.weight, prior)
    priors = [np.zeros(model.conv.weight.shape), np64(prior)]
    lam = [np64(opt.state[p]["lamda"]) for p in params]
    mu = [np.tanh(v) for v in lam]
    m = [np.zeros_like(v) for v in lam]
    for t in range(1, 4):
        opt.zero_grad()
        g_hat = [np.zeros_like(v) for v in lam]
        for k in range(2):
            x, y = batch(10 * t + k)
            with opt.sampled_params(train=True) as draws:
                F.cross_entropy(model(x), y).backward()
                for i, (p, u, s) in enumerate(zip(params, draws, settings)):
                    w, g = np64(p), np64(p.grad)
                    u = np64(u)
                    np.testing.assert_allclose(w, np.tanh((lam[i] + 0.5 * np.log(u / (1 - u))) / s["tau"]),
                                               rtol=1e-14, atol=1e-15)
                    g_hat[i] += g * (1 - w ** 2 + 1e-10) / s["tau"] / (1 - mu[i] ** 2 + 1e-10)
        opt.step()
        for i, s in enumerate(settings):
            m[i] = s["beta"] * m[i] + (1 - s["beta"]) * (40 / 2 * g_hat[i] + s["reweight"] * (lam[i] - priors[i]))
            mu[i] = np.tanh(lam[i])
            lam[i] = lam[i] - s["lr"] * m[i] / (1 - s["beta"] ** t)
            state = opt.state[params[i]]
            assert state["step"] == t
            for key, expected in (("momentum", m[i]), ("mu", mu[i]), ("lamda", lam[i])):
                np.testing.assert_allclose(np64(state[key]), expected, rtol=1e-12,
                                           atol=1e-12 * np.abs(expected).max(), err_msg=f"step {t} {key}")


def test_point_estimate_trains_on_tanh_lamda_and_scales_the_gradient_by_N():
    model, opt = small(seed=3, point_estimate=True, beta=0.0, lr=1e-3)
    x, y = batch(3)
    lam0 = [opt.state[p]["lamda"].clone() for p in opt.binary_params()]
    with opt.sampled_params(train=True) as draws:
        assert all(d.numel() == 0 for d in draws)
        for p, lam in zip(opt.binary_params(), lam0):
            assert torch.equal(p, torch.tanh(lam))
        F.cross_entropy(model(x), y).backward()
        grads = [p.grad.clone() for p in opt.binary_params()]
    opt.step()
    for p, lam, g in zip(opt.binary_params(), lam0, grads):
        torch.testing.assert_close(opt.state[p]["lamda"], lam - 1e-3 * (50 * g + lam), rtol=1e-13, atol=1e-15)


def test_real_parameters_are_trained_as_torch_sgd_would():
    """The same gradients give bit for bit torch.optim.SGD's parameters, over steps of one
    and of two samples (their average)."""
    model, opt = small(seed=4, lr=0.05, momentum=0.9, weight_decay=1e-3)
    real = [p for p in model.parameters() if not is_binary(p)]
    mirror = [p.detach().clone().requires_grad_() for p in real]
    sgd = torch.optim.SGD(mirror, lr=0.05, momentum=0.9, weight_decay=1e-3)
    for t, samples in enumerate([1, 2, 1, 2]):
        opt.zero_grad()
        sgd.zero_grad()
        for k in range(samples):
            x, y = batch(100 + 10 * t + k)
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
        for p, q in zip(real, mirror):
            q.grad = p.grad.clone() / samples if samples > 1 else p.grad.clone()
        opt.step()
        sgd.step()
        for p, q in zip(real, mirror):
            assert torch.equal(p, q)
            assert torch.equal(opt.state[p]["momentum_buffer"], sgd.state[q]["momentum_buffer"])


def train_steps(model, opt, first, count):
    """Steps of two training samples each, and one evaluation sample after each (every
    draw from the optimizer's generator)."""
    for t in range(first, first + count):
        x, y = batch(1000 + t)
        opt.zero_grad(set_to_none=True)
        for _ in range(2):
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad(), opt.sampled_params():
            model(x)


def test_a_resumed_run_continues_bit_for_bit():
    N, k = 5, 2
    model, opt = small(seed=5)
    train_steps(model, opt, 0, N)

    resumed_model, resumed = small(seed=5)
    train_steps(resumed_model, resumed, 0, k)
    fresh_model, fresh = small(seed=77)  # other initial values, another generator
    restore_through_a_file(resumed_model, resumed, fresh_model, fresh)
    train_steps(fresh_model, fresh, k, N - k)

    for (name, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert opt.state[p].keys() == fresh.state[q].keys()
        for key, value in opt.state[p].items():
            assert (torch.equal(value, fresh.state[q][key]) if torch.is_tensor(value)
                    else value == fresh.state[q][key]), key
    assert torch.equal(opt.generator.get_state(), fresh.generator.get_state())


def test_draws_come_from_the_own_generator_or_the_given_one():
    model, opt = small(seed=6)
    params = opt.binary_params()
    lamdas = [opt.state[p]["lamda"] for p in params]

    def shadow(generator):
        return torch.Generator().set_state(generator.get_state())

    own = shadow(opt.generator)
    with opt.sampled_params(train=True) as draws:
        pass
    for u, lam in zip(draws, lamdas):
        assert torch.equal(u, torch.rand(lam.shape, generator=own, dtype=torch.float64))
    with opt.sampled_params() as draws:
        for p, b, lam in zip(params, draws, lamdas):
            assert torch.equal(b, torch.bernoulli(torch.sigmoid(2 * lam), generator=own))
            assert torch.equal(p, 2 * b - 1)

    before = opt.generator.get_state()
    other = torch.Generator().manual_seed(123)
    expected = torch.Generator().manual_seed(123)
    with opt.sampled_params(train=True, generator=other) as draws:
        pass
    with opt.sampled_params(generator=other) as test_draws:
        pass
    for u, b, lam in zip(draws, test_draws, lamdas):
        assert torch.equal(u, torch.rand(lam.shape, generator=expected, dtype=torch.float64))
    for b, lam in zip(test_draws, lamdas):
        assert torch.equal(b, torch.bernoulli(torch.sigmoid(2 * lam), generator=expected))
    assert torch.equal(opt.generator.get_state(), before)

    with opt.sampled_params(train=True, draws=draws):  # replayed: the same relaxed weights
        replayed = [p.detach().clone() for p in params]
    for w, u, lam in zip(replayed, draws, lamdas):
        assert torch.equal(w, torch.tanh((torch.log(u / (1 - u)) / 2 + lam) / 1.0))
    with pytest.raises(ValueError, match="1 draws given for 2 binary weights"):
        with opt.sampled_params(draws=draws[:1]):
            pass


def test_initial_lamda_is_a_random_sign_times_lamda_init_plus_noise_from_the_seed():
    def lamda(seed, **kwargs):
        layer = BinaryLinear(100, 100).double()
        opt = BayesBiNN(layer.parameters(), train_set_size=1, seed=seed, **kwargs)
        return opt.state[layer.weight]["lamda"]

    exact = lamda(0)  # the defaults: lamda_init 10, lamda_std 0
    assert torch.equal(exact.abs(), torch.full_like(exact, 10.0))
    assert 0.45 < (exact > 0).double().mean().item() < 0.55
    assert torch.equal(lamda(0), exact) and not torch.equal(lamda(1), exact)
    noisy = lamda(2, lamda_init=100.0, lamda_std=4.0)
    residual = noisy - 100.0 * torch.sign(noisy)
    assert abs(residual.mean().item()) < 0.1 and residual.std().item() == pytest.approx(2.0, rel=0.05)


def test_test_networks_are_bernoulli_of_sigmoid_2_lamda_and_the_mean_network_is_plus_one_where_mu_is_positive():
    layer = BinaryLinear(4, 5).double()
    opt = BayesBiNN(layer.parameters(), train_set_size=1, seed=8)
    lamda = torch.linspace(-1.5, 1.5, 20, dtype=torch.float64).view(5, 4)
    lamda[0, 0] = 0.0
    opt.set_distribution(layer.weight, lamda)
    assert torch.equal(layer.weight, torch.where(torch.tanh(lamda) > 0, 1.0, -1.0).double())
    assert layer.weight[0, 0] == -1  # mu = 0 gives -1, as the authors' mean network
    with opt.mean_params():
        assert torch.equal(layer.weight, torch.where(lamda > 0, 1.0, -1.0).double())
    count = torch.zeros_like(lamda)
    n = 4000
    for _ in range(n):
        with opt.sampled_params() as (b,):
            assert set(layer.weight.unique().tolist()) <= {-1.0, 1.0}
            count += layer.weight > 0
    assert (count / n - torch.sigmoid(2 * lamda)).abs().max().item() < 0.035


def test_outside_the_contexts_the_layers_hold_the_mean_network_of_the_lagging_mu():
    model, opt = small(seed=9)
    x, y = batch(9)

    def holds_mean():
        return all(torch.equal(p, torch.where(opt.state[p]["mu"] > 0, 1.0, -1.0).double())
                   for p in opt.binary_params())

    assert holds_mean()
    before = [opt.state[p]["lamda"].clone() for p in opt.binary_params()]
    with opt.sampled_params(train=True):
        assert not holds_mean()
        F.cross_entropy(model(x), y).backward()
    assert holds_mean()
    opt.step()
    assert holds_mean()
    for p, lam in zip(opt.binary_params(), before):
        assert torch.equal(opt.state[p]["mu"], torch.tanh(lam))  # the lamda before the step
    with pytest.raises(ZeroDivisionError):
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
            1 / 0
    assert holds_mean()
    assert all(opt.state[p]["lamda"].grad is None for p in opt.binary_params())
    with pytest.raises(RuntimeError, match=r"BayesBiNN.step\(\) needs the gradients of a training sample"):
        opt.step()


def test_collected_gradients_are_what_the_step_uses():
    model, opt = small(seed=10, beta=0.0, lr=1e-2, reweight=1.0)
    x, y = batch(10)
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()
    grads = opt.collected_gradients()
    binary = [opt.state[p]["lamda"].grad for p in opt.binary_params()]
    real = [p.grad for p in model.parameters() if not is_binary(p)]
    assert len(grads) == len(binary) + len(real)
    assert all(any(g is t for g in grads) for t in binary + real)
    for g in grads:
        g.zero_()  # e.g. the mean over processes
    lam0 = [opt.state[p]["lamda"].clone() for p in opt.binary_params()]
    opt.step()
    for p, lam in zip(opt.binary_params(), lam0):  # only the KL term is left
        torch.testing.assert_close(opt.state[p]["lamda"], lam - 1e-2 * lam, rtol=1e-15, atol=0)


def test_the_training_engine_runs_it():
    from engine import Ranks, evaluate, evaluate_mean, train_one_epoch
    model, opt = small(seed=11)
    batches = [batch(200 + i, n=6) for i in range(4)]
    ranks = Ranks(generators=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    result = train_one_epoch(model, opt, batches, lambda i: 1e-3, ranks=ranks)
    assert np.isfinite(result["loss"])
    assert all(opt.state[p]["step"] == 2 for p in opt.binary_params())
    assert np.isfinite(evaluate_mean(model, opt, batches)["loss"])
    assert np.isfinite(evaluate(model, opt, batches, L=3)["loss"])


BAD = [dict(lr=-0.1), dict(lr=True), dict(lr="0.1"), dict(train_set_size=0), dict(train_set_size=True),
       dict(train_set_size=float("nan")), dict(beta=1.0), dict(beta=-0.1), dict(beta=True),
       dict(temperature=0.0), dict(temperature="eight"), dict(temperature=True), dict(lamda_init=float("inf")),
       dict(lamda_std=-1.0), dict(reweight=-1.0), dict(point_estimate=1), dict(point_estimate="yes"),
       dict(momentum=-0.9), dict(momentum=True), dict(weight_decay=None), dict(seed=True), dict(seed=-1),
       dict(seed="0")]


@pytest.mark.parametrize("bad", BAD, ids=[f"{k}={v!r}" for d in BAD for k, v in d.items()])
def test_invalid_hyperparameters_are_refused_with_their_name(bad):
    (name, _), = bad.items()
    with pytest.raises(ValueError, match=name):
        small(**bad)


def test_load_state_dict_refuses_invalid_hyperparameters_and_other_networks_before_changing_anything():
    model, opt = small(seed=12)
    state = opt.state_dict()
    state["param_groups"][0]["temperature"] = "eight"
    lamda = opt.state[model.fc.weight]["lamda"].clone()
    with pytest.raises(ValueError, match="temperature must be a finite number > 0, got 'eight'"):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["temperature"] == 1.0
    assert torch.equal(opt.state[model.fc.weight]["lamda"], lamda)

    layer = BinaryLinear(3, 2).double()
    other = BayesBiNN(layer.parameters(), train_set_size=1, seed=0)
    with pytest.raises(ValueError, match="does not match this network"):
        opt.load_state_dict(other.state_dict())


def test_network_without_binary_weights_is_refused():
    with pytest.raises(ValueError, match="no binary weights"):
        BayesBiNN(nn.Linear(3, 2).parameters(), train_set_size=10)
