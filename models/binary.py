"""Layers whose weights are binary (+1/-1) and scaled per output channel.

A binary layer computes ``conv(x, b) * alpha``. It holds only what the forward
pass needs: the current binary weight ``b`` (the parameter ``weight``, which
receives the straight-through gradient dLoss/db) and the real scale ``alpha``.
The distribution that ``b`` is drawn from belongs to the optimizer, which finds
the binary weights by the ``binary`` mark set here.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def mark_binary(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter as a sign weight, so that VISPA keeps a distribution for it."""
    param.binary = True
    return param


def is_binary(param: torch.Tensor) -> bool:
    return getattr(param, "binary", False)


class BinaryConv2d(nn.Conv2d):
    """Convolution with a binary weight and a learnable per-output-channel scale.

    ``weight`` starts as a Xavier-normal real tensor: VISPA takes it as the initial
    mean M and from then on writes sign samples into it. ``alpha`` (shape
    ``(out, 1, 1)``) starts ``U(0, 1)``, as in the released code.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, bias=False)
        nn.init.xavier_normal_(self.weight)
        mark_binary(self.weight)
        self.alpha = nn.Parameter(torch.rand(out_channels, 1, 1))

    def forward(self, x):
        return self._conv_forward(x, self.weight, None) * self.alpha


class BinaryLinear(nn.Linear):
    """Linear layer with a binary weight and a learnable per-output-feature scale.

    The models of this repository use 1x1 ``BinaryConv2d`` instead (that is the
    layout of the released checkpoints); this layer is for one's own networks.
    """

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        nn.init.xavier_normal_(self.weight)
        mark_binary(self.weight)
        self.alpha = nn.Parameter(torch.rand(out_features))

    def forward(self, x):
        return F.linear(x, self.weight) * self.alpha
