"""Summarise the runs in a results folder, grouped by configuration.

    python -m utils.summarize [results/]

Runs whose log names differ only in ``seed=<n>`` are one configuration. For each
configuration it prints the number of runs and the mean +- standard deviation
(the sample standard deviation, ddof=1, as in the paper's tables), the minimum
and the maximum of their best top-1 accuracy.

Only the end of each log is read. A log always ends with the line
``Best Prec@1: <v> (epoch <e>/<E>)`` (utils/runlog.py) just after its last epoch
line ``Epoch <e>/<E> ...``, so finished and running benchmarks are summarised
alike, however long their logs are. A run whose last epoch line has e < E has
not finished (it is still running, or it stopped); it is marked as such.
"""
import argparse
import os
import re
import statistics
import sys
from dataclasses import dataclass

BEST_LINE = re.compile(r"Best Prec@1: (\S+) \(epoch (\d+)/(\d+)\)")
EPOCH_LINE = re.compile(r"Epoch (\d+)/(\d+)\s")
SEED = re.compile(r"seed=\d+")
TAIL_BYTES = 16384  # the best line and several epoch lines (about 250 bytes each)


@dataclass
class RunStatus:
    """What the end of one log says about its run."""
    path: str
    best_prec1: float
    best_epoch: int
    epoch: int  # the last epoch logged (0 before the first one ends)
    epochs: int

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs


def read_tail(path: str, size: int = TAIL_BYTES) -> list:
    """The last lines of a file, reading at most ``size`` bytes from its end."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        f.seek(max(0, end - size))
        lines = f.read().decode("utf-8", errors="replace").splitlines()
    return lines[1:] if end > size else lines  # the first line read may be cut


def run_status(path: str):
    """The RunStatus of a run log, or None if the file is not one (it does not end
    with a best line)."""
    lines = [line for line in read_tail(path) if line.strip()]
    best = BEST_LINE.fullmatch(lines[-1].strip()) if lines else None
    if best is None:
        return None
    epoch = 0
    for line in reversed(lines[:-1]):
        found = EPOCH_LINE.match(line)
        if found:
            epoch = int(found.group(1))
            break
    return RunStatus(path, float(best.group(1)), int(best.group(2)), epoch, int(best.group(3)))


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


def run_name(log_name: str) -> str:
    """``<name>.txt`` -> ``<name>`` (names hold dots, as in ``lr=0.1``: no splitext)."""
    return log_name[:-len(".txt")] if log_name.endswith(".txt") else log_name


def seed_of(run: str) -> str:
    found = SEED.search(run)
    return found.group(0) if found else run


def collect(results_dir: str):
    """{configuration: [RunStatus, ...]} for the run logs in ``results_dir``, and the
    names of the .txt files there that are not run logs."""
    groups, others = {}, []
    for name in sorted(os.listdir(results_dir)):
        path = os.path.join(results_dir, name)
        if not name.endswith(".txt") or not os.path.isfile(path):
            continue
        status = run_status(path)
        if status is None:
            others.append(name)
        else:
            groups.setdefault(configuration(run_name(name)), []).append(status)
    return groups, others


def report(groups) -> str:
    lines = []
    for config, runs in sorted(groups.items()):
        values = [run.best_prec1 for run in runs]
        lines.append(config)
        lines.append(f"    n={len(runs)}  best top-1 {paper_format(values)}  "
                     f"min {min(values):.2f}  max {max(values):.2f}")
        unfinished = [run for run in runs if not run.finished]
        if unfinished:
            where = ", ".join(f"{seed_of(run_name(os.path.basename(run.path)))} at epoch {run.epoch}/{run.epochs}"
                              for run in unfinished)
            lines.append(f"    running or stopped ({len(unfinished)} of {len(runs)}): {where}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Group run logs by configuration (name without "
                                     "the seed) and print n, mean ± std (ddof=1), min and max of "
                                     "the best top-1 accuracy.")
    parser.add_argument("results_dir", nargs="?", default="./results")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.results_dir):
        print(f"error: {args.results_dir} is not a folder", file=sys.stderr)
        return 1
    groups, others = collect(args.results_dir)
    if not groups:
        print(f"error: no run logs (*.txt ending with a 'Best Prec@1' line) in {args.results_dir}",
              file=sys.stderr)
        return 1
    print(f"Runs in {args.results_dir}, grouped by configuration; best top-1 over epochs, "
          f"mean ± sample std (ddof=1) over seeds")
    print(report(groups))
    if others:
        print(f"(not run logs, ignored: {', '.join(others)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
