"""The VISPA optimizer against an independent float64 derivation (numpy), on small
tensors with fresh random values."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import restore_through_a_file
from models import BinaryConv2d, BinaryLinear, is_binary
from optim import VISPA


class Tiny(nn.Module):
    """Two binary layers of different shapes and one real parameter, in float64."""

    def __init__(self):
        super().__init__()
        self.conv = BinaryConv2d(2, 3, 3, padding=1)
        self.fc = BinaryLinear(3 * 4 * 4, 5)
        self.bias = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).flatten(1)) + self.bias


def tiny(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Tiny().double()
    settings = dict(lr=0.05, momentum=0.9, weight_decay=1e-3, K=3, S=100.0)
    settings.update(kwargs)
    return model, VISPA(model.parameters(), **settings)


def binary_params(model):
    return [model.conv.weight, model.fc.weight]


def np64(t):
    return t.detach().cpu().double().numpy().copy()


def expected_sample(M, Z, r):
    """sign(M + sum_k r_k Z_k), with one r shared by every entry."""
    return np.sign(M + np.tensordot(r, Z, axes=1))


def far_from_zero(M, Z, r, eps=1e-9):
    return np.abs(M + np.tensordot(r, Z, axes=1)) > eps


def test_initial_mean_is_the_layers_weight_and_network_holds_its_sign():
    torch.manual_seed(0)
    model = Tiny().double()
    initial = [np64(p) for p in binary_params(model)]
    opt = VISPA(model.parameters(), lr=0.1, K=3, S=100.0)
    for p, w0 in zip(binary_params(model), initial):
        np.testing.assert_array_equal(np64(opt.state[p]["M"]), w0)
        np.testing.assert_array_equal(np64(p), np.sign(w0))
        assert opt.state[p]["Z"].shape == (3,) + p.shape


def test_Z_starts_xavier_normal_on_its_own_shape():
    """Z of shape (K, out, in, kh, kw): fan_in = out * (in * kh * kw) and
    fan_out = K * (in * kh * kw) - the layer's output channels count as fan-in."""
    torch.manual_seed(1)
    layer = BinaryConv2d(16, 32, 3)
    opt = VISPA(layer.parameters(), lr=0.1, K=8, S=100.0)
    Z = np64(opt.state[layer.weight]["Z"])
    receptive = 16 * 3 * 3
    expected_std = math.sqrt(2.0 / (32 * receptive + 8 * receptive))
    assert Z.std() == pytest.approx(expected_std, rel=0.03)
    assert abs(Z.mean()) < 3 * expected_std / math.sqrt(Z.size)


def test_training_sample_is_sign_of_mean_plus_shared_draw_times_factor():
    model, opt = tiny(seed=2)
    with opt.sampled_params(train=True) as draws:
        inside = [np64(p) for p in binary_params(model)]
    assert len(draws) == 2
    for p, b, r in zip(binary_params(model), inside, draws):
        M, Z, r = np64(opt.state[p]["M"]), np64(opt.state[p]["Z"]), np64(r)
        assert r.shape == (3,)
        mask = far_from_zero(M, Z, r)
        assert mask.mean() > 0.99
        np.testing.assert_array_equal(b[mask], expected_sample(M, Z, r)[mask])


def test_one_draw_per_tensor_not_per_entry():
    """With a single shared r, b = sign(M + r.Z) holds for every entry; draws per entry
    would break it for about half of the entries where the Z term dominates."""
    model, opt = tiny(seed=3, K=2, S=1.0)
    for p in binary_params(model):  # make the factor dominate the mean
        opt.state[p]["Z"].mul_(100)
    with opt.sampled_params(train=True) as draws:
        inside = [np64(p) for p in binary_params(model)]
    for p, b, r in zip(binary_params(model), inside, draws):
        M, Z, r = np64(opt.state[p]["M"]), np64(opt.state[p]["Z"]), np64(r)
        np.testing.assert_array_equal(b, expected_sample(M, Z, r))
        independent = np.sign(M + np.einsum("k...,k...->...", np.random.default_rng(0).normal(size=Z.shape), Z))
        assert (independent != b).mean() > 0.2


def test_every_forward_pass_gets_a_fresh_draw():
    model, opt = tiny(seed=4)
    draws = []
    for _ in range(3):
        with opt.sampled_params(train=True) as r:
            draws.append([np64(t) for t in r])
    assert not np.allclose(draws[0][0], draws[1][0]) and not np.allclose(draws[1][0], draws[2][0])
    assert not np.allclose(draws[2][0], draws[2][1])


def test_draws_have_variance_one_over_S():
    model, opt = tiny(seed=5, K=4, S=25.0)
    draws = []
    for _ in range(2000):
        with opt.sampled_params(train=True) as r:
            draws.append(np64(r[1]))
    draws = np.array(draws)
    assert draws.var() == pytest.approx(1 / 25.0, rel=0.05)
    assert abs(draws.mean()) < 4 * math.sqrt(1 / 25.0 / draws.size)


def test_straight_through_gradient_reaches_the_binary_weight():
    """dLoss/db of a BinaryLinear, derived by hand: for y = (x b^T) * alpha and
    loss = sum(y * c), dLoss/db = (c * alpha)^T x."""
    torch.manual_seed(6)
    layer = BinaryLinear(4, 3).double()
    opt = VISPA(layer.parameters(), lr=0.1, K=2, S=100.0)
    x, c = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    with opt.sampled_params(train=True):
        (layer(x) * c).sum().backward()
        g = np64(layer.weight.grad)
    expected = (np64(c) * np64(layer.alpha)).T @ np64(x)
    np.testing.assert_allclose(g, expected, rtol=1e-12)
    # leaving the context hands it to M (and, scaled by the draw, to Z)
    np.testing.assert_array_equal(np64(opt.state[layer.weight]["M"].grad), g)
    assert layer.weight.grad is None


def reference_sgd(param, grad, buf, lr, momentum, wd):
    """torch.optim.SGD: d = grad + wd * param; buf = d (first step) or momentum * buf + d."""
    d = grad + wd * param
    buf = d.copy() if buf is None else momentum * buf + d
    return param - lr * buf, buf


def run_sample(model, opt, x):
    """One training sample: forward, backward; returns what the optimizer must turn into
    M and Z gradients, read before it does: {binary weight: (r, dLoss/db)}, and the real
    parameters' gradients of this sample alone."""
    reals = [p for p in model.parameters() if not is_binary(p)]
    before = [np64(p.grad) if p.grad is not None else 0.0 for p in reals]
    with opt.sampled_params(train=True) as draws:
        model(x).square().mean().backward()
        seen = {p: (np64(r), np64(p.grad)) for p, r in zip(opt.binary_params(), draws)}
    real = {p: np64(p.grad) - b for p, b in zip(reals, before)}
    return seen, real


@pytest.mark.parametrize("K", [3, 0])
def test_several_steps_match_the_float64_derivation(K):
    """M gets g, Z_k gets sqrt(S) r_k g, the real parameter its own gradient; SGD with
    momentum and weight decay on all of them, over several steps with changing lr."""
    S, momentum, wd = 16.0, 0.9, 1e-2
    model, opt = tiny(seed=7, K=K, S=S, momentum=momentum, weight_decay=wd)
    mine = {p: {k: np64(opt.state[p][k]) for k in ("M", "Z")} for p in binary_params(model)}
    bias, bias_buf = np64(model.bias), None
    bufs = {p: {"M": None, "Z": None} for p in binary_params(model)}
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    for step, lr in enumerate([0.0, 0.05, 0.1, 0.02]):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        seen, real = run_sample(model, opt, x)
        opt.step()
        for p in binary_params(model):
            (r, g), s, b = seen[p], mine[p], bufs[p]
            s["M"], b["M"] = reference_sgd(s["M"], g, b["M"], lr, momentum, wd)
            if K:
                grad_Z = math.sqrt(S) * r.reshape((K,) + (1,) * g.ndim) * g
                s["Z"], b["Z"] = reference_sgd(s["Z"], grad_Z, b["Z"], lr, momentum, wd)
            np.testing.assert_allclose(np64(opt.state[p]["M"]), s["M"], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(np64(opt.state[p]["Z"]), s["Z"], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(np64(opt.state[p]["M_momentum"]), b["M"], rtol=1e-10, atol=1e-12)
        bias, bias_buf = reference_sgd(bias, real[model.bias], bias_buf, lr, momentum, wd)
        np.testing.assert_allclose(np64(model.bias), bias, rtol=1e-10, atol=1e-12)
    if K == 0:
        assert opt.state[model.conv.weight]["Z"].numel() == 0
        assert "Z_momentum" not in opt.state[model.conv.weight]


@pytest.mark.parametrize("N", [1, 2, 3])
def test_N_samples_before_one_step_give_the_average_of_the_per_sample_gradients(N):
    """Monte-Carlo samples or gradient accumulation: each sample's M and Z gradients are
    formed with its own draw r_n, and the step applies the mean over the N samples of
    g_n, sqrt(S) r_n g_n and the real parameters' gradients (not sqrt(S) r_N sum g_n)."""
    S, momentum, wd, lr = 9.0, 0.9, 1e-2, 0.1
    model, opt = tiny(seed=20, K=2, S=S, momentum=momentum, weight_decay=wd, lr=lr)
    start = {p: {k: np64(opt.state[p][k]) for k in ("M", "Z")} for p in binary_params(model)}
    bias0 = np64(model.bias)
    torch.manual_seed(21)
    samples = [run_sample(model, opt, torch.randn(3, 2, 4, 4, dtype=torch.float64)) for _ in range(N)]
    opt.step()
    for p in binary_params(model):
        gM = sum(seen[p][1] for seen, _ in samples) / N
        gZ = sum(math.sqrt(S) * seen[p][0].reshape((2,) + (1,) * seen[p][1].ndim) * seen[p][1]
                 for seen, _ in samples) / N
        M, _ = reference_sgd(start[p]["M"], gM, None, lr, momentum, wd)
        Z, _ = reference_sgd(start[p]["Z"], gZ, None, lr, momentum, wd)
        np.testing.assert_allclose(np64(opt.state[p]["M"]), M, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(np64(opt.state[p]["Z"]), Z, rtol=1e-12, atol=1e-14)
        if N > 1:  # the draws differ, so the last draw times the summed g is another update
            wrong = start[p]["Z"] - lr * (math.sqrt(S) * samples[-1][0][p][0].reshape((2,) + (1,) * M.ndim)
                                          * sum(seen[p][1] for seen, _ in samples) / N)
            assert not np.allclose(np64(opt.state[p]["Z"]), wrong, rtol=1e-6)
    gb = sum(real[model.bias] for _, real in samples) / N
    np.testing.assert_allclose(np64(model.bias), reference_sgd(bias0, gb, None, lr, momentum, wd)[0],
                               rtol=1e-12, atol=1e-14)


def test_an_evaluation_sample_between_backward_and_step_leaves_the_update_alone():
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    results = []
    for evaluate_in_between in (False, True):
        model, opt = tiny(seed=10)
        with opt.sampled_params(train=True):
            model(x).sum().backward()
        if evaluate_in_between:
            with torch.no_grad(), opt.sampled_params():
                model(x)
        opt.step()
        results.append([np64(opt.state[p][k]) for p in binary_params(model) for k in ("M", "Z")])
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


def test_K0_samples_are_the_sign_of_the_mean():
    model, opt = tiny(seed=8, K=0)
    with opt.sampled_params(train=True):
        pass
    for p in binary_params(model):
        np.testing.assert_array_equal(np64(p), np.sign(np64(opt.state[p]["M"])))


def test_mean_params_writes_sign_of_M():
    model, opt = tiny(seed=9)
    with opt.sampled_params():
        pass
    with opt.mean_params():
        for p in binary_params(model):
            np.testing.assert_array_equal(np64(p), np.sign(np64(opt.state[p]["M"])))


def test_step_without_a_training_sample_is_an_error():
    model, opt = tiny(seed=11)
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()


def test_sphere_projection_enforces_the_constraint_after_each_step():
    S = 9.0
    model, opt = tiny(seed=12, K=2, S=S, projection="sphere")
    plain_model, plain = tiny(seed=12, K=2, S=S)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    with opt.sampled_params(train=True) as draws:
        model(x).sum().backward()
    with plain.sampled_params(train=True, draws=draws):
        plain_model(x).sum().backward()
    opt.step()
    plain.step()
    for p, q in zip(binary_params(model), binary_params(plain_model)):
        M, Z = np64(opt.state[p]["M"]), np64(opt.state[p]["Z"])
        np.testing.assert_allclose(M ** 2 + (Z ** 2).sum(0) / S, 1.0, rtol=1e-12)
        M0, Z0 = np64(plain.state[q]["M"]), np64(plain.state[q]["Z"])
        norm = np.sqrt(M0 ** 2 + (Z0 ** 2).sum(0) / S)
        np.testing.assert_allclose(M, M0 / norm, rtol=1e-12)
        np.testing.assert_allclose(Z, Z0 / norm, rtol=1e-12)
    # without the option the stored tensors are far from the constraint, as in the released code
    M0, Z0 = (np64(plain.state[plain_model.fc.weight][k]) for k in ("M", "Z"))
    assert not np.allclose(M0 ** 2 + (Z0 ** 2).sum(0) / S, 1.0)


def test_state_dict_round_trip_restores_the_distribution_and_the_future():
    model, opt = tiny(seed=13)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    for _ in range(2):
        opt.zero_grad()
        with opt.sampled_params(train=True):
            model(x).sum().backward()
        opt.step()
    other_model, other = tiny(seed=99)
    restore_through_a_file(model, opt, other_model, other)
    for p, q in zip(model.parameters(), other_model.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, other.state[q][key]), key
    for p, q in zip(binary_params(model), binary_params(other_model)):
        assert torch.equal(q, torch.sign(other.state[q]["M"]))  # loading writes the mean network

    for net, optimizer in ((model, opt), (other_model, other)):  # the same draws follow
        optimizer.zero_grad()
        with optimizer.sampled_params(train=True):
            net(x).sum().backward()
        optimizer.step()
    for p, q in zip(model.parameters(), other_model.parameters()):
        assert torch.equal(p, q)
        for key, value in opt.state[p].items():
            assert torch.equal(value, other.state[q][key]), key


def test_state_dict_of_another_K_is_refused_with_the_shapes():
    model, opt = tiny(seed=14, K=3)
    _, other = tiny(seed=14, K=2)
    with pytest.raises(ValueError, match=r"Z has shape \(2,"):
        opt.load_state_dict(other.state_dict())


def test_parameter_groups_may_differ_in_K_and_S():
    """Each group samples with its own K and S and scales its Z gradient by its own sqrt(S)."""
    torch.manual_seed(15)
    model = Tiny().double()
    opt = VISPA([{"params": [model.conv.weight, model.conv.alpha], "K": 1, "S": 4.0},
                 {"params": [model.fc.weight, model.fc.alpha, model.bias]}], lr=0.1, K=5, S=100.0)
    assert opt.state[model.conv.weight]["Z"].shape[0] == 1
    assert opt.state[model.fc.weight]["Z"].shape[0] == 5
    conv_draws, fc_draws = [], []
    for _ in range(1500):
        with opt.sampled_params() as draws:
            conv_draws.append(np64(draws[0]))
            fc_draws.append(np64(draws[1]))
    assert np.var(conv_draws) == pytest.approx(1 / 4.0, rel=0.1)
    assert np.var(fc_draws) == pytest.approx(1 / 100.0, rel=0.1)

    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with opt.sampled_params(train=True) as draws:
        model(x).sum().backward()
        g = [np64(p.grad) for p in binary_params(model)]
    for p, gp, r, S in zip(binary_params(model), g, draws, (4.0, 100.0)):
        expected = math.sqrt(S) * np64(r).reshape((-1,) + (1,) * gp.ndim) * gp
        np.testing.assert_allclose(np64(opt.state[p]["Z"].grad), expected, rtol=1e-12)
        np.testing.assert_array_equal(np64(opt.state[p]["M"].grad), gp)


def test_draws_come_from_the_optimizers_own_seeded_generator():
    """The same seed gives the same draws whatever else draws random numbers in between
    (the data pipeline); another seed gives others."""
    torch.manual_seed(0)
    first, second, third = (VISPA(Tiny().double().parameters(), lr=0.1, K=3, seed=s) for s in (5, 5, 6))
    for i in range(3):
        with first.sampled_params() as d1:
            pass
        torch.randn(1000)  # other users of torch's global generator
        with second.sampled_params() as d2:
            pass
        with third.sampled_params() as d3:
            pass
        for r1, r2, r3 in zip(d1, d2, d3):
            assert torch.equal(r1, r2) and not torch.equal(r1, r3)


def test_outside_the_contexts_the_layers_hold_the_mean_network():
    model, opt = tiny(seed=31)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)

    def holds_mean():
        return all(torch.equal(p.detach(), torch.sign(opt.state[p]["M"])) for p in binary_params(model))

    assert holds_mean()
    with opt.sampled_params(train=True):
        assert not holds_mean()
        model(x).sum().backward()
    assert holds_mean()
    opt.step()  # M changed: the layers follow
    assert holds_mean()
    with opt.sampled_params():
        pass
    assert holds_mean()
    with pytest.raises(ZeroDivisionError):  # also when the enclosed code fails
        with opt.sampled_params(train=True):
            model(x).sum().backward()
            1 / 0
    assert holds_mean()
    state = model.state_dict()
    for name, p in model.named_parameters():
        if is_binary(p):
            assert torch.equal(state[name], torch.sign(opt.state[p]["M"]))


def test_a_sample_whose_code_failed_gives_no_gradient():
    model, opt = tiny(seed=32)
    with pytest.raises(ZeroDivisionError):
        with opt.sampled_params(train=True):
            model(torch.randn(2, 2, 4, 4, dtype=torch.float64)).sum().backward()
            1 / 0
    assert all(p.grad is None and opt.state[p]["M"].grad is None for p in binary_params(model))
    with pytest.raises(RuntimeError, match="needs the gradients of a training sample"):
        opt.step()


def test_a_second_optimizer_over_the_same_layers_is_refused():
    """Its M would be the signs the first one wrote, not the layer's initial weight."""
    model, opt = tiny(seed=33)
    with pytest.raises(ValueError, match="already holds signs"):
        VISPA(model.parameters(), lr=0.1)


def test_network_without_binary_weights_is_refused():
    with pytest.raises(ValueError, match="no binary weights.*mark a weight of your own with mark_binary"):
        VISPA(nn.Linear(3, 2).parameters(), lr=0.1)


@pytest.mark.parametrize("bad", [dict(K=-1), dict(S=0.0), dict(lr=-0.1), dict(projection="ball")])
def test_invalid_hyperparameters_are_refused(bad):
    with pytest.raises(ValueError):
        tiny(**bad)


# ---- misuse of the library: refused at once, with what to do --------------------------------------------

@pytest.mark.parametrize("bad", [dict(K=True), dict(K="eight"), dict(K=2.0), dict(S=True), dict(lr="0.1")])
def test_hyperparameters_that_are_not_numbers_of_their_kind_are_refused_by_name(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=f"^{name} must be a"):
        tiny(**bad)


def test_numpy_integers_are_whole_numbers():
    model, opt = tiny(K=np.int64(2))
    assert opt.param_groups[0]["K"] == 2 and type(opt.param_groups[0]["K"]) is int
    assert opt.state[model.conv.weight]["Z"].shape[0] == 2


def test_a_network_converted_after_the_optimizer_was_built_is_named_at_the_first_sample():
    torch.manual_seed(0)
    model = Tiny()
    opt = VISPA(model.parameters(), lr=0.1, K=2)
    model.double()
    with pytest.raises(ValueError, match="the network was converted after VISPA was built"):
        with opt.sampled_params():
            pass


def test_one_group_of_binary_weights_of_two_dtypes_is_refused_at_construction_and_two_groups_work():
    torch.manual_seed(0)
    model = Tiny()
    model.fc.double()
    with pytest.raises(ValueError, match="one parameter group are of several dtypes or devices.*torch.float64"):
        VISPA(model.parameters(), lr=0.1, K=2)
    opt = VISPA([{"params": [model.conv.weight]}, {"params": [model.fc.weight]}, {"params": [model.bias]}], lr=0.1,
                K=2)
    with opt.sampled_params(train=True):
        assert model.conv.weight.dtype == torch.float32 and model.fc.weight.dtype == torch.float64
        assert all(set(w.unique().tolist()) <= {-1.0, 1.0} for w in (model.conv.weight, model.fc.weight))


def test_a_bfloat16_network_samples_and_steps_in_bfloat16():
    torch.manual_seed(0)
    model = Tiny().to(torch.bfloat16)
    opt = VISPA(model.parameters(), lr=0.1, K=2)
    x = torch.randn(4, 2, 4, 4, dtype=torch.bfloat16)
    with opt.sampled_params(train=True):
        model(x).square().mean().backward()
    before = opt.state[model.fc.weight]["M"].clone()
    opt.step()
    M = opt.state[model.fc.weight]["M"]
    assert M.dtype == opt.state[model.fc.weight]["Z"].dtype == torch.bfloat16 and not torch.equal(M, before)
    assert set(model.fc.weight.unique().tolist()) <= {-1.0, 1.0}


def test_a_parameter_listed_twice_is_refused_as_such():
    torch.manual_seed(0)
    model = Tiny()
    with pytest.raises(ValueError, match="a parameter is listed twice"):
        VISPA([model.conv.weight, model.conv.weight, model.fc.weight], lr=0.1)


def test_a_binary_weight_of_zeros_is_refused_as_such():
    torch.manual_seed(0)
    model = Tiny()
    with torch.no_grad():
        model.conv.weight.zero_()
    with pytest.raises(ValueError, match="is all zeros"):
        VISPA(model.parameters(), lr=0.1)


def test_a_zero_dimensional_parameter_cannot_be_marked_binary():
    from models import mark_binary
    with pytest.raises(ValueError, match="at least one dimension, got a 0-d tensor"):
        mark_binary(nn.Parameter(torch.tensor(0.5)))


def test_given_draws_of_the_wrong_shape_are_refused_before_any_weight_is_written():
    model, opt = tiny(K=3)
    before = [p.clone() for p in binary_params(model)]
    with pytest.raises(ValueError, match=r"must be a tensor of shape \(3,\), got \(2,\)"):
        with opt.sampled_params(draws=[torch.zeros(3), torch.zeros(2)]):
            pass
    assert all(torch.equal(a, p) for a, p in zip(before, binary_params(model)))


def test_sampled_contexts_do_not_nest():
    """The inner one's end would leave the outer sample as sign(M): refused, and the outer
    context's sample and gradient are as they would be alone."""
    model, opt = tiny(seed=4)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    with opt.sampled_params(train=True) as draws:
        sample = [p.clone() for p in binary_params(model)]
        with pytest.raises(RuntimeError, match="do not nest"):
            with opt.sampled_params(train=True):
                pass
        with pytest.raises(RuntimeError, match="mean_params\\(\\) inside sampled_params\\(\\)"):
            with opt.mean_params():
                pass
        assert all(torch.equal(a, p) for a, p in zip(sample, binary_params(model)))
        model(x).sum().backward()
    reference, again = tiny(seed=4)
    with again.sampled_params(train=True, draws=draws):
        reference(x).sum().backward()
    for p, q in zip(binary_params(model), binary_params(reference)):
        assert torch.equal(opt.state[p]["M"].grad, again.state[q]["M"].grad)
