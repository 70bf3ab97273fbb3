"""CIFAR VGG16 with all 16 weight layers binary and real activations (1W32A).

The three classifier layers are 1x1 binary convolutions on the 1x1 feature map
left after the last max-pool: the same function as binary linear layers, and
the layout of the released checkpoints (``fc14.M`` is 512x512x1x1). Module
names (conv1..conv13, bn1..bn16, fc14..fc16) match those checkpoints.
"""
import torch.nn as nn
import torch.nn.functional as F

from .binary import BinaryConv2d

# Output channels of the 13 convs; "P" = 2x2 max-pool on the conv output before its BatchNorm.
CONFIG = [64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P"]


def _bn(channels, momentum=0.2):
    """The released network's BatchNorms have no affine part. The conv ones use
    momentum 0.2; the classifier's (``bn14``-``bn16``, BatchNorm1d there) keep
    PyTorch's default 0.1."""
    return nn.BatchNorm2d(channels, eps=1e-5, momentum=momentum, affine=False)


class VGG16(nn.Module):
    """``width`` scales every layer (64 = the paper's network; smaller for quick runs)."""

    def __init__(self, num_classes=100, width=64):
        super().__init__()
        scale = lambda c: c * width // 64
        self.pooled = set()  # indices of the convs followed by a max-pool
        in_channels, index = 3, 0
        for item in CONFIG:
            if item == "P":
                self.pooled.add(index)
                continue
            index += 1
            self.add_module(f"conv{index}", BinaryConv2d(in_channels, scale(item), 3, padding=1))
            self.add_module(f"bn{index}", _bn(scale(item)))
            in_channels = scale(item)
        hidden = scale(512)
        self.fc14, self.bn14 = BinaryConv2d(in_channels, hidden, 1), _bn(hidden, momentum=0.1)
        self.fc15, self.bn15 = BinaryConv2d(hidden, hidden, 1), _bn(hidden, momentum=0.1)
        self.fc16, self.bn16 = BinaryConv2d(hidden, num_classes, 1), _bn(num_classes, momentum=0.1)

    def stem(self, x):
        """Nothing comes before the first binary layer in VGG16."""
        return x

    def body(self, x):
        for i in range(1, 14):
            x = getattr(self, f"conv{i}")(x)
            if i in self.pooled:
                x = F.max_pool2d(x, 2)
            x = F.relu(getattr(self, f"bn{i}")(x))
        x = F.relu(self.bn14(self.fc14(x)))
        x = F.relu(self.bn15(self.fc15(x)))
        return self.bn16(self.fc16(x)).flatten(1)

    def forward(self, x):
        return self.body(self.stem(x))


def vgg16(num_classes=100, width=64):
    return VGG16(num_classes, width)
