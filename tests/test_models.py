"""The binary ResNet18 and VGG16: shapes, binary weights, and a one-to-one map onto
the state_dict keys of the authors' released checkpoints."""
import os

import pytest
import torch

from models import ALIASES, BinaryConv2d, build_model, canonical_name, is_binary
from optim import VISPA

# The key lists of the released checkpoints (shapes and dtypes), kept beside the tests.
REFERENCE = os.path.join(os.path.dirname(__file__), "reference")
REFERENCE_FILES = {"resnet18": "resnet18_1w32a_cifar100_state_dict_keys.txt",
                   "vgg16": "vgg16_1w32a_cifar100_state_dict_keys.txt"}


def read_reference(model):
    """{key: (shape, dtype)} from the key list of a released checkpoint."""
    keys = {}
    for line in open(os.path.join(REFERENCE, REFERENCE_FILES[model])):
        if line.startswith("#") or not line.strip():
            continue
        name, shape, dtype = line.split()
        keys[name] = (() if shape == "-" else tuple(int(d) for d in shape.split("x")), dtype)
    return keys


def our_keys_in_released_terms(model, opt):
    """Every parameter and buffer of ours, named as the released files name them:
    a binary layer's alpha is <layer>.Alpha, its distribution (in the optimizer) is
    <layer>.M and <layer>.Z; the layer's sign weight has no key of its own."""
    keys = {}
    for name, tensor in model.state_dict().items():
        layer, _, leaf = name.rpartition(".")
        param = dict(model.named_parameters()).get(name)
        if param is not None and is_binary(param):
            for key in ("M", "Z"):
                value = opt.state[param][key]
                keys[f"module.{layer}.{key}"] = (tuple(value.shape), str(value.dtype).replace("torch.", ""))
        elif leaf == "alpha":
            keys[f"module.{layer}.Alpha"] = (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
        else:
            keys[f"module.{name}"] = (tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))
    return keys


@pytest.mark.parametrize("name", ["resnet18", "vgg16"])
def test_parameters_and_buffers_map_one_to_one_onto_the_released_keys(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=100)
    opt = VISPA(model.parameters(), lr=0.1, K=8, S=100.0)
    ours, released = our_keys_in_released_terms(model, opt), read_reference(name)
    assert sorted(set(ours) - set(released)) == []
    assert sorted(set(released) - set(ours)) == []
    assert {k: v for k, v in ours.items() if released[k] != v} == {}


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
    """out = conv(x, b) * alpha with alpha of shape (out, 1, 1), initialised U(0, 1)."""
    torch.manual_seed(2)
    layer = BinaryConv2d(2, 4, 3, padding=1)
    assert layer.alpha.shape == (4, 1, 1) and 0 <= layer.alpha.min() and layer.alpha.max() <= 1
    x = torch.randn(1, 2, 5, 5)
    expected = torch.nn.functional.conv2d(x, layer.weight, padding=1) * layer.alpha.view(1, 4, 1, 1)
    torch.testing.assert_close(layer(x), expected)


def test_aliases_of_the_released_code_name_the_same_networks():
    assert {canonical_name(a) for a in ALIASES} == {"resnet18", "vgg16"}
    with pytest.raises(ValueError, match="unknown model"):
        canonical_name("resnet50")
