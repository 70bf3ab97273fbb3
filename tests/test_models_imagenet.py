"""The authors' four ImageNet networks (docs/networks.md): a one-to-one map onto the
keys of their released files, and their function (forward, and the straight-through
gradient that reaches M) against a float64 derivation written here, from the spec,
on the networks' state_dict tensors."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import BinaryConv2d, is_binary, released
from models.alexnet import alexnet_1w1a, alexnet_1w32a
from models.birealnet import birealnet18
from models.resnet_imagenet import resnet18_imagenet
from optim import VISPA
from helpers import key_list, shapes_and_dtypes

# factory, the K of the authors' recipe, the key list of their file
RELEASED = {
    "alexnet_1w1a": (alexnet_1w1a, 2, "alexnet_1w1a_imagenet_state_dict_keys.txt"),
    "alexnet_1w32a": (alexnet_1w32a, 4, "alexnet_1w32a_imagenet_state_dict_keys.txt"),
    "birealnet18": (birealnet18, 2, "birealnet18_1w1a_imagenet_state_dict_keys.txt"),
    "resnet18_imagenet": (resnet18_imagenet, 4, "resnet18_1w32a_imagenet_state_dict_keys.txt"),
}


def assert_released_layout(factory, model, distributions, K, filename):
    """The network with its distribution in the released layout has exactly the keys (in
    order), shapes and dtypes of the authors' file, and maps back onto a new network."""
    ours = released.to_released(model, distributions)
    expected = key_list(filename)
    assert list(ours) == [key for key, _, _ in expected]
    assert shapes_and_dtypes(ours) == {key: (shape, dtype) for key, shape, dtype in expected}
    back = released.from_released(ours, factory())
    assert back.K == K and not back.dropped
    assert list(back.model_state) == list(model.state_dict())
    for key, (M, Z) in distributions.items():
        assert back.distributions[key][0] is M and back.distributions[key][1] is Z
    return back


@pytest.mark.parametrize("name", ["birealnet18", "resnet18_imagenet"])
def test_resnets_map_one_to_one_onto_the_released_keys(name):
    """At the paper's width, with VISPA's distribution at the recipe's K; the values map back."""
    factory, K, filename = RELEASED[name]
    torch.manual_seed(0)
    model = factory()
    opt = VISPA(model.parameters(), lr=0.1, K=K, S=100.0)
    distributions = {n: (opt.state[p]["M"], opt.state[p]["Z"]) for n, p in model.named_parameters()
                     if is_binary(p)}
    back = assert_released_layout(factory, model, distributions, K, filename)
    for key, value in model.state_dict().items():
        assert torch.equal(back.model_state[key], value), key


@pytest.mark.parametrize("name", ["alexnet_1w1a", "alexnet_1w32a"])
def test_alexnets_map_one_to_one_onto_the_released_keys(name):
    """At the paper's width, by shape only: the network is built on the meta device and
    M, Z are empty tensors of the shapes VISPA gives them (M: the weight's, Z: (K,) +
    the weight's). Building it for real with VISPA takes 1.4-2 GB and several seconds
    (Z alone is 116 M floats at K = 2, 233 M at K = 4) for the same keys."""
    factory, K, filename = RELEASED[name]
    with torch.device("meta"):
        model = factory()
        distributions = {n: (torch.empty_like(p), p.new_empty((K,) + p.shape))
                         for n, p in model.named_parameters() if is_binary(p)}
        assert_released_layout(factory, model, distributions, K, filename)


# ---- the float64 derivation ----------------------------------------------------------------

def batch_norm(x, sd, name, eps=1e-5):
    """Eval mode: (x - running mean) / sqrt(running var + eps) * gamma + beta, per channel."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = sd[f"{name}.running_mean"].view(shape), sd[f"{name}.running_var"].view(shape)
    gamma, beta = sd[f"{name}.weight"].view(shape), sd[f"{name}.bias"].view(shape)
    return (x - mean) / torch.sqrt(var + eps) * gamma + beta


def approx_sign(x):
    """sign(x) forward; backward through Bi-Real's ApproxSign (2x + x^2 on [-1, 0),
    2x - x^2 on [0, 1), +-1 outside), whose derivative is max(0, 2 - 2|x|)."""
    inside = torch.where(x < 0, 2 * x + x * x, 2 * x - x * x)
    smooth = torch.where(x.abs() < 1, inside, torch.sign(x))
    return smooth + (torch.sign(x) - smooth).detach()


def binary_layer(x, sd, b, name, binary_input, stride=1, padding=0):
    """(W_b a + bias) * alpha, with a = sign(x) for 1W1A layers; a linear layer on (N, C)."""
    a = approx_sign(x) if binary_input else x
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if x.dim() == 2:
        out = a @ b[name].flatten(1).T
    else:
        out = F.conv2d(a, b[name], stride=stride, padding=padding)
    if f"{name}.bias" in sd:
        out = out + sd[f"{name}.bias"].view(shape)
    return out * sd[f"{name}.alpha"].view(shape)


def relu(x):
    return x.clamp(min=0)


def hardtanh(x):
    return x.clamp(-1, 1)


# AlexNet's layers by the authors' indices (docs/networks.md, AlexNet): (binary conv, its
# BatchNorm, padding, max-pool after it), (binary fc, its BatchNorm), the last fc
ALEXNET = {
    True: ([("features.3", "features.4", 2, True), ("features.6", "features.7", 1, False),
            ("features.8", "features.9", 1, False), ("features.10", "features.11", 1, True)],
           [("classifier.0", "classifier.1"), ("classifier.2", "classifier.3")], "classifier.4"),
    False: ([("features.4", "features.5", 2, True), ("features.8", "features.9", 1, False),
             ("features.11", "features.12", 1, False), ("features.14", "features.15", 1, True)],
            [("classifier.0", "classifier.1"), ("classifier.3", "classifier.4")], "classifier.6"),
}


def alexnet_reference(x, sd, b, binary_activations):
    """No activation in 1W1A (the binary layers take signs), ReLU after every BatchNorm
    in 1W32A; BatchNorm eps 1e-3 after the binary layers."""
    convs, fcs, last = ALEXNET[binary_activations]
    act = (lambda t: t) if binary_activations else relu
    x = F.conv2d(x, sd["features.0.weight"], sd["features.0.bias"], stride=4, padding=2)
    x = F.max_pool2d(act(batch_norm(x, sd, "features.1")), 3, 2)
    for conv, norm, padding, pooled in convs:
        x = act(batch_norm(binary_layer(x, sd, b, conv, binary_activations, padding=padding), sd, norm, 1e-3))
        if pooled:
            x = F.max_pool2d(x, 3, 2)
    x = x.reshape(x.shape[0], -1)
    for fc, norm in fcs:
        x = act(batch_norm(binary_layer(x, sd, b, fc, binary_activations), sd, norm, 1e-3))
    return x @ sd[f"{last}.weight"].T + sd[f"{last}.bias"]


def resnet_blocks():
    """(block name, its stride, whether it has a downsample) of ResNet18."""
    for stage in range(1, 5):
        for i in range(2):
            stride = 2 if stage > 1 and i == 0 else 1
            yield f"layer{stage}.{i}", stride, stride == 2


def downsample_or_identity(x, sd, block, stride, has_downsample):
    if not has_downsample:
        return x
    x = F.conv2d(x, sd[f"{block}.downsample.0.weight"], stride=stride)
    return batch_norm(x, sd, f"{block}.downsample.1")


def head(x, sd):
    """Global average -> BatchNorm1d bn2 -> fc."""
    x = batch_norm(x.mean(dim=(2, 3)), sd, "bn2")
    return x @ sd["fc.weight"].T + sd["fc.bias"]


def birealnet_reference(x, sd, b):
    """Stem with Hardtanh; a shortcut around each binary conv (inputs binarised), Hardtanh
    after each addition."""
    x = batch_norm(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1")
    x = F.max_pool2d(hardtanh(x), 3, 2, 1)
    for block, stride, has_downsample in resnet_blocks():
        shortcut = downsample_or_identity(x, sd, block, stride, has_downsample)
        h = batch_norm(binary_layer(x, sd, b, f"{block}.conv1", True, stride, 1), sd, f"{block}.bn1")
        x = hardtanh(h + shortcut)
        h = batch_norm(binary_layer(x, sd, b, f"{block}.conv2", True, 1, 1), sd, f"{block}.bn2")
        x = hardtanh(h + x)
    return head(x, sd)


def resnet18_reference(x, sd, b):
    """Stem with ReLU; post-activation blocks with real inputs; bn3 plays no part."""
    x = batch_norm(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1")
    x = F.max_pool2d(relu(x), 3, 2, 1)
    for block, stride, has_downsample in resnet_blocks():
        h = relu(batch_norm(binary_layer(x, sd, b, f"{block}.conv1", False, stride, 1), sd, f"{block}.bn1"))
        h = batch_norm(binary_layer(h, sd, b, f"{block}.conv2", False, 1, 1), sd, f"{block}.bn2")
        x = relu(h + downsample_or_identity(x, sd, block, stride, has_downsample))
    return head(x, sd)


# factory, small width, the derivation
FUNCTION = {
    "alexnet_1w1a": (alexnet_1w1a, 12, lambda x, sd, b: alexnet_reference(x, sd, b, True)),
    "alexnet_1w32a": (alexnet_1w32a, 12, lambda x, sd, b: alexnet_reference(x, sd, b, False)),
    "birealnet18": (birealnet18, 4, birealnet_reference),
    "resnet18_imagenet": (resnet18_imagenet, 4, resnet18_reference),
}


def batchnorms(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def randomise_batchnorms(model, x):
    """Random gamma and beta, then running statistics of one pass over x (the
    mean network, train mode): every BatchNorm shapes the output, while activations
    keep a moderate scale through the depth."""
    momentum = {bn: bn.momentum for bn in batchnorms(model)}
    for bn in momentum:
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0.0, 0.3)
        bn.reset_running_stats()
        bn.momentum = 1.0  # the running statistics become this pass's
    model.train()(x)
    for bn, m in momentum.items():
        bn.momentum = m
    model.eval()


def sampled_weights(opt, draws, names):
    """{layer: sign(M + sum_k r_k Z_k)} from the optimizer's M, Z and the draws, as
    leaves that collect dLoss/db."""
    weights = {}
    for p, r in zip(opt.binary_params(), draws):
        M, Z = opt.state[p]["M"], opt.state[p]["Z"]
        weights[names[p]] = torch.sign(M + torch.tensordot(r, Z, dims=1)).requires_grad_()
    return weights


@pytest.mark.parametrize("name", FUNCTION)
def test_forward_and_gradients_match_the_float64_derivation(name):
    """Eval mode (running statistics), one sample of the binary weights, batch 2 at
    224x224: the logits, M's gradient (dLoss/db through the straight-through
    estimators) and every real parameter's gradient are those of the derivation."""
    factory, width, reference = FUNCTION[name]
    torch.manual_seed(3)
    model = factory(num_classes=10, width=width).double()
    opt = VISPA(model.parameters(), lr=0.1, K=2, S=100.0, seed=4)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    randomise_batchnorms(model, x)
    v = torch.randn(2, 10, dtype=torch.float64)
    names = {p: n.rpartition(".")[0] for n, p in model.named_parameters() if is_binary(p)}
    with opt.sampled_params(train=True) as draws:
        b = sampled_weights(opt, draws, names)
        for p in opt.binary_params():
            assert torch.equal(p, b[names[p]])
        logits = model(x)
        (logits * v).sum().backward()
    sd = {k: t.detach().clone().requires_grad_(t.is_floating_point()) for k, t in model.state_dict().items()}
    expected = reference(x, sd, b)
    (expected * v).sum().backward()
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)
    for p in opt.binary_params():
        torch.testing.assert_close(opt.state[p]["M"].grad, b[names[p]].grad, rtol=1e-10, atol=1e-10)
    for key, p in model.named_parameters():
        if not is_binary(p):  # None for both where the parameter plays no part (ResNet18's bn3)
            torch.testing.assert_close(p.grad, sd[key].grad, rtol=1e-10, atol=1e-10, msg=key)


@pytest.mark.parametrize("name", FUNCTION)
def test_the_stem_is_everything_before_the_first_binary_layer(name):
    """forward = body(stem(x)); the stem runs no binary layer (so it is the same for every
    sample and the L-sample evaluation computes it once) and the body starts with one."""
    factory, width, _ = FUNCTION[name]
    torch.manual_seed(5)
    model = factory(num_classes=10, width=width).eval()
    order = []
    for module in model.modules():
        if not list(module.children()):
            module.register_forward_pre_hook(lambda m, _: order.append(m))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        stem = model.stem(x)
        in_stem = len(order)
        out = model.body(stem)
    assert order[:in_stem] and not any(isinstance(m, BinaryConv2d) for m in order[:in_stem])
    assert isinstance(order[in_stem], BinaryConv2d)
    assert out.shape == (2, 10) and torch.equal(model(x), out)


EPS = {  # BatchNorm eps by name; every other BatchNorm of the network has 1e-5
    "alexnet_1w1a": dict.fromkeys(["features.4", "features.7", "features.9", "features.11",
                                   "classifier.1", "classifier.3"], 1e-3),
    "alexnet_1w32a": dict.fromkeys(["features.5", "features.9", "features.12", "features.15",
                                    "classifier.1", "classifier.4"], 1e-3),
    "birealnet18": {},
    "resnet18_imagenet": {},
}


@pytest.mark.parametrize("name", FUNCTION)
def test_batchnorm_eps_and_momentum(name):
    """AlexNet's BatchNorms after binary layers use eps 1e-3 (it cannot be seen through
    the 1W1A forward, where their outputs only meet a sign); all use momentum 0.1."""
    factory, width, _ = FUNCTION[name]
    model = factory(num_classes=10, width=width)
    eps = {n: m.eps for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert eps == {n: EPS[name].get(n, 1e-5) for n in eps}
    assert {m.momentum for m in batchnorms(model)} == {0.1}


def test_birealnet_batchnorm2d_layers_start_at_gamma_1e_8():
    """All 20 BatchNorm2d (stem, blocks, downsample) start gamma = 1e-8, beta = 0; the
    head's BatchNorm1d keeps gamma = 1."""
    model = birealnet18(num_classes=10, width=4)
    bn2d = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bn2d) == 20
    for bn in bn2d:
        assert torch.equal(bn.weight, torch.full_like(bn.weight, 1e-8)) and not bn.bias.any()
    assert torch.equal(model.bn2.weight, torch.ones_like(model.bn2.weight)) and not model.bn2.bias.any()


@pytest.mark.parametrize("factory, std", [
    (birealnet18, lambda conv: math.sqrt(2 / (conv.in_channels * conv.kernel_size[0] ** 2))),
    (resnet18_imagenet, lambda conv: math.sqrt(2 / (conv.out_channels * conv.kernel_size[0] ** 2))),
])
def test_full_precision_convs_start_as_the_authors_and_binary_ones_keep_xavier(factory, std):
    """At the paper's width: the stem and downsample convs are N(0, std) (BiRealNet:
    Kaiming fan-in; ResNet18: sqrt(2 / (k k out))); the binary convs' weights (the
    initial M) keep Xavier-normal, sqrt(2 / (k k (in + out)))."""
    torch.manual_seed(6)
    model = factory()
    for conv in [m for m in model.modules() if isinstance(m, nn.Conv2d)]:
        k2 = conv.kernel_size[0] ** 2
        xavier = math.sqrt(2 / (k2 * (conv.in_channels + conv.out_channels)))
        target = xavier if isinstance(conv, BinaryConv2d) else std(conv)
        assert abs(conv.weight.std().item() / target - 1) < 0.05, conv


def test_resnet18_bn3_is_registered_last_and_unused():
    """bn3 = BatchNorm1d(num_classes) is in the state_dict (the released files hold it) but
    not in forward: after a training-mode forward and backward it has no gradient and its
    running statistics are untouched."""
    torch.manual_seed(7)
    model = resnet18_imagenet(num_classes=10, width=4).train()
    leaves = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    assert list(model.state_dict())[-5:] == [f"bn3.{k}" for k in leaves]
    model(torch.randn(2, 3, 224, 224)).sum().backward()
    assert model.bn3.weight.grad is None and model.bn3.bias.grad is None
    assert model.bn3.num_batches_tracked == 0 and not model.bn3.running_mean.any()
    assert model.fc.weight.grad is not None
