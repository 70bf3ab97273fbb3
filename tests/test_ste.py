"""The latent-weight STE baseline (Adam on latent weights, the forward pass on their sign,
clipped to [-1, 1] after each step) against a hand-written float64 loop with
torch.optim.Adam and torch.optim.SGD, on tiny networks with fresh random inputs; and its
protocol."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import restore_through_a_file
from models import BinaryConv2d, BinaryLinear, is_binary
from optim.ste import STE


class Small(nn.Module):
    """Two binary layers of different shapes, BatchNorm with affine parameters and a real
    bias, in float64."""

    def __init__(self):
        super().__init__()
        self.conv = BinaryConv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = BinaryLinear(3 * 2 * 2, 2)
        self.bias = nn.Parameter(torch.randn(2))

    def forward(self, x):
        return self.fc(F.max_pool2d(F.relu(self.bn(self.conv(x))), 2).flatten(1)) + self.bias


SETTINGS = dict(lr=0.05, betas=(0.9, 0.999), eps=1e-8, momentum=0.9, weight_decay=1e-3)


def small(seed=0, **kwargs):
    torch.manual_seed(seed)
    model = Small().double()
    return model, STE(model.parameters(), **dict(SETTINGS, seed=seed, **kwargs))


def batch(seed, n=4):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, 4, 4, dtype=torch.float64, generator=g), torch.randint(0, 2, (n,), generator=g)


def binarize(latent):
    """The authors' binarize: +1 where latent >= 0, -1 elsewhere."""
    out = torch.empty_like(latent)
    out[latent >= 0] = 1
    out[latent < 0] = -1
    return out


def test_matches_a_hand_written_adam_loop_with_sign_forward_and_clipping():
    """Steps of one and of two samples (their average), until some latent weights are
    clipped and some signs flipped; every tensor equal to the last bit."""
    networks = []
    for _ in range(2):  # the same network twice (a deep copy would lose the binary marks)
        torch.manual_seed(1)
        networks.append(Small().double())
        with torch.no_grad():
            networks[-1].fc.weight[0, 0] = 1.7  # beyond the clip
    reference, model = networks
    opt = STE(model.parameters(), **SETTINGS)

    binary = [p for p in reference.parameters() if is_binary(p)]
    real = [p for p in reference.parameters() if not is_binary(p)]
    latents = [p.detach().clone() for p in binary]
    assert latents[1][0, 0] == 1.7  # the initial latent weight is not clipped
    for p, lat in zip(opt.binary_params(), latents):
        assert torch.equal(opt.state[p]["latent"], lat)
    adam = torch.optim.Adam(latents, lr=0.05)  # the authors' call: torch's defaults otherwise
    sgd = torch.optim.SGD(real, lr=0.05, momentum=0.9, weight_decay=1e-3)
    initial_signs = [binarize(lat) for lat in latents]

    for t, samples in enumerate([1, 2, 1, 1, 2, 1, 1, 1]):
        opt.zero_grad()
        reference.zero_grad(set_to_none=True)
        for k in range(samples):
            x, y = batch(10 * t + k)
            with torch.no_grad():
                for p, lat in zip(binary, latents):
                    p.copy_(binarize(lat))
            F.cross_entropy(reference(x), y).backward()
            with opt.sampled_params(train=True) as draws:
                assert all(d.numel() == 0 for d in draws) and len(draws) == 2
                F.cross_entropy(model(x), y).backward()
        for p, lat in zip(binary, latents):
            lat.grad = p.grad / samples if samples > 1 else p.grad
        for p in real:
            p.grad = p.grad / samples if samples > 1 else p.grad
        adam.step()
        sgd.step()
        with torch.no_grad():
            for lat in latents:
                lat.clamp_(-1, 1)
        opt.step()

        for p, lat in zip(opt.binary_params(), latents):
            state, expected = opt.state[p], adam.state[lat]
            assert torch.equal(state["latent"], lat)
            assert torch.equal(state["exp_avg"], expected["exp_avg"])
            assert torch.equal(state["exp_avg_sq"], expected["exp_avg_sq"])
            assert torch.equal(state["step"], expected["step"])
            assert torch.equal(p, binarize(lat))
        for p, q in zip((p for p in model.parameters() if not is_binary(p)), real):
            assert torch.equal(p, q)
    assert latents[1][0, 0] == 1  # clipped
    assert any(not torch.equal(binarize(lat), s) for lat, s in zip(latents, initial_signs))  # flipped


def test_every_context_writes_the_sign_of_the_latent_weight_with_plus_one_at_zero():
    model, opt = small(seed=2)
    latent = opt.state[model.fc.weight]["latent"]
    latent[0, 0] = 0.0
    expected = [binarize(opt.state[p]["latent"]) for p in opt.binary_params()]

    def holds_sign():
        return all(torch.equal(p, e) for p, e in zip(opt.binary_params(), expected))

    for context in (opt.sampled_params(train=True), opt.sampled_params(), opt.mean_params()):
        with context:
            assert holds_sign()
    assert model.fc.weight[0, 0] == 1
    with opt.sampled_params(generator=torch.Generator().manual_seed(0), draws=[torch.empty(0)] * 2) as draws:
        assert holds_sign() and [d.numel() for d in draws] == [0, 0]


def test_initial_latent_is_the_layers_weight_and_a_layer_holding_signs_is_refused():
    torch.manual_seed(3)
    model = Small().double()
    initial = [p.detach().clone() for p in model.parameters() if is_binary(p)]
    opt = STE(model.parameters())
    for p, w in zip(opt.binary_params(), initial):
        assert torch.equal(opt.state[p]["latent"], w)
        assert torch.equal(p, binarize(w))
        assert opt.state[p]["step"] == 0 and not opt.state[p]["exp_avg"].any()
    with pytest.raises(ValueError, match="already holds signs"):
        STE(model.parameters())


def train_steps(model, opt, first, count):
    for t in range(first, first + count):
        x, y = batch(1000 + t)
        opt.zero_grad(set_to_none=True)
        for _ in range(2):
            with opt.sampled_params(train=True):
                F.cross_entropy(model(x), y).backward()
        opt.step()


def test_a_resumed_run_continues_bit_for_bit():
    N, k = 6, 2
    model, opt = small(seed=4)
    train_steps(model, opt, 0, N)

    resumed_model, resumed = small(seed=4)
    train_steps(resumed_model, resumed, 0, k)
    fresh_model, fresh = small(seed=55)
    restore_through_a_file(resumed_model, resumed, fresh_model, fresh)
    train_steps(fresh_model, fresh, k, N - k)

    for (name, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items()):
        assert torch.equal(a, b), name
    for p, q in zip(model.parameters(), fresh_model.parameters()):
        assert opt.state[p].keys() == fresh.state[q].keys()
        for key, value in opt.state[p].items():
            assert torch.equal(value, fresh.state[q][key]), key
    assert torch.equal(opt.generator.get_state(), fresh.generator.get_state())


def test_step_needs_a_training_sample_and_a_failed_one_counts_for_nothing():
    model, opt = small(seed=5)
    x, y = batch(5)
    with pytest.raises(RuntimeError, match=r"STE.step\(\) needs the gradients of a training sample"):
        opt.step()
    with pytest.raises(ZeroDivisionError):
        with opt.sampled_params(train=True):
            F.cross_entropy(model(x), y).backward()
            1 / 0
    assert all(p.grad is None and opt.state[p]["latent"].grad is None for p in opt.binary_params())
    with opt.sampled_params():  # an evaluation sample collects nothing
        model(x)
    with pytest.raises(RuntimeError, match="needs the gradients"):
        opt.step()


def test_collected_gradients_are_the_latent_and_real_gradients():
    model, opt = small(seed=6)
    x, y = batch(6)
    with opt.sampled_params(train=True):
        F.cross_entropy(model(x), y).backward()
    grads = opt.collected_gradients()
    expected = [opt.state[p]["latent"].grad for p in opt.binary_params()]
    expected += [p.grad for p in model.parameters() if not is_binary(p)]
    assert len(grads) == len(expected) and all(any(g is e for g in grads) for e in expected)


BAD = [dict(lr=True), dict(lr=-1.0), dict(betas=(0.9,)), dict(betas=(1.0, 0.999)), dict(betas="ab"),
       dict(betas=(0.9, True)), dict(eps=-1.0), dict(eps="x"), dict(momentum=True), dict(weight_decay=-1.0),
       dict(seed=True)]


@pytest.mark.parametrize("bad", BAD, ids=[f"{k}={v!r}" for d in BAD for k, v in d.items()])
def test_invalid_hyperparameters_are_refused_with_their_name(bad):
    (name, _), = bad.items()
    with pytest.raises(ValueError, match=name):
        small(**bad)


def test_load_state_dict_refuses_invalid_hyperparameters_and_another_methods_state():
    model, opt = small(seed=7)
    state = opt.state_dict()
    state["param_groups"][0]["eps"] = True
    with pytest.raises(ValueError, match="eps must be a finite number >= 0, got True"):
        opt.load_state_dict(state)
    from optim.bayesbinn import BayesBiNN
    torch.manual_seed(7)
    other_model = Small().double()
    other = BayesBiNN(other_model.parameters(), train_set_size=10, seed=0)
    with pytest.raises(ValueError, match="latent missing"):
        opt.load_state_dict(other.state_dict())


def test_the_training_engine_runs_it():
    from engine import Ranks, evaluate_mean, train_one_epoch
    model, opt = small(seed=8)
    batches = [batch(200 + i, n=6) for i in range(4)]
    ranks = Ranks(generators=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    result = train_one_epoch(model, opt, batches, lambda i: 1e-3, ranks=ranks)
    assert result["loss"] == result["loss"]
    assert all(opt.state[p]["step"] == 2 for p in opt.binary_params())
    assert evaluate_mean(model, opt, batches)["loss"] == evaluate_mean(model, opt, batches)["loss"]
