"""Run an exported binary network: the mean network sign(M) of a training run, at one bit
per binary weight.

    python main.py --export results/<run>/model_best.pth.tar --out model.bnn   # in the clone
    pip install .                                                             # once
    python examples/load_packed.py model.bnn

``load_packed`` gives a plain ``nn.Module`` in eval mode, with no optimizer; the file
also says what the network is and how its input is normalised (``read_packed``).
"""
import sys

import torch

from vispa import load_packed
from vispa.models.packed import read_packed


def main(path):
    about = read_packed(path)
    model = load_packed(path)
    size = about["image_size"]
    print(f"{path}: {about['model']} (width {about['width']}) for {about['dataset']}, "
          f"{about['num_classes']} classes, {size}x{size} images")

    # Your images here: uint8, (N, 3, size, size), RGB.
    images = torch.randint(0, 256, (4, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean = torch.tensor(about["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(about["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        probabilities = model((images.float() / 255 - mean) / std).softmax(1)
    confidence, predicted = probabilities.max(1)
    names = about["classes"]  # the class folders of a run on one's own images; None for the paper's datasets
    for i, (label, p) in enumerate(zip(predicted.tolist(), confidence.tolist())):
        print(f"image {i}: class {label}{f' ({names[label]})' if names else ''} (probability {p:.2f})")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} FILE.bnn")
    main(sys.argv[1])
