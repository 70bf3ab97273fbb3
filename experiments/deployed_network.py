"""The network to deploy, measured: the L-sample predictive, the mean network sign(M) with
the BatchNorm statistics of training, and the deployed network (sign(M) with statistics
of its own, recomputed on training images), on runs of several networks and seeds.

    python -m data.digits results/digits_data                     # real images: scikit-learn's digits
    python experiments/deployed_network.py --data-root results/digits_data --epochs 10
    python experiments/deployed_network.py --data-root results/demo_data --epochs 6 --networks resnet18:12
    python experiments/deployed_network.py --data-root results/digits_data --curve   # images, transforms

Each run is ``main.py`` training a network (``--networks NAME:WIDTH ...``) for each seed
into ``--results-dir``, then ``main.py --evaluate`` of its ``model_best.pth.tar`` with
``-L`` samples; the table gives the mean ± sample std over the seeds of top-1, NLL and ECE
of the three. Runs already finished are evaluated, not trained again. With ``--curve``
it also gives, per run, the deployed network's top-1 for several numbers of
recalibration images, with the training images as the test set reads them and as
training reads them (augmented: the default of ``--recalibrate``).

A run on a GPU (CIFAR-100, the paper's networks): ``--dataset cifar100 --data-root
./datasets --networks resnet18:64 vgg16:64 --epochs 500 --batch 256 -L 40 --gpus 0``.
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
from dataclasses import replace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MAIN = os.path.join(REPO, "main.py")

COLUMNS = (("L-sample predictive", "val"), ("mean network (training statistics)", "mean"),
           ("deployed network (own statistics)", "deployed"))
FIGURE = r"(\d+\.\d+)"


def run(command, what):
    done = subprocess.run([sys.executable, MAIN, *map(str, command)], cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: {what} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return done.stdout


def evaluated(output):
    """{"val"|"mean"|"deployed": {"prec1", "nll", "ece"}} from the lines of main.py --evaluate."""
    calibration = re.search(rf"predictive: NLL {FIGURE}  ECE {FIGURE}  Brier \S+  \|  mean network: NLL {FIGURE}  "
                            rf"ECE {FIGURE}", output).groups()
    test = re.search(rf"Prec@1 {FIGURE}  Prec@5 \S+  \(L=\d+\)  \|  mean network Prec@1 {FIGURE}", output).groups()
    deployed = re.search(rf"Deployed network.*: Prec@1 {FIGURE}  Prec@5 \S+  NLL {FIGURE}  ECE {FIGURE}",
                         output).groups()
    return {"val": {"prec1": test[0], "nll": calibration[0], "ece": calibration[1]},
            "mean": {"prec1": test[1], "nll": calibration[2], "ece": calibration[3]},
            "deployed": {"prec1": deployed[0], "nll": deployed[1], "ece": deployed[2]}}


def curve(checkpoint, counts, gpus):
    """The deployed network's top-1 for each number of recalibration images, with the
    training images read as the test set reads them and as training reads them (augmented:
    what --recalibrate does)."""
    import torch

    import factory
    from config import Config
    from data import DATASETS
    from engine import evaluate_deployed
    from utils.distributed import World
    device = torch.device("cpu" if gpus == "cpu" else f"cuda:{gpus}")
    loaded = factory.open_network(checkpoint, Config(), set(), device)
    folder = factory.DataFolder.of(None, loaded.cfg.dataset, loaded.trained_on)
    test = factory.test_batches(loaded.cfg, folder, device, World())
    dataset = DATASETS[loaded.cfg.dataset]
    images, labels = dataset.read(folder.path, "train")
    found = {}
    for count in counts:
        cfg = replace(loaded.cfg, recalibrate=count)
        chosen, _ = dataset._recalibration_subset(cfg, len(labels), World())
        plain = dataset.loader(images[chosen], labels[chosen], cfg.batch_size, False, device)
        augmented = factory.recalibration_batches(cfg, folder, device, World())
        for name, batches in (("test-time", plain), ("augmented", augmented)):
            result = evaluate_deployed(loaded.model, loaded.opt, batches, test)
            found[(name, result["images"])] = result["prec1"]
    return found


def mean_std(values):
    values = [float(v) for v in values]
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f}" if len(values) > 1 else \
        f"{values[0]:.2f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--networks", nargs="+", default=["resnet18:16", "vgg16:16", "vgg_small:32"],
                        help="NAME:WIDTH of main.py's --model and --width")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("-K", type=int, default=4)
    parser.add_argument("--train-L", type=int, default=4, help="-L of the runs (their per-epoch evaluation)")
    parser.add_argument("-L", type=int, default=40, help="samples of the final evaluation")
    parser.add_argument("--gpus", default="cpu")
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results", "deployed"))
    parser.add_argument("--curve", action="store_true", help="also the deployed top-1 against the images used")
    parser.add_argument("--counts", nargs="+", type=int, default=[16, 64, 256, 1024, 100000])
    args = parser.parse_args(argv)

    rows, curves = {}, {}
    for network in args.networks:
        model, width = network.split(":")
        for seed in args.seeds:
            name = f"{args.dataset}_{model}_w{width}_seed={seed}"
            best = os.path.join(args.results_dir, name, "model_best.pth.tar")
            if not os.path.exists(os.path.join(args.results_dir, name, "metrics.csv")) or \
                    len(open(os.path.join(args.results_dir, name, "metrics.csv")).read().splitlines()) <= args.epochs:
                print(f"training {name}", file=sys.stderr, flush=True)
                run(["--model", model, "--width", width, "--dataset", args.dataset, "--data-root", args.data_root,
                     "--epochs", args.epochs, "-b", args.batch, "--eval-batch-size", 500, "--lr", args.lr,
                     "--warmup-epochs", 1, "-K", args.K, "-L", args.train_L, "--seed", seed, "--gpus", args.gpus,
                     "--results-dir", args.results_dir, "--save", name, "--overwrite"], f"training {name}")
            print(f"evaluating {name}", file=sys.stderr, flush=True)
            rows.setdefault(network, []).append(evaluated(run(["--evaluate", best, "-L", args.L, "--gpus", args.gpus],
                                                              f"evaluating {name}")))
            if args.curve:
                curves[name] = curve(best, args.counts, args.gpus)

    print(f"\n{args.dataset} in {args.data_root}: {args.epochs} epochs, K={args.K}, seeds {args.seeds}; "
          f"model_best evaluated with L={args.L}; mean ± sample std over the seeds\n")
    print("| network | " + " | ".join(f"{label}: top-1 / NLL / ECE" for label, _ in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for network, results in rows.items():
        cells = [" / ".join(mean_std([r[key][figure] for r in results]) for figure in ("prec1", "nll", "ece"))
                 for _, key in COLUMNS]
        print(f"| {network.replace(':', ' width ')} | " + " | ".join(cells) + " |")
    if curves:
        print("\nThe deployed network's top-1 against the recalibration images (test-time reading / augmented):\n")
        for name, found in curves.items():
            counts = sorted({count for _, count in found})
            print(f"{name}: " + ", ".join(f"{count}: {found[('test-time', count)]:.2f} / "
                                          f"{found[('augmented', count)]:.2f}" for count in counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
