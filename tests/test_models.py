"""The binary ResNet18 and VGG16: shapes, binary weights, and a one-to-one map onto
the state_dict keys of the authors' released checkpoints (the 1W1A networks too)."""

import numpy as np
import pytest
import torch

from models import ALIASES, BinaryConv2d, build_model, canonical_name, is_binary, released
from models.resnet import resnet18, resnet18_1w1a
from models.vgg import vgg16
from models.vgg_small import vgg_small
from optim import VISPA
from helpers import key_list, shapes_and_dtypes

# The key lists of the authors' checkpoints (shapes and dtypes, in tests/reference/), with
# the network, number of classes and rank K of the configuration they list.
RELEASED_LAYOUTS = {
    "resnet18": (resnet18, 100, 8, "resnet18_1w32a_cifar100_state_dict_keys.txt"),
    "vgg16": (vgg16, 100, 8, "vgg16_1w32a_cifar100_state_dict_keys.txt"),
    "resnet18_1w1a": (resnet18_1w1a, 10, 4, "resnet18_1w1a_cifar10_state_dict_keys.txt"),
    "vgg_small": (vgg_small, 10, 4, "vgg-small_1w1a_cifar10_state_dict_keys.txt"),
    "resnet18 tiny-imagenet": (lambda num_classes: resnet18(num_classes, image_size=64), 200, 8,
                               "resnet18_1w32a_tiny-imagenet_state_dict_keys.txt"),
}


@pytest.mark.parametrize("name", sorted(RELEASED_LAYOUTS))
def test_parameters_and_buffers_map_one_to_one_onto_the_released_keys(name):
    """Our network and its distribution in the released layout (models/released.py) have
    exactly the keys, shapes and dtypes of the authors' files, and map back."""
    factory, classes, K, filename = RELEASED_LAYOUTS[name]
    torch.manual_seed(0)
    model = factory(num_classes=classes)
    opt = VISPA(model.parameters(), lr=0.1, K=K, S=100.0)
    distributions = {n: (opt.state[p]["M"], opt.state[p]["Z"]) for n, p in model.named_parameters()
                     if is_binary(p)}
    ours = released.to_released(model, distributions)
    expected = {key: (shape, dtype) for key, shape, dtype in key_list(filename)}
    assert list(ours) == list(expected)  # the same keys in the same order
    assert shapes_and_dtypes(ours) == expected
    back = released.from_released(ours, factory(num_classes=classes))
    assert back.K == K and not back.dropped
    for key, value in model.state_dict().items():
        assert torch.equal(back.model_state[key], value), key
    for key, (M, Z) in distributions.items():
        assert back.distributions[key][0] is M and back.distributions[key][1] is Z


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
@pytest.mark.parametrize("classes", [10, 100])
def test_output_shape(name, classes):
    model = build_model(name, num_classes=classes, width=8)
    assert model(torch.randn(3, 3, 32, 32)).shape == (3, classes)
    assert torch.equal(model.body(model.stem(torch.zeros(2, 3, 32, 32))), model(torch.zeros(2, 3, 32, 32)))


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_binary_weights_are_exactly_plus_minus_one_when_sampled(name):
    torch.manual_seed(1)
    model = build_model(name, num_classes=10, width=8)
    opt = VISPA(model.parameters(), lr=0.1, K=4, S=100.0)
    binary = [m.weight for m in model.modules() if isinstance(m, BinaryConv2d)]
    assert len(binary) == 16  # ResNet18: 8 blocks x 2 convs; VGG16: 13 convs + 3 classifier layers
    for context in (opt.sampled_params(), opt.mean_params()):
        with context:
            for w in binary:
                assert set(w.unique().tolist()) == {-1.0, 1.0}


def test_resnet18_real_layers_are_the_stem_shortcuts_and_classifier():
    model = build_model("resnet18", num_classes=100, width=8)
    real_convs = [name for name, m in model.named_modules()
                  if isinstance(m, torch.nn.Conv2d) and not isinstance(m, BinaryConv2d)]
    assert real_convs == ["conv1", "layer2.0.shortcut.0", "layer3.0.shortcut.0", "layer4.0.shortcut.0"]
    assert not any(is_binary(p) for p in model.linear.parameters())


def test_binary_layer_scales_each_output_channel():
    """out[o, i, j] = alpha[o] * sum_{c, u, v} b[o, c, u, v] x_padded[c, i + u, j + v], written
    out with loops in float64; alpha of shape (out, 1, 1) starts U(0, 1)."""
    torch.manual_seed(2)
    layer = BinaryConv2d(2, 4, 3, padding=1).double()
    assert layer.alpha.shape == (4, 1, 1) and 0 <= layer.alpha.min() and layer.alpha.max() <= 1
    opt = VISPA(layer.parameters(), lr=0.1, K=2)  # the layer now holds sign(M)
    b, alpha = layer.weight.detach().numpy(), layer.alpha.detach().numpy().reshape(4)
    assert set(np.unique(b)) == {-1.0, 1.0}
    x = np.random.default_rng(3).normal(size=(2, 5, 5))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)))
    expected = np.zeros((4, 5, 5))
    for o in range(4):
        for i in range(5):
            for j in range(5):
                expected[o, i, j] = alpha[o] * sum(b[o, c, u, v] * padded[c, i + u, j + v]
                                                   for c in range(2) for u in range(3) for v in range(3))
    with torch.no_grad():
        out = layer(torch.from_numpy(x)[None])[0].numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    assert opt.state[layer.weight]["M"].shape == (4, 2, 3, 3)


def test_aliases_of_the_released_code_name_the_same_networks():
    """The authors' factory names (docs/networks.md, Registry) name ours."""
    assert {a: canonical_name(a) for a in ALIASES} == {
        "resnet18_1w32a_cifar": "resnet18", "vgg16_cifar100_sdp": "vgg16", "vgg16_cifar10_sdp": "vgg16",
        "resnet18_1w1a_cifar": "resnet18_1w1a", "vgg_small_cifar10_sdp": "vgg_small",
        "resnet18_1w1a_recu": "birealnet18", "resnet18_1w32a": "resnet18_imagenet"}
    with pytest.raises(ValueError, match="unknown model"):
        canonical_name("resnet50")


# ---- the 1W1A parts ---------------------------------------------------------------------------

def test_sign_activation_forward_and_its_straight_through_gradient():
    """Forward sign(x) with sign(0) = 0; backward g * max(0, 2 - 2|x|), derived by hand at
    points inside, on the edge of and outside [-1, 1], in float64."""
    from models.binary import sign_activation
    x = torch.tensor([-1.5, -1.0, -0.75, -0.25, 0.0, 0.1, 0.5, 1.0, 2.0], dtype=torch.float64,
                     requires_grad=True)
    g = torch.linspace(-2, 3, 9, dtype=torch.float64)
    y = sign_activation(x)
    assert y.tolist() == [-1, -1, -1, -1, 0, 1, 1, 1, 1]
    y.backward(g)
    slope = [0.0, 0.0, 0.5, 1.5, 2.0, 1.8, 1.0, 0.0, 0.0]  # 2 - 2|x|, clipped at 0
    np.testing.assert_allclose(x.grad.numpy(), g.numpy() * np.array(slope), rtol=1e-15, atol=0)


def test_a_1w1a_layer_binarises_its_input_and_adds_its_bias_before_the_scale():
    """out = (conv(sign(x), b) + bias) * alpha, against loops in float64; the weight's
    gradient is the identity straight-through (dLoss/db), the input's the clipped one."""
    torch.manual_seed(4)
    layer = BinaryConv2d(2, 3, 3, padding=1, bias=True, binarize_input=True).double()
    assert 0 <= layer.bias.min() and layer.bias.max() <= 1
    VISPA(layer.parameters(), lr=0.1, K=2)
    b = layer.weight.detach().numpy()
    alpha, bias = layer.alpha.detach().numpy().reshape(3), layer.bias.detach().numpy()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    padded = np.pad(np.sign(x.detach().numpy()[0]), ((0, 0), (1, 1), (1, 1)))
    expected = np.array([[[alpha[o] * (bias[o] + sum(b[o, c, u, v] * padded[c, i + u, j + v]
                                                      for c in range(2) for u in range(3) for v in range(3)))
                           for j in range(4)] for i in range(4)] for o in range(3)])
    out = layer(x)
    np.testing.assert_allclose(out[0].detach().numpy(), expected, rtol=1e-12, atol=1e-12)
    out.sum().backward()
    slope = np.clip(2 - 2 * np.abs(x.detach().numpy()), 0, None)
    # d out / d sign(x) summed over outputs: sum_o alpha_o * sum of b over the taps that see the pixel
    through = torch.nn.functional.conv_transpose2d(torch.ones(1, 3, 4, 4, dtype=torch.float64) *
                                                   layer.alpha.detach().view(1, 3, 1, 1),
                                                   layer.weight.detach(), padding=1).numpy()
    np.testing.assert_allclose(x.grad.numpy(), through * slope, rtol=1e-12, atol=1e-12)


def test_a_1x1_layer_on_features_is_a_linear_layer():
    torch.manual_seed(5)
    layer = BinaryConv2d(6, 4, 1, bias=True).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    expected = (x @ layer.weight.detach().view(4, 6).T + layer.bias.detach()) * layer.alpha.detach().view(4)
    torch.testing.assert_close(layer(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x.view(3, 6, 1, 1)).view(3, 4), expected, rtol=1e-12, atol=1e-12)


def test_the_tiny_imagenet_resnet18_has_a_stride_2_stem():
    """The authors' network for 64x64 images (docs/networks.md, Tiny-ImageNet ResNet18): the stem conv strides by 2,
    so that layer4 sees 4x4 maps as on CIFAR."""
    model = build_model("resnet18", 200, 8, image_size=64)
    assert model.conv1.stride == (2, 2) and build_model("resnet18", 10, 8).conv1.stride == (1, 1)
    assert model.stem(torch.zeros(2, 3, 64, 64)).shape == (2, 8, 32, 32)
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 200)
    with pytest.raises(ValueError, match="takes images of 32 pixels, not 64"):
        build_model("vgg16", 200, 8, image_size=64)


def test_a_deep_copy_keeps_the_binary_marks_so_an_averaged_model_knows_its_binary_weights():
    """torch.optim.swa_utils.AveragedModel, an EMA or a teacher is a deepcopy, which
    rebuilds every Parameter without its attributes."""
    import copy
    from torch.optim.swa_utils import AveragedModel
    torch.manual_seed(0)
    model = resnet18(num_classes=10, width=4)
    marked = [name for name, p in model.named_parameters() if is_binary(p)]
    assert marked
    for copied in (copy.deepcopy(model), AveragedModel(model).module):
        assert [name for name, p in copied.named_parameters() if is_binary(p)] == marked
    twin = copy.deepcopy(model)  # a fresh network's copy trains as the network does
    x = torch.randn(2, 3, 32, 32)
    for net in (model, twin):
        torch.manual_seed(5)  # Z's initial draw
        opt = VISPA(net.parameters(), lr=0.1, K=2, seed=3)
        with opt.sampled_params(train=True):
            net(x).sum().backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
