"""CIFAR ResNet18 with binary 3x3 convolutions and real activations (1W32A).

The full-precision parts are the stem conv, the 1x1 shortcut convs and the
classifier, as in the released code; module names match the released
checkpoints one to one. The stem is conv -> BatchNorm with no activation, as
the authors' network computes it.
"""
import torch.nn as nn
import torch.nn.functional as F

from .binary import BinaryConv2d


class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.conv1 = BinaryConv2d(in_planes, planes, 3, stride=stride, padding=1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = BinaryConv2d(planes, planes, 3, stride=1, padding=1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            conv = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)
            nn.init.kaiming_normal_(conv.weight)
            self.shortcut = nn.Sequential(
                conv, nn.BatchNorm2d(planes, eps=1e-5, momentum=0.2, affine=False))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """``width`` is the first stage's width (64 in the paper; smaller for quick runs)."""

    def __init__(self, num_classes=100, width=64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight)
        self.bn1 = nn.BatchNorm2d(width)
        in_planes = width
        for i, (mult, stride) in enumerate([(1, 1), (2, 2), (4, 2), (8, 2)]):
            planes = width * mult
            stage = nn.Sequential(BasicBlock(in_planes, planes, stride),
                                  BasicBlock(planes, planes, 1))
            self.add_module(f"layer{i + 1}", stage)
            in_planes = planes
        self.linear = nn.Linear(in_planes, num_classes)
        self.bn2 = nn.BatchNorm1d(in_planes)

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


def resnet18(num_classes=100, width=64):
    return ResNet18(num_classes, width)
