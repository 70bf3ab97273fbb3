"""scikit-learn's handwritten digits in the CIFAR-10 on-disk format: real images, small
enough to train on a CPU in minutes, on which claims about learning are measured.

    python -m data.digits results/digits_data      # -> results/digits_data/cifar-10-batches-py
    python main.py --dataset cifar10 --data-root results/digits_data ...

The 1,797 images of ``sklearn.datasets.load_digits`` (8 x 8 pixels, 16 grey levels, 10
classes, about 180 each) are scaled to 0..255, enlarged to 32 x 32 (bilinear), copied
into the three colour channels, and split at random (seeded) into 1,438 training and
359 test images, a fifth of every class. Unlike the generated datasets of
``data/synthetic.py`` these are real handwriting, with its ambiguities. scikit-learn
is needed for this module only (the tests install it).
"""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

from .synthetic import write_cifar

TEST_SHARE = 0.2


def digits_images(seed=0):
    """(train images, train labels, test images, test labels): uint8 (N, 3, 32, 32) and int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit("error: the digits dataset comes from scikit-learn, which is not installed: "
                         "pip install scikit-learn") from None
    found = load_digits()
    images = torch.from_numpy(found.images).float().unsqueeze(1) * (255 / 16)
    images = F.interpolate(images, size=32, mode="bilinear", align_corners=False)
    images = images.round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(found.target).long()
    rng = np.random.default_rng(seed)
    test = np.zeros(len(labels), dtype=bool)
    for c in range(10):  # the same share of every class in the test set
        members = np.flatnonzero(found.target == c)
        test[rng.choice(members, size=round(TEST_SHARE * len(members)), replace=False)] = True
    test = torch.from_numpy(test)
    return images[~test], labels[~test], images[test], labels[test]


def write_digits(root, seed=0) -> str:
    """Write the digits under ``root`` as CIFAR-10 (``root/cifar-10-batches-py``)."""
    return write_cifar(root, "cifar10", *digits_images(seed))


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write scikit-learn's digits in the CIFAR-10 on-disk format.")
    parser.add_argument("root", help="the folder to write cifar-10-batches-py/ into (main.py's --data-root)")
    parser.add_argument("--seed", type=int, default=0, help="of the split into training and test images")
    args = parser.parse_args(argv)
    if os.path.exists(os.path.join(args.root, "cifar-10-batches-py")):
        print(f"error: {args.root}/cifar-10-batches-py exists: choose another folder", file=sys.stderr)
        return 1
    train_images, train_labels, test_images, test_labels = digits_images(args.seed)
    folder = write_cifar(args.root, "cifar10", train_images, train_labels, test_images, test_labels)
    print(f"wrote {folder}: {len(train_labels):,} training and {len(test_labels):,} test images of 10 classes "
          f"(32 x 32, grey)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
