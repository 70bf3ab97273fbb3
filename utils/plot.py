"""Draw runs' training curves, and a reliability diagram of an evaluation's predictions.

    python -m utils.plot results/RUN [results/RUN ...] --out curves.png
    python -m utils.plot results/RUN_seed=* --predictions preds.pt --out curves.png

Three panels over the epochs: the loss (training, and the L-sample test loss), the test
top-1 (the L-sample predictive, the mean network sign(M) and, where the runs have it,
the deployed network: sign(M) with BatchNorm statistics of its own), and the ECE of the
L-sample predictive. Runs of one configuration (``utils.summarize``'s grouping: the same
name but the seed, the same config.json but the seed) are drawn as their mean with a
band of ± one standard deviation over the seeds. A run may be named by its folder or by
its log (``results/<save>.txt``), so the shell pattern of the example picks each run
once; what is not a run is skipped with a word. ``--predictions FILE.pt`` (``main.py
--evaluate CKPT --predictions FILE.pt``) adds a reliability diagram: per confidence
bin, the accuracy against the mean confidence, the number of images and the ECE.

Every input is checked before anything is drawn, and the image is written like every
file of this program: by rename, never through a link, and over an existing file only
with ``--overwrite`` and only if it is a plot this program drew, unchanged since
(its metadata carries the image's digest). matplotlib is optional:
without it, one line says how to get it.
"""
import argparse
import hashlib
import io
import math
import os
import re
import statistics
import sys
import zlib

from . import predictions as predictions_file
from .files import FileError, write_atomic
from .meters import ECE_BINS
from .run_dir import NotOurs, RunDir, check_output
from .summarize import configuration, settings_of

FORMATS = (".png", ".pdf", ".svg")
MARK = "vispa utils.plot"
# The image's metadata carries MARK with the digest of the image as drawn with zeros in its
# place: how --overwrite knows a plot of ours, unchanged since, from a file that merely
# contains the words.
SEAL = re.compile(rb"vispa utils\.plot sha256=([0-9a-f]{64})")
UNSEALED = b"0" * 64
MAX_PLOT_BYTES = 1 << 25
ACCURACY = (("val_prec1", "L-sample predictive"), ("mean_prec1", "mean network sign(M)"),
            ("deployed_prec1", "deployed: sign(M), own BatchNorm statistics"))
PANELS = [("loss", (("train_loss", "train"), ("val_loss", "test"))), ("test top-1 (%)", ACCURACY),
          ("ECE (%), L-sample predictive", (("val_ece", None),))]


class Refused(Exception):
    """An input that cannot be drawn; the message says why."""


def runs_of(paths):
    """The run folders among ``paths`` (a folder, or a run's log ``<save>.txt``), each once,
    in order; what is not a run is skipped with a word on stderr."""
    found = {}
    for path in paths:
        folder = path[:-len(".txt")] if path.endswith(".txt") and os.path.isdir(path[:-len(".txt")]) else path
        run = RunDir(os.path.dirname(os.path.abspath(folder)), os.path.basename(os.path.abspath(folder)))
        if not os.path.isfile(run.metrics):
            print(f"skipping {path}: not a run (no {os.path.basename(run.metrics)})", file=sys.stderr)
            continue
        found.setdefault(os.path.realpath(run.folder), run)
    return list(found.values())


def groups_of(paths):
    """{configuration label: [rows of metrics.csv of each run]} of the runs in ``paths``.
    Refused: a run whose metrics cannot be read; a run without a finished epoch is
    skipped with a word."""
    groups = {}
    for run in runs_of(paths):
        try:
            rows = run.read_metrics()
        except (OSError, KeyError, ValueError, TypeError) as error:
            raise Refused(f"{run.folder}: cannot read its metrics.csv ({error})") from None
        if not rows:
            print(f"skipping {run.folder}: no finished epoch yet", file=sys.stderr)
            continue
        settings = settings_of(run)
        key = (configuration(run.name), repr(sorted((settings or {}).items())))
        groups.setdefault(key, []).append(rows)
    if not groups:
        raise Refused("no run with a finished epoch to draw")
    labels = {}
    for (name, settings), runs in groups.items():
        label = name if sum(1 for other, _ in groups if other == name) == 1 else f"{name} ({settings[:60]})"
        labels[label] = runs
    return labels


def band(runs, column):
    """(epochs, mean, std) over the runs of ``column``, epoch by epoch, where a value exists."""
    epochs, means, stds = [], [], []
    for epoch in sorted({row["epoch"] for rows in runs for row in rows}):
        values = [row[column] for rows in runs for row in rows
                  if row["epoch"] == epoch and row.get(column) is not None]
        if values:
            epochs.append(epoch)
            means.append(statistics.fmean(values))
            stds.append(statistics.stdev(values) if len(values) > 1 else 0.0)
    return epochs, means, stds


def reliability(content):
    """{name: (ECE in percent, [(mean confidence, accuracy, images)] per non-empty bin)} of
    each distribution in a file of predictions (``utils.predictions.read``)."""
    import torch
    curves = {}
    for name, key in (("L-sample predictive", "probs"), ("mean network sign(M)", "mean_probs"),
                      ("deployed network", "deployed_probs")):
        if key not in content:
            continue
        confidence, predicted = content[key].double().max(1)
        correct = predicted.eq(content["labels"]).double()
        edges = torch.linspace(0, 1, ECE_BINS + 1)  # the bins of utils.meters, which the printed ECE has
        bins = (torch.bucketize(confidence.float(), edges, right=True) - 1).clamp(0, ECE_BINS - 1)
        curve, ece = [], 0.0
        for b in range(ECE_BINS):
            inside = bins == b
            count = int(inside.sum())
            if count:
                conf, acc = confidence[inside].mean().item(), correct[inside].mean().item()
                curve.append((conf, acc, count))
                ece += count / len(correct) * abs(acc - conf)
        curves[name] = (100 * ece, curve)
    return curves


def with_digest(image: bytes, digest: bytes) -> bytes:
    """``image`` with ``digest`` written into its seal. In a PNG the seal's chunk carries a
    CRC of its text, which follows, so that the image stays valid for every reader."""
    match = SEAL.search(image)
    image = image[:match.start(1)] + digest + image[match.end(1):]
    if image.startswith(b"\x89PNG"):
        at = 8  # the chunks: length, type, data, CRC of type and data
        while at + 8 <= len(image):
            length = int.from_bytes(image[at:at + 4], "big")
            end = at + 8 + length
            if at + 8 <= match.start(1) < end:
                crc = zlib.crc32(image[at + 4:end]).to_bytes(4, "big")
                return image[:end] + crc + image[end + 4:]
            at = end + 4
    return image


def sealed(image: bytes) -> bytes:
    return with_digest(image, hashlib.sha256(image).hexdigest().encode())


def is_our_plot(path) -> bool:
    """Whether ``path`` is an image this program drew, unchanged since: its seal holds
    the digest of the image with the seal zeroed."""
    try:
        with open(path, "rb") as f:
            image = f.read(MAX_PLOT_BYTES + 1)
    except OSError:
        return False
    match = SEAL.search(image)
    if len(image) > MAX_PLOT_BYTES or match is None:
        return False
    return hashlib.sha256(with_digest(image, UNSEALED)).hexdigest().encode() == match.group(1)


def metadata(extension):
    mark = f"{MARK} sha256={UNSEALED.decode()}"
    return {".png": {"Software": mark}, ".pdf": {"Creator": mark}, ".svg": {"Creator": mark}}[extension]


def draw(groups, out, content=None, predictions_name=""):
    """The figure, as the sealed bytes of the image ``out`` names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    panels = PANELS + ([("reliability", ())] if content is not None else [])
    columns = 2 if len(panels) == 4 else 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4.5 * rows), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        if title == "reliability":
            reliability_panel(ax, reliability(content), predictions_name)
            continue
        for label, runs in groups.items():
            n = f" (n={len(runs)})" if len(runs) > 1 else ""
            for key, what in keys:
                epochs, mean, std = band(runs, key)
                if not epochs:
                    continue
                line, = ax.plot(epochs, mean, marker="o" if len(epochs) < 20 else None, markersize=3,
                                linestyle="--" if key.startswith("deployed") else "-",
                                label=label + (f", {what}" if what else "") + n)
                low = [max(m - s, m / 10) if title == "loss" else m - s for m, s in zip(mean, std)]  # log scale
                ax.fill_between(epochs, low, [m + s for m, s in zip(mean, std)], color=line.get_color(), alpha=0.2)
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if title == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        figure.delaxes(ax)
    figure.tight_layout()
    image = io.BytesIO()
    extension = os.path.splitext(out)[1].lower()
    figure.savefig(image, format=extension[1:], dpi=100, metadata=metadata(extension))
    plt.close(figure)
    return sealed(image.getvalue())


def reliability_panel(ax, curves, name):
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    counts = ax.twinx()
    width = 1 / ECE_BINS
    for i, (label, (ece, curve)) in enumerate(curves.items()):
        line, = ax.plot([c for c, _, _ in curve], [a for _, a, _ in curve], marker="o",
                        label=f"{label}: ECE {ece:.2f}%")
        counts.bar([c + (i - 1) * width / 4 for c, _, _ in curve], [n for _, _, n in curve], width=width / 4,
                   color=line.get_color(), alpha=0.25)
    counts.set_ylabel("images per bin (bars)")
    ax.set(title=f"reliability ({name}, {ECE_BINS} bins)", xlabel="confidence", ylabel="accuracy",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Training curves of runs (mean ± std over the seeds of a "
                                                 "configuration), and a reliability diagram of predictions.")
    parser.add_argument("runs", nargs="+", help="run folders (results/<save>) or their logs (results/<save>.txt)")
    parser.add_argument("--out", required=True, help="the image to write: .png, .pdf or .svg")
    parser.add_argument("--predictions", default=None,
                        help="a file of main.py --evaluate CHECKPOINT --predictions FILE: adds a reliability diagram")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a plot of this program")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: plotting needs matplotlib, which is not installed: pip install matplotlib", file=sys.stderr)
        return 1
    try:  # every input first, then the figure, then the file
        check_output(args.out, args.overwrite, is_our_plot, "--out", "a plot")
        if os.path.splitext(args.out)[1].lower() not in FORMATS:
            raise Refused(f"--out {args.out!r}: the image is a {', '.join(FORMATS)} file; give one of these "
                          f"extensions")
        groups = groups_of(args.runs)
        content = predictions_file.read(args.predictions) if args.predictions else None
        image = draw(groups, args.out, content, os.path.basename(args.predictions or ""))
        new = check_output(args.out, args.overwrite, is_our_plot, "--out", "a plot")  # again: still free?
        write_atomic(args.out, lambda f: f.write(image), new_only=new)
    except (Refused, NotOurs, FileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
