"""Summarise the runs in a results folder, grouped by configuration.

    python -m utils.summarize [results/]

Runs whose names differ only in ``seed=<n>`` are one configuration. For each
configuration it prints the number of runs and the mean +- standard deviation
(the sample standard deviation, ddof=1, as in the paper's tables), the minimum
and the maximum of their best top-1 accuracy (the L-sample predictive), and the
mean +- std of the top-1 in that epoch of the mean network and of the deployed
network (sign(M) with BatchNorm statistics of its own), where the runs have them.

A run is read from its folder's ``metrics.csv`` and ``config.json``
(utils/run_dir.py), which are rewritten after every epoch, so finished and running
benchmarks are summarised alike. A run that has not reached its last epoch (it is
still running, or it stopped) is marked as such; one that has not finished an
epoch yet is listed, not counted. A run whose files cannot be read is named as
such, and the others are summarised all the same.
"""
import argparse
import json
import os
import re
import statistics
import sys

from .run_dir import METRICS, RunDir

SEED = re.compile(r"seed=\d+")
TAIL_BYTES = 16384


def read_tail(path: str, size: int = TAIL_BYTES) -> list:
    """The last lines of a file, reading at most ``size`` bytes from its end."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(0, end - size))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    return lines[1:] if end > size else lines  # the first line read may be cut


def mean_std(values):
    """Mean and sample standard deviation (ddof=1; None for a single value)."""
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else None


def paper_format(values) -> str:
    """``77.05 ± 0.41``, the format of the paper's tables."""
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if std is not None else f"{mean:.2f} (one run, no std)"


def configuration(run_name: str) -> str:
    """The name of a run's configuration: its name with the seed replaced by ``*``."""
    return SEED.sub("seed=*", run_name)


def seed_of(run: str) -> str:
    found = SEED.search(run)
    return found.group(0) if found else run


def settings_of(run: RunDir):
    """The run's settings from its config.json, without the seed (what makes runs of one
    configuration), or None for a run without one."""
    try:
        with open(run.config) as f:
            settings = json.load(f)
    except (OSError, ValueError):
        return None
    return {k: v for k, v in settings.items() if k != "seed"} if isinstance(settings, dict) else None


def collect(results_dir: str):
    """{configuration: [RunStatus, ...]} of the run folders in ``results_dir``, and the
    names of those whose files cannot be read. A configuration is the runs whose names
    differ only in the seed and whose config.json agree but for the seed; runs of one
    name and other settings (another model, dataset, K, ...) are another configuration,
    named with the settings in which it differs."""
    found, unreadable = {}, []
    for name in sorted(os.listdir(results_dir)):
        if not os.path.isfile(os.path.join(results_dir, name, METRICS)):
            continue
        run = RunDir(results_dir, name)
        status = run.status()
        if status is None:
            unreadable.append(name)
            continue
        settings = settings_of(run)
        key = (configuration(name), json.dumps(settings, sort_keys=True))
        found.setdefault(key, (settings, []))[1].append(status)
    groups = {}
    for (label, _), (settings, runs) in found.items():
        others = [s for (other, _), (s, _) in found.items() if other == label and s != settings]
        if others:  # one name, several configurations: say what tells this one apart
            differ = sorted({k for other in others for k in set(settings or {}) | set(other or {})
                             if (settings or {}).get(k) != (other or {}).get(k)})
            label += " [" + ", ".join(f"{k}={(settings or {}).get(k)}" for k in differ) + "]"
        groups[label] = runs
    return groups, unreadable


def report(groups) -> str:
    lines = []
    for config, runs in sorted(groups.items()):
        values = [run.best_prec1 for run in runs if run.epoch > 0]
        lines.append(config if config.isprintable() else repr(config))  # a newline in a name is not a new line
        if values:
            lines.append(f"    n={len(values)}  best top-1 {paper_format(values)}  "
                         f"min {min(values):.2f}  max {max(values):.2f}")
            for what, found in (("mean network", [r.mean_prec1 for r in runs if r.epoch > 0]),
                                ("deployed network", [r.deployed_prec1 for r in runs if r.epoch > 0])):
                found = [value for value in found if value is not None]
                if found:
                    lines.append(f"    at the best epoch: {what} top-1 {paper_format(found)} (n={len(found)})")
        unfinished = [run for run in runs if not run.finished]
        if unfinished:
            where = ", ".join(f"{seed_of(run.name)} at epoch {run.epoch}/{run.epochs}" for run in unfinished)
            lines.append(f"    running or stopped ({len(unfinished)} of {len(runs)}): {where}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Group runs by configuration (name without the "
                                     "seed) and print n, mean ± std (ddof=1), min and max of the "
                                     "best top-1 accuracy, and the mean network's and the deployed "
                                     "network's top-1 in that epoch.")
    parser.add_argument("results_dir", nargs="?", default="./results")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results_dir):
        print(f"error: {args.results_dir} is not a folder", file=sys.stderr)
        return 1
    groups, unreadable = collect(args.results_dir)
    if not groups:
        print(f"error: no runs (folders with a readable {METRICS}) in {args.results_dir}", file=sys.stderr)
        return 1
    print(f"Runs in {args.results_dir}, grouped by configuration; best top-1 over epochs, "
          f"mean ± sample std (ddof=1) over seeds")
    print(report(groups))
    if unreadable:
        print(f"(cannot be read, left out: {', '.join(unreadable)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
