"""Binary networks by name.

Every network is a plain ``nn.Module`` whose binary layers mark their sign weights
(``is_binary``) for the optimizer, and which splits its forward pass as
``forward(x) = body(stem(x))``: ``stem`` is what comes before the first binary
weight. It does not depend on the sampled binary weights, so the L-sample
evaluation computes it once per batch.
"""
from .binary import BinaryConv2d, BinaryLinear, is_binary, mark_binary
from .resnet import resnet18
from .vgg import vgg16

MODELS = {"resnet18": resnet18, "vgg16": vgg16}

# Names used by the released training code, accepted on the command line.
ALIASES = {
    "resnet18_1w32a_cifar": "resnet18",
    "vgg16_cifar100_sdp": "vgg16",
    "vgg16_cifar10_sdp": "vgg16",
}


def canonical_name(name: str) -> str:
    """The registry name for ``name`` or one of its aliases; ValueError if unknown."""
    name = ALIASES.get(name, name)
    if name not in MODELS:
        known = ", ".join(sorted(MODELS) + sorted(ALIASES))
        raise ValueError(f"unknown model {name!r}; choose one of: {known}")
    return name


def build_model(name: str, num_classes: int, width: int = 64):
    return MODELS[canonical_name(name)](num_classes=num_classes, width=width)
