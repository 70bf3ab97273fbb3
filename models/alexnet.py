"""The authors' binary AlexNets for ImageNet: 1W1A and 1W32A (docs/networks.md, AlexNet).

Both keep the first layer (``features.0``, an 11x11/4 conv with bias) and the last
(the ``Linear`` at the end of ``classifier``) in full precision; the four convs
and the two 4096-wide fully connected layers between them are binary, each with
a U(0, 1) bias added before its scale, and each followed by a BatchNorm with
eps 1e-3 (momentum 0.1). The fully connected layers are 1x1 ``BinaryConv2d``
applied to (N, C) features, because the released files store them with 4-D
weights (``classifier.0.M`` is 4096x9216x1x1).

- 1W1A has **no activation function at all**: its binary layers binarise their
  input, and between layers there is only BatchNorm and max-pooling.
- 1W32A has a ReLU after every BatchNorm and real inputs to the binary layers.
  The ReLUs are modules of the two ``nn.Sequential``, so they shift the indices
  of every later layer, exactly as in the authors' files
  (``features.{0,1,4,5,8,9,11,12,14,15}``, ``classifier.{0,1,3,4,6}``).

Inputs must be 224x224 (the authors' size): the features are flattened as the
authors flatten them, which needs the 6x6 map that 224x224 leaves.
"""
import torch.nn as nn

from .binary import BinaryConv2d


class AlexNet(nn.Module):
    """``width`` is the first layer's channel count (96 in the paper); every layer
    scales with it (``channels * width // 96``), so narrow networks can be built
    for tests. ``binary_activations`` selects 1W1A (True) or 1W32A (False)."""

    def __init__(self, num_classes, width, binary_activations):
        super().__init__()
        scale = lambda channels: channels * width // 96
        relu = [] if binary_activations else [nn.ReLU()]

        def binary(cin, cout, kernel, padding=0):
            return BinaryConv2d(cin, cout, kernel, padding=padding, bias=True,
                                binarize_input=binary_activations)

        def pool():
            return nn.MaxPool2d(3, 2)

        c1, c2, c3, hidden = scale(96), scale(256), scale(384), scale(4096)
        self.features = nn.Sequential(
            nn.Conv2d(3, c1, 11, stride=4, padding=2), nn.BatchNorm2d(c1), *relu, pool(),
            binary(c1, c2, 5, padding=2), nn.BatchNorm2d(c2, eps=1e-3), *relu, pool(),
            binary(c2, c3, 3, padding=1), nn.BatchNorm2d(c3, eps=1e-3), *relu,
            binary(c3, c3, 3, padding=1), nn.BatchNorm2d(c3, eps=1e-3), *relu,
            binary(c3, c2, 3, padding=1), nn.BatchNorm2d(c2, eps=1e-3), *relu, pool())
        self.classifier = nn.Sequential(
            binary(c2 * 6 * 6, hidden, 1), nn.BatchNorm1d(hidden, eps=1e-3), *relu,
            binary(hidden, hidden, 1), nn.BatchNorm1d(hidden, eps=1e-3), *relu,
            nn.Linear(hidden, num_classes))
        # the stem is everything in `features` before the first binary layer
        self._stem_length = next(i for i, m in enumerate(self.features) if isinstance(m, BinaryConv2d))

    def stem(self, x):
        """conv -> BatchNorm (-> ReLU) -> max-pool: the layers before the first binary
        weight, the same for every sample of the binary weights."""
        for layer in self.features[:self._stem_length]:
            x = layer(x)
        return x

    def body(self, x):
        for layer in self.features[self._stem_length:]:
            x = layer(x)
        return self.classifier(x.flatten(1))

    def forward(self, x):
        return self.body(self.stem(x))


def alexnet_1w1a(num_classes=1000, width=96):
    """The authors' ``alexnet_1w1a`` (K = 2 in their recipe)."""
    return AlexNet(num_classes, width, binary_activations=True)


def alexnet_1w32a(num_classes=1000, width=96):
    """The authors' ``alexnet_1w32a`` (K = 4 in their recipe)."""
    return AlexNet(num_classes, width, binary_activations=False)
