"""The fully binary (1W1A) CIFAR networks: VGG-Small and ResNet18 (docs/networks.md).

ResNet18 1W1A is judged by the golden data of the authors' code (test_fidelity.py), and
both networks' keys by the authors' key lists (test_models.py). Here: VGG-Small's
forward and backward passes against a float64 derivation written from the released
layout's tensors alone, the ResNet shortcut's zero padding by hand, which layers are
binary, and the output shapes.
"""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import BinaryConv2d, is_binary, released
from models.resnet import PoolAndPadShortcut, resnet18_1w1a
from models.vgg_small import vgg_small
from optim import VISPA

EPS = 1e-5  # BatchNorm's, from the specification
K, S = 4, 100.0


# ---- VGG-Small, derived from the released layout's tensors -----------------------------------

def approx_sign(x):
    """sign(x) forward; backward through Bi-Real's ApproxSign, the piecewise quadratic
    -1 (x < -1), 2x + x^2 (x < 0), 2x - x^2 (x < 1), 1: its derivative is the
    straight-through estimator of the authors' binary activations."""
    smooth = torch.where(x < 0, 2 * x + x * x, 2 * x - x * x)
    smooth = torch.where(x.abs() >= 1, torch.sign(x), smooth)
    return torch.sign(x).detach() + (smooth - smooth.detach())  # exactly sign(x): 0 is added


def sampled_weight(M, Z, r):
    """sign(M + r.Z) forward, exactly (the binary convs' outputs tie often in the max-pools,
    so a weight off by one rounding would route gradients elsewhere); the identity straight
    through to the latent M + r.Z."""
    latent = M + torch.tensordot(r, Z, dims=1)
    return torch.sign(latent).detach() + (latent - latent.detach())


def batch_norm(x, t, name, training):
    """Batch statistics (biased variance) in training, running statistics in evaluation."""
    if training:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
    else:
        mean, var = t[f"{name}.running_mean"], t[f"{name}.running_var"]
    shape = (1, -1, 1, 1)
    y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + EPS)
    return y * t[f"{name}.weight"].view(shape) + t[f"{name}.bias"].view(shape)


def prelu(x, slope):
    return x.clamp(min=0) + slope.view(1, -1, 1, 1) * x.clamp(max=0)


def vgg_small_reference(x, t, draws, training):
    """VGG-Small 1W1A as docs/networks.md describes it; ``t`` holds the released keys
    (``Alpha``, ``M``, ``Z`` per binary conv) and ``draws[i - 1]`` is conv i's r."""
    x = prelu(batch_norm(F.conv2d(x, t["conv0.weight"], padding=1), t, "bn0", training),
              t["nonlinear0.weight"])
    for i in range(1, 6):
        weight = sampled_weight(t[f"conv{i}.M"], t[f"conv{i}.Z"], draws[i - 1])
        x = F.conv2d(approx_sign(x), weight, padding=1) * t[f"conv{i}.Alpha"].view(1, -1, 1, 1)
        if i in (1, 3, 5):
            x = F.max_pool2d(x, 2)  # before the BatchNorm
        x = prelu(batch_norm(x, t, f"bn{i}", training), t[f"nonlinear{i}.weight"])
    return x.flatten(1) @ t["fc.weight"].T + t["fc.bias"]


@torch.no_grad()
def randomise(model):
    """BatchNorm statistics and scales, PReLU slopes and the linear bias away from their
    initial values, so that every one of them shows in the output."""
    generator = torch.Generator().manual_seed(7)
    ranges = {"running_mean": (-0.2, 0.2), "running_var": (0.5, 2.0), "weight": (0.5, 1.5),
              "bias": (-0.2, 0.2)}
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            for name, (low, high) in ranges.items():
                tensor = getattr(module, name)
                tensor.copy_(low + (high - low) * torch.rand(tensor.shape, generator=generator))
        elif isinstance(module, nn.PReLU):
            module.weight.copy_(0.05 + 0.45 * torch.rand(module.weight.shape, generator=generator))
    model.fc.bias.copy_(0.1 * torch.randn(model.fc.bias.shape, generator=generator))


def small_vgg(width=16):
    """A float64 VGG-Small with VISPA (K = 4), its released-layout tensors as leaves that
    require gradients, and one draw per binary conv."""
    torch.manual_seed(0)
    model = vgg_small(num_classes=10, width=width).double()
    opt = VISPA(model.parameters(), lr=0.1, K=K, S=S)
    randomise(model)
    distributions = {n: (opt.state[p]["M"], opt.state[p]["Z"]) for n, p in model.named_parameters()
                     if is_binary(p)}
    tensors = {key[len(released.PREFIX):]: value.detach().clone().requires_grad_(value.is_floating_point())
               for key, value in released.to_released(model, distributions).items()}
    draws = torch.randn(5, K, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) / math.sqrt(S)
    return model, opt, tensors, draws


def test_vgg_small_evaluation_forward_is_the_specified_network():
    model, opt, t, draws = small_vgg()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        with opt.sampled_params(draws=draws):
            sampled = model(x)
        mean = model(x)
        expected_sampled = vgg_small_reference(x, t, draws, training=False)
        expected_mean = vgg_small_reference(x, t, torch.zeros_like(draws), training=False)
    torch.testing.assert_close(sampled, expected_sampled, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mean, expected_mean, rtol=1e-12, atol=1e-12)
    assert (sampled - mean).abs().max() > 1e-3  # the draws matter


def test_vgg_small_training_gradients_reach_every_tensor_through_both_estimators():
    """Training-mode logits, then the gradient of the loss on every real parameter and on
    M and Z of every binary conv. VISPA's (the authors') are grad M = g and
    grad Z = sqrt(S) r g: sqrt(S) times the derivative of the latent M + r.Z with respect
    to Z. The gradient reaching conv1's M passes through the clipped estimator of four
    binary activations; a fair share of their inputs lies outside [-1, 1], where it is
    zero. (In training mode the BatchNorm after each binary conv cancels its scale, so
    the Alpha gradients are rounding noise near zero: the absolute tolerance covers them.)"""
    model, opt, t, draws = small_vgg()
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = torch.arange(8) % 10
    sign_inputs = []
    hooks = [getattr(model, f"conv{i}").register_forward_pre_hook(
        lambda module, args: sign_inputs.append(args[0].detach())) for i in range(1, 6)]
    model.train()
    opt.zero_grad()
    with opt.sampled_params(train=True, draws=draws):
        logits = model(x)
        F.cross_entropy(logits, y).backward()
    for hook in hooks:
        hook.remove()
    expected_logits = vgg_small_reference(x, t, draws, training=True)
    F.cross_entropy(expected_logits, y).backward()
    torch.testing.assert_close(logits.detach(), expected_logits.detach(), rtol=1e-12, atol=1e-12)

    for value in sign_inputs:
        outside = (value.abs() > 1).double().mean()
        assert 0.05 < outside < 0.95
    for name, p in model.named_parameters():
        layer, _, leaf = name.rpartition(".")
        if is_binary(p):
            state = opt.state[p]
            torch.testing.assert_close(state["M"].grad, t[f"{layer}.M"].grad, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(state["Z"].grad, math.sqrt(S) * t[f"{layer}.Z"].grad,
                                       rtol=1e-10, atol=1e-12)
            assert state["M"].grad.abs().max() > 0
        else:
            key = f"{layer}.Alpha" if leaf == "alpha" else name
            torch.testing.assert_close(p.grad, t[key].grad, rtol=1e-10, atol=1e-12, msg=name)


# ---- ResNet18's shortcut ------------------------------------------------------------------------

def test_the_shortcut_pools_and_puts_the_input_between_zero_channels_on_both_sides():
    """4 -> 8 channels: pad = (8 - 4) / 2 = 2 zero channels each side; channels 2..5 hold
    the 2x2 averages, written out entry by entry."""
    x = torch.arange(2 * 4 * 4 * 4, dtype=torch.float64).view(2, 4, 4, 4) ** 1.5
    out = PoolAndPadShortcut(4, 8)(x)
    assert out.shape == (2, 8, 2, 2)
    for n in range(2):
        for c in range(8):
            for i in range(2):
                for j in range(2):
                    if 2 <= c < 6:
                        a = x[n, c - 2]
                        expected = (a[2 * i, 2 * j] + a[2 * i + 1, 2 * j] + a[2 * i, 2 * j + 1]
                                    + a[2 * i + 1, 2 * j + 1]) / 4
                    else:
                        expected = 0.0
                    assert out[n, c, i, j].item() == pytest.approx(float(expected), rel=1e-15)


@pytest.mark.parametrize("width", [2, 8, 64])
def test_the_padding_is_the_authors_planes_over_4_and_leaves_no_keys(width):
    """The authors pad ``planes // 4`` each side; the width doubles at every projected
    shortcut, so that is (planes - in_planes) / 2 for every even width."""
    model = resnet18_1w1a(width=width)
    shortcuts = {name: m for name, m in model.named_modules() if isinstance(m, PoolAndPadShortcut)}
    assert sorted(shortcuts) == ["layer2.0.shortcut", "layer3.0.shortcut", "layer4.0.shortcut"]
    for name, shortcut in shortcuts.items():
        planes = width * 2 ** (int(name[5]) - 1)  # layerN: width * 2^(N-1)
        assert shortcut.pad == planes // 4
    assert not any("shortcut" in key for key in model.state_dict())


def test_an_odd_width_cannot_be_padded_evenly():
    with pytest.raises(ValueError, match="evenly on both sides"):
        resnet18_1w1a(width=5)


# ---- which layers are binary; BatchNorm and PReLU settings; shapes --------------------------

def binary_layers(model):
    return [name for name, m in model.named_modules() if isinstance(m, BinaryConv2d)]


def test_vgg_small_binarises_the_five_middle_convs_and_their_inputs():
    model = vgg_small(width=16)
    assert binary_layers(model) == [f"conv{i}" for i in range(1, 6)]
    assert all(getattr(model, f"conv{i}").binarize_input for i in range(1, 6))
    assert type(model.conv0) is nn.Conv2d and model.conv0.bias is None
    assert type(model.fc) is nn.Linear and model.fc.in_features == 64 * 16
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6 and all(bn.momentum == 0.1 and bn.eps == EPS and bn.affine for bn in norms)
    for i, channels in enumerate([16, 16, 32, 32, 64, 64]):
        slope = getattr(model, f"nonlinear{i}").weight
        assert torch.equal(slope, torch.full((channels,), 0.25))


def test_resnet18_1w1a_binarises_every_block_conv_and_its_input():
    model = resnet18_1w1a(width=8)
    binary = binary_layers(model)
    assert len(binary) == 16 and all(model.get_submodule(n).binarize_input for n in binary)
    assert [n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)] == ["conv1", "linear"]


@pytest.mark.parametrize("factory, widths", [(vgg_small, (128, 16)), (resnet18_1w1a, (64, 8))])
@pytest.mark.parametrize("classes", [10, 100])
def test_output_shape_and_the_stem_body_split(factory, widths, classes):
    for width in widths:
        model = factory(num_classes=classes, width=width).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            out = model(x)
            assert out.shape == (2, classes)
            assert torch.equal(model.body(model.stem(x)), out)
