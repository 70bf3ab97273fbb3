"""How fast the ImageNet networks train and evaluate, and how fast the loaders read ImageNet.

For each of the authors' four ImageNet networks at the paper's width and with its
recipe's K: training images/s (one VISPA step: a sample, forward, backward, update) and
evaluation image-passes/s (one sampled network's forward pass; the L-sample evaluation
makes L of them per image), on a batch already on the device, timed with CUDA events
on a GPU. Then the images/s of the loaders on JPEG files (the torchvision workers, and
DALI where it is installed), and the hours a recipe's run takes on this device alone
(its four ranks as --virtual-ranks 4: the same images per step) from these figures.

    python speed/imagenet.py                 # batch 256 on a GPU, 8 on the CPU
    python speed/imagenet.py --loaders-only --workers 16
"""
import argparse
import os
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script: the repository's packages

from config import RECIPES  # noqa: E402
from data.imagenet import TRAIN_IMAGES, VAL_IMAGES, check_imagenet  # noqa: E402
from data.imagenet_loaders import imagenet_batches  # noqa: E402
from data.synthetic import write_image_folders  # noqa: E402
from models import build_model  # noqa: E402
from optim import VISPA  # noqa: E402

NETWORKS = ["alexnet_1w1a_imagenet", "alexnet_1w32a_imagenet", "birealnet18_1w1a_imagenet",
            "resnet18_1w32a_imagenet"]


def seconds(device, work, repeats):
    """Seconds per call of ``work`` (after one call to warm up)."""
    work()
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            work()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / repeats
    began = time.perf_counter()
    for _ in range(repeats):
        work()
    return (time.perf_counter() - began) / repeats


def network_rates(recipe, batch, device, repeats):
    """(training images/s, evaluation image-passes/s) of a recipe's network."""
    cfg = RECIPES[recipe]
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = build_model(cfg.model, 1000).to(device, memory_format=fmt)
    opt = VISPA(model.parameters(), lr=0.01, momentum=0.9, weight_decay=cfg.wd, K=cfg.K, seed=0)
    images = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def train():
        opt.zero_grad()
        with opt.sampled_params(train=True):
            F.cross_entropy(model(images), labels).backward()
        opt.step()

    @torch.no_grad()
    def evaluate():
        with opt.sampled_params():
            model(images)

    model.train()
    train_s = seconds(device, train, repeats)
    model.eval()
    eval_s = seconds(device, evaluate, repeats)
    return batch / train_s, batch / eval_s


def loader_rates(args, device):
    """{loader: images/s} reading generated JPEGs of ImageNet's typical size (500x375)."""
    rates = {}
    with tempfile.TemporaryDirectory() as root:
        write_image_folders(root, classes=8, per_class=(args.images // 8, 4), size=(375, 500))
        for backend in ("torchvision", "dali"):
            try:
                train = imagenet_batches(check_imagenet(root).train, True, 32, device, workers=args.workers,
                                         backend=backend, decoder="cpu")
                next(iter(train))  # the workers start
                began = time.perf_counter()
                count = sum(len(labels) for _, labels in train)
                rates[f"{backend} ({args.workers} CPU {'threads' if backend == 'dali' else 'workers'})"] = \
                    count / (time.perf_counter() - began)
            except Exception as error:  # DALI not installed, say
                rates[backend] = f"n/a ({str(error).splitlines()[0][:80]})"
    return rates


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="default 256 on a GPU, 8 on the CPU")
    p.add_argument("--repeats", type=int, default=None, help="timed steps (default 20 on a GPU, 2 on the CPU)")
    p.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--images", type=int, default=256,
                   help="JPEGs the loaders read (at least 128: four batches, the first one untimed)")
    p.add_argument("--loaders-only", action="store_true")
    args = p.parse_args()
    if args.batch is not None and args.batch < 2:
        p.error("--batch must be at least 2 (BatchNorm in training needs two images)")
    if args.images < 128:
        p.error("--images must be at least 128: four batches of 32, the first one not timed")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batch, repeats = args.batch or (256 if gpu else 8), args.repeats or (20 if gpu else 2)
    name = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"device {device} ({name}); {os.cpu_count()} CPU cores; torch {torch.__version__}; batch {batch}")
    if not args.loaders_only:
        print(f"\n{'network (recipe)':<28}{'train img/s':>12}{'eval passes/s':>15}{'hours/run on this device':>27}")
        for recipe in NETWORKS:
            cfg = RECIPES[recipe]
            train_rate, eval_rate = network_rates(recipe, batch, device, repeats)
            if gpu:
                torch.cuda.empty_cache()  # the previous network's memory, for the next one
            hours = cfg.epochs * (TRAIN_IMAGES / train_rate + VAL_IMAGES * cfg.L / eval_rate) / 3600
            print(f"{recipe:<28}{train_rate:>12.1f}{eval_rate:>15.1f}{hours:>27.1f}", flush=True)
        print("(hours: every epoch 1.28 M training images and 50k test images x L = 40 passes, data loading "
              "not counted)")
    print("\nloaders on the CPU (decoding, augmentation, 224x224 batches of 32):")
    for loader, rate in loader_rates(args, torch.device("cpu")).items():
        print(f"  {loader:<40}{rate:.0f} images/s" if isinstance(rate, float) else f"  {loader:<40}{rate}")


if __name__ == "__main__":
    main()
