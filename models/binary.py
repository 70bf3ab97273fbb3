"""Layers whose weights are binary (+1/-1) and scaled per output channel, and the
sign activation of fully binary (1W1A) networks.

A binary layer computes ``(conv(a, b) + bias) * alpha``, where ``a`` is its input, or
the sign of its input when it binarises it (1W1A). It holds only what the forward
pass needs: the current binary weight ``b`` (the parameter ``weight``, which
receives the straight-through gradient dLoss/db), the real scale ``alpha`` and, for
the layers that have one, the real ``bias``. The distribution that ``b`` is drawn
from belongs to the optimizer, which finds the binary weights by the ``binary``
mark set here.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


def mark_binary(param: nn.Parameter) -> nn.Parameter:
    """Mark a parameter as a sign weight, so that VISPA keeps a distribution for it. Its
    value when the optimizer is built is the initial mean M, so it must be a real tensor
    of at least one dimension (a sign per entry; Z has one more dimension, the rank)."""
    if not isinstance(param, torch.Tensor) or not param.is_floating_point() or param.dim() == 0:
        what = f"a {param.dim()}-d tensor" if isinstance(param, torch.Tensor) and param.dim() == 0 else \
            f"a tensor of {param.dtype}" if isinstance(param, torch.Tensor) else type(param).__name__
        raise ValueError(f"mark_binary takes a floating-point parameter of at least one dimension, got {what}")
    param.binary = True
    return param


def is_binary(param: torch.Tensor) -> bool:
    return getattr(param, "binary", False)


class _Sign(torch.autograd.Function):
    """sign(x) forward (sign(0) = 0); backward ``clamp(2 - |2x|, min=0) * g``: the
    derivative of Bi-Real's piecewise-quadratic approximation of sign, as the authors'
    ``BinaryQuantize_a`` computes it (2 - 2|x| inside [-1, 1], 0 outside)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sign(x)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        return grad * torch.clamp(2 - 2 * x.abs(), min=0)


def sign_activation(x: torch.Tensor) -> torch.Tensor:
    """The binary activation of 1W1A layers, with its straight-through estimator."""
    return _Sign.apply(x)


class _KeepsItsMark:
    """``copy.deepcopy`` (of ``torch.optim.swa_utils.AveragedModel``, an EMA, a teacher)
    rebuilds every Parameter without its attributes, the binary mark among them: the
    layer marks the weight of its copy again."""

    def __setstate__(self, state):
        super().__setstate__(state)
        mark_binary(self.weight)


class BinaryConv2d(_KeepsItsMark, nn.Conv2d):
    """Convolution with a binary weight and a learnable per-output-channel scale.

    ``weight`` starts as a Xavier-normal real tensor: VISPA takes it as the initial
    mean M and from then on writes sign samples into it. ``alpha`` (shape
    ``(out, 1, 1)``) starts ``U(0, 1)``, as in the released code, and so does ``bias``
    (AlexNet's layers have one; it is added before the scale, as the authors' layer
    adds it). ``binarize_input`` makes it a 1W1A layer: the input passes through
    ``sign_activation`` first.

    A 1x1 layer also takes (N, C) features: it is then a linear layer, which the
    authors' files store with the same 4-D weight.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=False,
                 binarize_input=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, bias=bias)
        nn.init.xavier_normal_(self.weight)
        mark_binary(self.weight)
        self.alpha = nn.Parameter(torch.rand(out_channels, 1, 1))
        if bias:
            with torch.no_grad():
                self.bias.uniform_(0, 1)
        self.binarize_input = binarize_input

    def forward(self, x):
        if self.binarize_input:
            x = sign_activation(x)
        if x.dim() == 2:
            return F.linear(x, self.weight.flatten(1), self.bias) * self.alpha.view(1, -1)
        return self._conv_forward(x, self.weight, self.bias) * self.alpha

    def extra_repr(self):
        return super().extra_repr() + (", binarize_input=True" if self.binarize_input else "")


class BinaryLinear(_KeepsItsMark, nn.Linear):
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
