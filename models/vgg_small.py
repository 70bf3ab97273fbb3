"""CIFAR VGG-Small with binary weights and binary activations (1W1A), the authors'
``vgg_small_cifar10_sdp``.

A full-precision first conv (``conv0`` -> ``bn0`` -> PReLU) on the real image; five
binary 3x3 convs that binarise their input (sign, with the clipped straight-through
estimator of ``sign_activation``), each followed by BatchNorm and PReLU, with a 2x2
max-pool after conv1, conv3 and conv5 applied to the conv output BEFORE its
BatchNorm; then a full-precision linear layer on the real, flattened features.
Module names (conv0..conv5, bn0..bn5, nonlinear0..nonlinear5, fc) and their order
match the authors' state_dict. Every BatchNorm and PReLU keeps PyTorch's defaults
(momentum 0.1, affine; slope 0.25 per channel), and ``conv0`` and ``fc`` PyTorch's
default initialisation: the authors define an ``init_model`` but never call it.
"""
import torch.nn as nn

from .binary import BinaryConv2d

# Output channels of conv0..conv5 at width 128 (the paper's network).
CHANNELS = [128, 128, 256, 256, 512, 512]
POOLED = {1, 3, 5}  # the binary convs whose output is max-pooled before its BatchNorm


class VGGSmall(nn.Module):
    """``width`` scales every layer (128 = the paper's network; smaller for quick
    runs); the linear layer's in-features follow (the last width x 4 x 4)."""

    def __init__(self, num_classes=10, width=128):
        super().__init__()
        channels = [c * width // 128 for c in CHANNELS]
        self.conv0 = nn.Conv2d(3, channels[0], 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(channels[0])
        self.nonlinear0 = nn.PReLU(channels[0])
        for i in range(1, 6):
            self.add_module(f"conv{i}", BinaryConv2d(channels[i - 1], channels[i], 3, padding=1,
                                                     binarize_input=True))
            self.add_module(f"bn{i}", nn.BatchNorm2d(channels[i]))
            self.add_module(f"nonlinear{i}", nn.PReLU(channels[i]))
        self.pooling = nn.MaxPool2d(2)  # no parameters: no state_dict keys
        self.fc = nn.Linear(channels[-1] * 4 * 4, num_classes)  # 32 / 2^3 = 4 on CIFAR

    def stem(self, x):
        """The full-precision layer before the first binary weight: the same for every
        sample of the binary weights, so L-sample evaluation computes it once."""
        return self.nonlinear0(self.bn0(self.conv0(x)))

    def body(self, x):
        for i in range(1, 6):
            x = getattr(self, f"conv{i}")(x)
            if i in POOLED:
                x = self.pooling(x)
            x = getattr(self, f"nonlinear{i}")(getattr(self, f"bn{i}")(x))
        return self.fc(x.flatten(1))

    def forward(self, x):
        return self.body(self.stem(x))


def vgg_small(num_classes=10, width=128):
    """The authors' VGG-Small 1W1A for CIFAR-10 (docs/networks.md)."""
    return VGGSmall(num_classes, width)
