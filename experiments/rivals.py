"""VISPA against its rivals in one pipeline: BayesBiNN and the latent-weight STE, trained
on the same networks, data, augmentation, schedule and evaluation (``main.py --method``).

    python -m data.digits results/digits_data
    python experiments/rivals.py --data-root results/digits_data --epochs 10
    python experiments/rivals.py --data-root results/demo_data --epochs 6 --lr 0.1 --networks resnet18:12 vgg16:12

For every network, method and seed: ``main.py`` trains the run (runs already finished are
kept), then ``main.py --evaluate`` of its ``model_best.pth.tar`` with ``-L`` samples and
``--ood`` against a generated dataset of other classes. The table gives the mean ± sample
std over the seeds of the top-1 of the L-sample predictive and of the deployed network,
the predictive's NLL and ECE, and the AUROC of its entropy against the other dataset's
images. ``--plot FILE`` draws the three methods' curves of the first network.

On a GPU, the same table on CIFAR-100 with the paper's networks: ``--dataset cifar100
--data-root ./datasets --networks resnet18:64 vgg16:64 --epochs 500 --batch 256 --lr 0.1
--warmup 5 -K 8 --train-L 40 --gpus 0`` (about the authors' compute per run, times 9).
"""
import argparse
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deployed_network import FIGURE, REPO, evaluated, mean_std, run  # noqa: E402

METHODS = ("vispa", "bayesbinn", "ste")


def ood_auroc(output):
    """The AUROC of the predictive entropy in the table of main.py --evaluate --ood."""
    return re.search(rf"^  predictive entropy \(L=\d+\) +{FIGURE} ", output, re.M).group(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", default="cifar10")
    parser.add_argument("--networks", nargs="+", default=["resnet18:16", "vgg16:16"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("-K", type=int, default=4)
    parser.add_argument("--train-L", type=int, default=4)
    parser.add_argument("-L", type=int, default=40)
    parser.add_argument("--gpus", default="cpu")
    parser.add_argument("--ood-data-root", default=os.path.join(REPO, "results", "ood_data"),
                        help="a CIFAR-100-format dataset of other classes (generated here if missing)")
    parser.add_argument("--results-dir", default=os.path.join(REPO, "results", "deployed"))
    parser.add_argument("--plot", default=None, help="draw the curves of the first network's runs here (.png)")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.ood_data_root, "cifar-100-python")):
        sys.path.insert(0, REPO)
        from data.synthetic import write_structured_cifar
        write_structured_cifar(args.ood_data_root, "cifar100", num_train=100, num_test=500, seed=1)

    rows, folders = {}, {}
    for network in args.networks:
        model, width = network.split(":")
        for method in args.methods:
            for seed in args.seeds:
                name = f"{args.dataset}_{model}_w{width}" + (f"_{method}" if method != "vispa" else "") + f"_seed={seed}"
                folder = os.path.join(args.results_dir, name)
                metrics = os.path.join(folder, "metrics.csv")
                if not os.path.exists(metrics) or len(open(metrics).read().splitlines()) <= args.epochs:
                    print(f"training {name}", file=sys.stderr, flush=True)
                    run(["--model", model, "--width", width, "--dataset", args.dataset, "--data-root", args.data_root,
                         "--epochs", args.epochs, "-b", args.batch, "--eval-batch-size", 500, "--lr", args.lr,
                         "--warmup-epochs", args.warmup, *(["-K", args.K] if method == "vispa" else []),
                         "-L", args.train_L, "--seed", seed, "--method", method, "--gpus", args.gpus,
                         "--results-dir", args.results_dir, "--save", name, "--overwrite"], f"training {name}")
                print(f"evaluating {name}", file=sys.stderr, flush=True)
                output = run(["--evaluate", os.path.join(folder, "model_best.pth.tar"), "-L", args.L, "--gpus",
                              args.gpus, "--ood", "cifar100", "--ood-data-root", args.ood_data_root],
                             f"evaluating {name}")
                rows.setdefault((network, method), []).append(dict(evaluated(output), ood=ood_auroc(output)))
                folders.setdefault(network, []).append(folder)

    print(f"\n{args.dataset} in {args.data_root}: {args.epochs} epochs, seeds {args.seeds}; model_best evaluated "
          f"with L={args.L}; mean ± sample std over the seeds\n")
    print("| network | method | top-1, L-sample predictive | top-1, deployed network | NLL | ECE (%) | OOD AUROC |")
    print("|---|---|---|---|---|---|---|")
    for (network, method), results in rows.items():
        cells = [mean_std([r["val"]["prec1"] for r in results]), mean_std([r["deployed"]["prec1"] for r in results]),
                 mean_std([r["val"]["nll"] for r in results]), mean_std([r["val"]["ece"] for r in results]),
                 mean_std([r["ood"] for r in results])]
        print(f"| {network.replace(':', ' width ')} | {method} | " + " | ".join(cells) + " |")
    if args.plot:
        subprocess.run([sys.executable, "-m", "utils.plot", *folders[args.networks[0]], "--out", args.plot,
                        "--overwrite"], cwd=REPO, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
