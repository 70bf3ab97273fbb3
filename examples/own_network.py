"""VISPA for a network of your own: a complete program.

    pip install .                        # once, in a clone of the repository
    python examples/own_network.py       # about ten seconds on a CPU

A small binary network learns a made-up task: which quarter of a 16x16 image is the
brightest. Its binary weights are not trained directly. VISPA keeps a Gaussian over
each binary weight tensor (a mean M and a rank-K factor Z) and trains M and Z; the
network runs on sign samples of it. Three things make a network VISPA's:

1. its binary weights are marked: the layers ``BinaryConv2d`` and ``BinaryLinear`` mark
   theirs; a layer of your own marks its weight with ``mark_binary`` (``SignedMixer``);
2. one VISPA optimizer gets every parameter: the marked ones get a distribution, the
   others (scales, BatchNorm, real layers) plain SGD with the same settings;
3. the forward and backward passes of a training step run inside
   ``opt.sampled_params(train=True)``, which writes one sign sample into the binary
   weights and, on leaving, turns its gradient into gradients of M and Z.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from vispa import VISPA, BinaryConv2d, BinaryLinear, mark_binary, recalibrate


class SignedMixer(nn.Module):
    """A layer of one's own with a binary weight: a 1x1 convolution that mixes channels
    with weights +1 / -1. ``mark_binary`` is all VISPA needs: the parameter's value
    when the optimizer is built is the initial mean M, and from then on the optimizer
    writes sign samples into it."""

    def __init__(self, channels):
        super().__init__()
        self.weight = mark_binary(nn.Parameter(torch.randn(channels, channels, 1, 1) * 0.1))

    def forward(self, x):
        return F.conv2d(x, self.weight)


def network(classes=4, width=16):
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width),              # real first layer
        BinaryConv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        SignedMixer(width), nn.BatchNorm2d(width), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        BinaryLinear(width * 16, classes))


def brightest_quarter(n, generator):
    """Images of noise with one brighter quarter; the label is which one."""
    labels = torch.randint(0, 4, (n,), generator=generator)
    images = torch.randn(n, 1, 16, 16, generator=generator)
    for label in range(4):
        rows, cols = divmod(label, 2)
        images[labels == label, :, rows * 8:rows * 8 + 8, cols * 8:cols * 8 + 8] += 0.5
    return images, labels


def main():
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(0)
    train_x, train_y = brightest_quarter(4096, data)
    test_x, test_y = brightest_quarter(1024, data)

    model = network()
    opt = VISPA(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, K=8, S=100, seed=0)
    for epoch in range(3):
        model.train()
        for batch in torch.randperm(len(train_y), generator=data).split(128):
            x, y = train_x[batch], train_y[batch]
            opt.zero_grad()
            with opt.sampled_params(train=True):       # one sign sample in every binary layer
                loss = F.cross_entropy(model(x), y)
                loss.backward()                        # the straight-through gradient dLoss/db
            opt.step()                                 # SGD on M, Z and the real parameters
        print(f"epoch {epoch + 1}: last training loss {loss.item():.3f}")

    model.eval()
    L = 16
    with torch.no_grad():
        logits = 0
        for _ in range(L):                             # the L-sample prediction
            with opt.sampled_params():                 # a fresh sample for every pass
                logits = logits + model(test_x) / L
        mean_logits = model(test_x)                    # outside the contexts: the network sign(M)

    # The network to deploy is sign(M) alone. Its BatchNorm statistics were gathered in
    # training on sampled networks; recalibrate recomputes them for sign(M) itself, in one
    # pass over training images (as torch.optim.swa_utils.update_bn does).
    recalibrate(model, opt, train_x[:2048].split(128))
    with torch.no_grad():
        deployed_logits = model(test_x)
    accuracy = lambda out: 100.0 * (out.argmax(1) == test_y).float().mean().item()
    print(f"test accuracy: {accuracy(logits):.1f}% with L={L} sampled networks, "
          f"{accuracy(mean_logits):.1f}% for the mean network sign(M), "
          f"{accuracy(deployed_logits):.1f}% for it with BatchNorm statistics of its own (chance: 25%)")

    # Outside the contexts the binary layers hold sign(M): this state_dict is the
    # deterministic binary network to deploy. opt.state_dict() holds the distribution.
    signs = [p.unique().tolist() for p in model.parameters() if getattr(p, "binary", False)]
    print(f"the deployed network's binary weights take the values {sorted(set(sum(signs, [])))}")


if __name__ == "__main__":
    main()
