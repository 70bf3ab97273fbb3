"""The authors' ImageNet ResNet18 with binary weights and real activations (1W32A,
docs/networks.md, their ``resnet18_1w32a``).

The ImageNet ResNet, not the CIFAR one of ``resnet.py``: a 7x7/2 stem conv ->
BatchNorm -> ReLU -> 3x3/2 max-pool, and a 1x1/2 full-precision conv -> BatchNorm
(affine) on the shortcut of the first block of stages 2-4 (``downsample``). The 16
block convs are binary with real inputs; the stem, the downsample convs and the head
(BatchNorm1d ``bn2`` -> ``fc``) are full precision. Module names match the released
files one to one.

Two details of the authors' network that the state_dict carries:
- ``bn3 = BatchNorm1d(num_classes)`` is registered after ``fc`` but never used in
  ``forward``. Its keys are in their files, so it is kept; it gets no gradient, so
  SGD neither updates nor decays it.
- every full-precision conv starts ``N(0, sqrt(2 / (k * k * out_channels)))``; the
  BatchNorms keep PyTorch's defaults (gamma = 1, eps 1e-5, momentum 0.1).

The authors pool the 7x7 map of a 224x224 input with ``AvgPool2d(7)``; here the
pool is adaptive (to 1x1), which is the same at 224x224 and also takes other sizes.
"""
import math

import torch.nn as nn
import torch.nn.functional as F

from .binary import BinaryConv2d
from .resnet import add_stages


def downsample(in_planes, planes, stride):
    """The shortcut of a block that changes the shape: a strided full-precision 1x1
    conv -> BatchNorm; None (identity) for the others."""
    if stride == 1 and in_planes == planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(planes))


def real_convs(model):
    """The full-precision convs: ``BinaryConv2d`` is an ``nn.Conv2d`` too, but its
    weight is the initial mean M and keeps its own initialisation."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d) and not isinstance(m, BinaryConv2d)]


class BasicBlock(nn.Module):
    """Post-activation block: relu(bn1(conv1 x)) -> bn2(conv2 .) + shortcut -> relu."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = BinaryConv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(in_planes, planes, stride)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(out + shortcut)


class ImageNetResNet(nn.Module):
    """The frame the authors' two ImageNet ResNet18s share: a 7x7/2 stem conv ->
    BatchNorm -> ``stem_activation`` -> 3x3/2 max-pool, four stages of ``block``, and
    the head BatchNorm1d ``bn2`` -> ``fc``. ``width`` is the stem's channel count (64 in
    the paper); the stages have width x 1, 2, 4, 8 channels."""
    stem_activation = staticmethod(F.relu)

    def __init__(self, block, num_classes, width):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        features = add_stages(self, block, width)
        self.bn2 = nn.BatchNorm1d(features)
        self.fc = nn.Linear(features, num_classes)

    def stem(self, x):
        """The layers before the first binary weight, the same for every sample of the
        binary weights."""
        return F.max_pool2d(self.stem_activation(self.bn1(self.conv1(x))), 3, stride=2, padding=1)

    def body(self, x):
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)  # the authors' AvgPool2d(7) at 224x224
        return self.fc(self.bn2(x))

    def forward(self, x):
        return self.body(self.stem(x))


class ResNet18ImageNet(ImageNetResNet):
    """ReLU after the stem, post-activation blocks with real inputs."""

    def __init__(self, num_classes=1000, width=64):
        super().__init__(BasicBlock, num_classes, width)
        self.bn3 = nn.BatchNorm1d(num_classes)  # unused, as in the authors' network
        for conv in real_convs(self):
            k = conv.kernel_size[0] * conv.kernel_size[1]
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / (k * conv.out_channels)))


def resnet18_imagenet(num_classes=1000, width=64):
    """The authors' ``resnet18_1w32a`` (K = 4 in their recipe)."""
    return ResNet18ImageNet(num_classes, width)
