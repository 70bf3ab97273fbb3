"""Binary networks by name.

Every network is a plain ``nn.Module`` whose binary layers mark their sign weights
(``is_binary``) for the optimizer, and which splits its forward pass as
``forward(x) = body(stem(x))``: ``stem`` is what comes before the first binary
weight. It does not depend on the sampled binary weights, so the L-sample
evaluation computes it once per batch.
"""
from dataclasses import dataclass
from typing import Callable

from .alexnet import alexnet_1w1a, alexnet_1w32a
from .binary import BinaryConv2d, BinaryLinear, is_binary, mark_binary, sign_activation
from .birealnet import birealnet18
from .resnet import resnet18, resnet18_1w1a
from .resnet_imagenet import resnet18_imagenet
from .vgg import vgg16
from .vgg_small import vgg_small


@dataclass(frozen=True)
class Network:
    build: Callable      # (num_classes, width, image_size) -> nn.Module
    width: int           # the first layer's width in the paper's network
    image_sizes: tuple   # the input sizes it is made for
    mode: str            # "1W32A": binary weights; "1W1A": binary weights and activations


MODELS = {
    "resnet18": Network(resnet18, 64, (32, 64), "1W32A"),
    "vgg16": Network(lambda c, w, s: vgg16(c, w), 64, (32,), "1W32A"),
    "resnet18_1w1a": Network(resnet18_1w1a, 64, (32,), "1W1A"),
    "vgg_small": Network(lambda c, w, s: vgg_small(c, w), 128, (32,), "1W1A"),
    "alexnet_1w1a": Network(lambda c, w, s: alexnet_1w1a(c, w), 96, (224,), "1W1A"),
    "alexnet_1w32a": Network(lambda c, w, s: alexnet_1w32a(c, w), 96, (224,), "1W32A"),
    "birealnet18": Network(lambda c, w, s: birealnet18(c, w), 64, (224,), "1W1A"),
    "resnet18_imagenet": Network(lambda c, w, s: resnet18_imagenet(c, w), 64, (224,), "1W32A"),
}

# Names used by the authors' training code, accepted on the command line.
ALIASES = {
    "resnet18_1w32a_cifar": "resnet18",
    "vgg16_cifar100_sdp": "vgg16",
    "vgg16_cifar10_sdp": "vgg16",
    "resnet18_1w1a_cifar": "resnet18_1w1a",
    "vgg_small_cifar10_sdp": "vgg_small",
    "resnet18_1w1a_recu": "birealnet18",
    "resnet18_1w32a": "resnet18_imagenet",
}


def canonical_name(name: str) -> str:
    """The registry name for ``name`` or one of its aliases; ValueError if unknown."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        known = ", ".join(sorted(MODELS) + sorted(ALIASES))
        raise ValueError(f"unknown model {name!r}; choose one of: {known}")
    return name


def build_model(name: str, num_classes: int, width: int = None, image_size: int = None):
    """The network ``name`` for ``num_classes`` classes, at ``width`` (default: the
    paper's) for images of ``image_size`` pixels (default: the first it is made for)."""
    network = MODELS[canonical_name(name)]
    image_size = image_size or network.image_sizes[0]
    if image_size not in network.image_sizes:
        raise ValueError(f"{name} takes images of {' or '.join(map(str, network.image_sizes))} pixels, "
                         f"not {image_size}")
    return network.build(num_classes, width or network.width, image_size)


from .packed import load_packed  # noqa: E402  (it builds networks with build_model)
