"""Draw runs' training curves, and a reliability diagram of an evaluation's predictions.

    python -m utils.plot results/RUN [results/RUN ...] --out curves.png
    python -m utils.plot results/RUN --predictions preds.pt --out curves.png

Four panels over the epochs: the loss (training, and the L-sample test loss), the test
top-1 (L samples), the mean network sign(M)'s test top-1, and the ECE of the L-sample
predictive. Runs of one configuration (``utils.summarize``'s grouping: the same name but
the seed, the same config.json but the seed) are drawn as their mean with a band of
± one standard deviation over the seeds. ``--predictions FILE.pt`` (``main.py --evaluate
CKPT --predictions FILE.pt``) adds a reliability diagram: per confidence bin, the accuracy
against the mean confidence, for the L-sample predictive and the mean network.
matplotlib is optional: without it, one line says how to get it.
"""
import argparse
import math
import os
import statistics
import sys

from .meters import ECE_BINS
from .run_dir import RunDir
from .summarize import configuration, settings_of

PANELS = [("loss", ("train_loss", "val_loss")), ("test top-1 (%), L samples", ("val_prec1",)),
          ("test top-1 (%), mean network sign(M)", ("mean_prec1",)), ("ECE (%), L-sample predictive", ("val_ece",))]


def groups_of(folders):
    """{configuration label: [rows of metrics.csv of each run]} of the run folders."""
    groups = {}
    for folder in folders:
        run = RunDir(os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.abspath(folder)))
        try:
            rows = run.read_metrics()
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise SystemExit(f"error: {folder}: cannot read its metrics.csv ({error})")
        settings = settings_of(run)
        key = (configuration(run.name), repr(sorted((settings or {}).items())))
        groups.setdefault(key, []).append(rows)
    labels = {}
    for (name, settings), runs in groups.items():
        label = name if sum(1 for other, _ in groups if other == name) == 1 else f"{name} ({settings[:60]})"
        labels[label] = runs
    return labels


def band(runs, column):
    """(epochs, mean, std) over the runs of ``column``, epoch by epoch, where a value exists."""
    epochs, means, stds = [], [], []
    for epoch in sorted({row["epoch"] for rows in runs for row in rows}):
        values = [row[column] for rows in runs for row in rows if row["epoch"] == epoch and row[column] is not None]
        if values:
            epochs.append(epoch)
            means.append(statistics.fmean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return epochs, means, stds


def reliability(predictions):
    """[(mean confidence, accuracy, share of images)] per bin of each distribution in the
    file of ``--predictions``: {"L-sample predictive": bins, "mean network": bins}."""
    import torch
    content = torch.load(predictions, map_location="cpu", weights_only=True)
    curves = {}
    for name, key in (("L-sample predictive", "probs"), ("mean network sign(M)", "mean_probs")):
        confidence, predicted = content[key].double().max(1)
        correct = predicted.eq(content["labels"]).double()
        edges = torch.linspace(0, 1, ECE_BINS + 1)
        bins = (torch.bucketize(confidence.float(), edges, right=True) - 1).clamp(0, ECE_BINS - 1)
        curve = []
        for b in range(ECE_BINS):
            inside = bins == b
            if inside.any():
                curve.append((confidence[inside].mean().item(), correct[inside].mean().item(),
                              inside.double().mean().item()))
        curves[name] = curve
    return curves


def draw(groups, out, predictions=None):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: plotting needs matplotlib, which is not installed: pip install matplotlib")
    panels = PANELS + ([("reliability", ())] if predictions else [])
    columns = 3 if len(panels) > 4 else 2
    figure, axes = plt.subplots(math.ceil(len(panels) / columns), columns, figsize=(6 * columns, 4 * math.ceil(
        len(panels) / columns)), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        if title == "reliability":
            ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
            for name, curve in reliability(predictions).items():
                ax.plot([c for c, _, _ in curve], [a for _, a, _ in curve], marker="o", label=name)
            ax.set(title=f"reliability ({os.path.basename(predictions)})", xlabel="confidence", ylabel="accuracy")
        else:
            for label, runs in groups.items():
                for key in keys:
                    epochs, mean, std = band(runs, key)
                    name = label + (f" {key.split('_')[0]}" if len(keys) > 1 else "") + \
                        (f" (n={len(runs)})" if len(runs) > 1 else "")
                    line, = ax.plot(epochs, mean, label=name)
                    low = [max(m - s, m / 10) if title == "loss" else m - s for m, s in zip(mean, std)]  # log scale
                    ax.fill_between(epochs, low, [m + s for m, s in zip(mean, std)], color=line.get_color(),
                                    alpha=0.2)
            ax.set(title=title, xlabel="epoch")
            if title == "loss":
                ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(out, dpi=100)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Training curves of runs (mean ± std over the seeds of a "
                                                 "configuration), and a reliability diagram of predictions.")
    parser.add_argument("runs", nargs="+", help="run folders (results/<save>)")
    parser.add_argument("--out", required=True, help="the image to write (.png, .pdf, .svg)")
    parser.add_argument("--predictions", default=None, help="a file of main.py --evaluate ... --predictions")
    args = parser.parse_args(argv)
    draw(groups_of(args.runs), args.out, args.predictions)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
