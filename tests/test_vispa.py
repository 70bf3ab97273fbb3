"""The VISPA optimizer against an independent float64 derivation (numpy), on small
tensors with fresh random values."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import BinaryConv2d, BinaryLinear
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
    with opt.sampled_params(train=True):
        pass
    for p in binary_params(model):
        state = opt.state[p]
        M, Z, r = np64(state["M"]), np64(state["Z"]), np64(state["r"])
        assert r.shape == (3,)
        mask = far_from_zero(M, Z, r)
        assert mask.mean() > 0.99
        np.testing.assert_array_equal(np64(p)[mask], expected_sample(M, Z, r)[mask])


def test_one_draw_per_tensor_not_per_entry():
    """With a single shared r, b = sign(M + r.Z) holds for every entry; draws per entry
    would break it for about half of the entries where the Z term dominates."""
    model, opt = tiny(seed=3, K=2, S=1.0)
    for p in binary_params(model):  # make the factor dominate the mean
        opt.state[p]["Z"].mul_(100)
    with opt.sampled_params(train=True):
        pass
    for p in binary_params(model):
        M, Z, r = (np64(opt.state[p][k]) for k in ("M", "Z", "r"))
        np.testing.assert_array_equal(np64(p), expected_sample(M, Z, r))
        independent = np.sign(M + np.einsum("k...,k...->...", np.random.default_rng(0).normal(size=Z.shape), Z))
        assert (independent != np64(p)).mean() > 0.2


def test_every_forward_pass_gets_a_fresh_draw():
    model, opt = tiny(seed=4)
    draws = []
    for _ in range(3):
        with opt.sampled_params(train=True):
            draws.append(np64(opt.state[model.conv.weight]["r"]))
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[1], draws[2])
    assert not np.allclose(np64(opt.state[model.conv.weight]["r"]), np64(opt.state[model.fc.weight]["r"]))


def test_draws_have_variance_one_over_S():
    model, opt = tiny(seed=5, K=4, S=25.0)
    draws = []
    for _ in range(2000):
        with opt.sampled_params(train=True):
            draws.append(np64(opt.state[model.fc.weight]["r"]))
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
    expected = (np64(c) * np64(layer.alpha)).T @ np64(x)
    np.testing.assert_allclose(np64(layer.weight.grad), expected, rtol=1e-12)


def reference_sgd(param, grad, buf, lr, momentum, wd):
    """torch.optim.SGD: d = grad + wd * param; buf = d (first step) or momentum * buf + d."""
    d = grad + wd * param
    buf = d.copy() if buf is None else momentum * buf + d
    return param - lr * buf, buf


@pytest.mark.parametrize("K", [3, 0])
def test_several_steps_match_the_float64_derivation(K):
    """M gets g, Z_k gets sqrt(S) r_k g, the real parameter its own gradient; SGD with
    momentum and weight decay on all of them, over several steps with changing lr."""
    S, momentum, wd = 16.0, 0.9, 1e-2
    model, opt = tiny(seed=7, K=K, S=S, momentum=momentum, weight_decay=wd)
    mine = {id(p): {k: np64(v) for k, v in opt.state[p].items() if k in ("M", "Z")}
            for p in binary_params(model)}
    bias, bias_buf = np64(model.bias), None
    bufs = {id(p): {"M": None, "Z": None} for p in binary_params(model)}
    x = torch.randn(4, 2, 4, 4, dtype=torch.float64)
    for step, lr in enumerate([0.0, 0.05, 0.1, 0.02]):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        with opt.sampled_params(train=True):
            model(x).square().mean().backward()
        grads = {id(p): np64(p.grad) for p in binary_params(model)}
        draws = {id(p): np64(opt.state[p]["r"]) for p in binary_params(model)}
        bias_grad = np64(model.bias.grad)
        opt.step()
        for p in binary_params(model):
            g, r, s, b = grads[id(p)], draws[id(p)], mine[id(p)], bufs[id(p)]
            s["M"], b["M"] = reference_sgd(s["M"], g, b["M"], lr, momentum, wd)
            if K:
                grad_Z = math.sqrt(S) * r.reshape((K,) + (1,) * g.ndim) * g
                s["Z"], b["Z"] = reference_sgd(s["Z"], grad_Z, b["Z"], lr, momentum, wd)
            np.testing.assert_allclose(np64(opt.state[p]["M"]), s["M"], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(np64(opt.state[p]["Z"]), s["Z"], rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(np64(opt.state[p]["M_momentum"]), b["M"], rtol=1e-10, atol=1e-12)
        bias, bias_buf = reference_sgd(bias, bias_grad, bias_buf, lr, momentum, wd)
        np.testing.assert_allclose(np64(model.bias), bias, rtol=1e-10, atol=1e-12)
    if K == 0:
        assert opt.state[model.conv.weight]["Z"].numel() == 0
        assert "Z_momentum" not in opt.state[model.conv.weight]


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


def test_evaluation_draws_do_not_replace_the_training_draw():
    model, opt = tiny(seed=10)
    with opt.sampled_params(train=True):
        model(torch.randn(2, 2, 4, 4, dtype=torch.float64)).sum().backward()
    recorded = np64(opt.state[model.fc.weight]["r"])
    with opt.sampled_params():
        pass
    np.testing.assert_array_equal(np64(opt.state[model.fc.weight]["r"]), recorded)


def test_step_without_a_training_sample_is_an_error():
    model, opt = tiny(seed=11)
    with pytest.raises(RuntimeError, match="sampled_params"):
        opt.step()


def test_sphere_projection_enforces_the_constraint_after_each_step():
    S = 9.0
    model, opt = tiny(seed=12, K=2, S=S, projection="sphere")
    plain_model, plain = tiny(seed=12, K=2, S=S)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    torch.manual_seed(0)
    with opt.sampled_params(train=True):
        model(x).sum().backward()
    torch.manual_seed(0)
    with plain.sampled_params(train=True):
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
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    other_model, other = tiny(seed=99)
    other_model.load_state_dict(saved["model"])
    other.load_state_dict(saved["opt"])
    for p, q in zip(model.parameters(), other_model.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, other.state[q][key]), key
    for p, q in zip(binary_params(model), binary_params(other_model)):
        assert torch.equal(q, torch.sign(other.state[q]["M"]))  # loading writes the mean network

    for net, optimizer in ((model, opt), (other_model, other)):
        torch.manual_seed(5)
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
    torch.manual_seed(15)
    model = Tiny().double()
    opt = VISPA([{"params": [model.conv.weight, model.conv.alpha], "K": 1, "S": 4.0},
                 {"params": [model.fc.weight, model.fc.alpha, model.bias]}], lr=0.1, K=5, S=100.0)
    assert opt.state[model.conv.weight]["Z"].shape[0] == 1
    assert opt.state[model.fc.weight]["Z"].shape[0] == 5


def test_network_without_binary_weights_is_refused():
    with pytest.raises(ValueError, match="no binary weights"):
        VISPA(nn.Linear(3, 2).parameters(), lr=0.1)


@pytest.mark.parametrize("bad", [dict(K=-1), dict(S=0.0), dict(lr=-0.1), dict(projection="ball")])
def test_invalid_hyperparameters_are_refused(bad):
    with pytest.raises(ValueError):
        tiny(**bad)
