"""The authors' "BiRealNet" for ImageNet: a fully binary ResNet18 (1W1A, docs/networks.md,
"BiRealNet", their ``resnet18_1w1a_recu``).

The ImageNet ResNet18 of ``resnet_imagenet.py`` with Bi-Real blocks: a shortcut
around **each** binary conv, a Hardtanh after each addition, and binary inputs (the
binary convs binarise their input with the sign STE). The stem is 7x7/2 conv ->
BatchNorm -> Hardtanh -> 3x3/2 max-pool; the shortcut of the first block of stages
2-4 is a strided full-precision 1x1 conv -> BatchNorm (not Bi-Real's average pool
and conv); the head is BatchNorm1d ``bn2`` -> ``fc``. Module names match the
released files one to one.

Initialisation, as the authors': the full-precision convs are Kaiming-normal
(fan-in, gain sqrt(2)), and **every BatchNorm2d starts with gamma = 1e-8, beta = 0**
- the stem's, the blocks' and the downsample ones - so that each block starts close
to the identity and the stem's output close to 0 (its signs are still defined). The
head's BatchNorm1d keeps gamma = 1. All BatchNorms keep eps 1e-5, momentum 0.1.

The authors pool the 7x7 map of a 224x224 input with ``AvgPool2d(7)``; here the
pool is adaptive (to 1x1), which is the same at 224x224 and also takes other sizes.
"""
import torch.nn as nn
import torch.nn.functional as F

from .binary import BinaryConv2d
from .resnet_imagenet import ImageNetResNet, downsample, real_convs

BN_GAMMA = 1e-8  # the initial scale of every BatchNorm2d


class BasicBlock(nn.Module):
    """Bi-Real block: h = hardtanh(bn1(conv1 x) + shortcut(x)),
    out = hardtanh(bn2(conv2 h) + h); both convs see sign(input)."""

    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = BinaryConv2d(in_planes, planes, 3, stride=stride, padding=1, binarize_input=True)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, padding=1, binarize_input=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample(in_planes, planes, stride)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        out = F.hardtanh(self.bn1(self.conv1(x)) + shortcut)
        return F.hardtanh(self.bn2(self.conv2(out)) + out)


class BiRealNet18(ImageNetResNet):
    """Hardtanh after the stem, Bi-Real blocks with binary inputs, every BatchNorm2d
    starting at gamma = 1e-8."""
    stem_activation = staticmethod(F.hardtanh)

    def __init__(self, num_classes=1000, width=64):
        super().__init__(BasicBlock, num_classes, width)
        for conv in real_convs(self):
            nn.init.kaiming_normal_(conv.weight)
        for bn in self.modules():
            if isinstance(bn, nn.BatchNorm2d):
                nn.init.constant_(bn.weight, BN_GAMMA)
                nn.init.zeros_(bn.bias)


def birealnet18(num_classes=1000, width=64):
    """The authors' ``resnet18_1w1a_recu`` (K = 2 in their recipe)."""
    return BiRealNet18(num_classes, width)
