"""CIFAR ResNet18 with binary 3x3 convolutions: binary weights and real activations
(1W32A), or binary weights and binary activations (1W1A).

The two networks share everything but the block: the stem (a full-precision conv
-> BatchNorm with no activation, as the authors' network computes it), the four
stages of two blocks and the head (average pool -> BatchNorm1d -> linear). Module
names match the released checkpoints one to one; the authors register ``linear``
before ``bn2``, and so do we, so the state_dict order is theirs too.
"""
import torch.nn as nn
import torch.nn.functional as F

from .binary import BinaryConv2d


# (width multiplier, stride of the first block) of the four stages of two blocks each
STAGES = [(1, 1), (2, 2), (4, 2), (8, 2)]


def add_stages(model, block, width):
    """Add ``layer1``..``layer4`` (stage widths width x 1, 2, 4, 8) of ``block`` to
    ``model``; returns the last stage's width. (The ImageNet ResNets have the same stages.)"""
    in_planes = width
    for i, (mult, stride) in enumerate(STAGES):
        planes = width * mult
        model.add_module(f"layer{i + 1}", nn.Sequential(block(in_planes, planes, stride),
                                                        block(planes, planes, 1)))
        in_planes = planes
    return in_planes


def needs_projection(in_planes, planes, stride):
    """Whether a block's shortcut must change the input's shape (the first block of
    layer2, layer3 and layer4)."""
    return stride != 1 or in_planes != planes


class BasicBlock(nn.Module):
    """1W32A: binary weights on real inputs, ReLU; the shortcut that changes the shape
    is a full-precision 1x1 conv -> BatchNorm without affine part (momentum 0.2)."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = BinaryConv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if needs_projection(in_planes, planes, stride):
            conv = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            self.shortcut = nn.Sequential(
                conv, nn.BatchNorm2d(planes, eps=1e-5, momentum=0.2, affine=False))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PoolAndPadShortcut(nn.Module):
    """The 1W1A shortcut that changes the shape, without parameters (and so without
    state_dict keys): a 2x2 average pool, then zero channels on BOTH sides, so that
    the pooled input occupies channels ``[pad, pad + in_planes)`` of ``planes``.

    The authors pad ``planes // 4`` channels each side, which is
    ``(planes - in_planes) / 2`` when the width doubles, as it does at every stage
    of ResNet18 for any ``width``; the general form is what is computed here."""

    def __init__(self, in_planes, planes):
        super().__init__()
        if (planes - in_planes) % 2 or planes < in_planes:
            raise ValueError(f"cannot pad {in_planes} channels to {planes} evenly on both sides")
        self.pad = (planes - in_planes) // 2

    def forward(self, x):
        return F.pad(F.avg_pool2d(x, 2), (0, 0, 0, 0, self.pad, self.pad))

    def extra_repr(self):
        return f"pad={self.pad}"


class BasicBlock1W1A(nn.Module):
    """1W1A: both binary convs binarise their input (sign, with the clipped
    straight-through estimator of ``sign_activation``); hardtanh after the first
    BatchNorm and after the sum. The stem's real output reaches the first block's
    sum unchanged through the identity shortcut."""

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = BinaryConv2d(in_planes, planes, 3, stride=stride, padding=1, binarize_input=True)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, stride=1, padding=1, binarize_input=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if needs_projection(in_planes, planes, stride):
            self.shortcut = PoolAndPadShortcut(in_planes, planes)

    def forward(self, x):
        out = F.hardtanh(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.hardtanh(out + self.shortcut(x))


class ResNet18(nn.Module):
    """``block`` is BasicBlock (1W32A) or BasicBlock1W1A; ``width`` is the first
    stage's width (64 in the paper; smaller for quick runs). ``stem_stride`` 2 makes
    it the authors' Tiny-ImageNet network (64x64 images; they choose it by the number
    of classes, 200), whose layer4 then sees the 4x4 maps of CIFAR."""

    def __init__(self, block, num_classes, width, stem_stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=stem_stride, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight)
        self.bn1 = nn.BatchNorm2d(width)
        features = add_stages(self, block, width)
        self.linear = nn.Linear(features, num_classes)
        self.bn2 = nn.BatchNorm1d(features)

    def stem(self, x):
        """The layers before the first binary weight: the same for every sample
        of the binary weights, so L-sample evaluation computes them once.

        No activation after ``bn1``: the authors' ResNet skips it (their flag
        ``binarize_a``, True by default, only drops this ReLU)."""
        return self.bn1(self.conv1(x))

    def body(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)  # 4x4 -> 1x1 on CIFAR
        return self.linear(self.bn2(out))

    def forward(self, x):
        return self.body(self.stem(x))


def resnet18(num_classes=100, width=64, image_size=32):
    """Binary weights, real activations (the paper's CIFAR-100 / CIFAR-10 1W32A network;
    with 64x64 images, the Tiny-ImageNet one)."""
    return ResNet18(BasicBlock, num_classes, width, stem_stride=image_size // 32)


def resnet18_1w1a(num_classes=10, width=64, image_size=32):
    """Binary weights and activations (the authors' ``resnet18_1w1a_cifar``; docs/networks.md)."""
    return ResNet18(BasicBlock1W1A, num_classes, width, stem_stride=image_size // 32)
