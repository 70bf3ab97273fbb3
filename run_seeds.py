"""Run one training recipe for several seeds on a set of device slots, then report.

The benchmark scripts name their recipe (and what they change of the runner's defaults)
as environment variables and end with ``exec python3 run_seeds.py "$@"``:

    RECIPE        the configuration (config.RECIPES) the settings below change
    K S L LR WD LR_DECAY WARMUP_EPOCHS EPOCHS BATCH WIDTH
                  the settings (main.py's -K --scale -L --lr --wd --lr-decay
                  --warmup-epochs --epochs -b --width); unset: the recipe's
    LOADER WORKERS  main.py's --loader and -j; unset: the recipe's
    METHOD METHOD_LR TEMPERATURE RECALIBRATE
                  main.py's --method (vispa, bayesbinn, ste), --method-lr, --temperature
                  and --recalibrate
    SEEDS         the seeds, space-separated (default: the paper's five)
    GPUS          the slots (default "0 1 2 3 4"); arguments given instead override it
    NPROC         GPUs per run (default 1): with more, each run is `torchrun --standalone
                  --nproc_per_node NPROC main.py ...` on a group of NPROC slots
    DATA_ROOT     main.py's --data-root (default: main.py's, ./datasets; ImageNet ./datasets/imagenet)
    RESULTS_DIR   where the logs and run folders go (default, also when empty: ./results)

The runs are named by ``config.run_name`` from the recipe and the settings
(``resnet18_1w32a_cifar100_seed=2020_benchmark_K=8_...``). A slot is a CUDA device
index or ``cpu``. Each slot runs one seed at a time; seeds
beyond the number of slots wait and start as slots free up. A device named several
times has several slots (``0 0 0 0 0``: five concurrent runs on GPU 0).

Each run is ``main.py --recipe <recipe> <settings> --seed <s> --save <name>
--gpus <slot>``; its console output goes to ``results/<name>/console.log``. A run
folder that already holds a checkpoint is resumed (``--resume``), or skipped if that
checkpoint is at the last epoch: after an interruption the same command carries on
where it stopped. When all runs have ended it prints one row per seed (best top-1,
its epoch, the mean and the deployed network's top-1 in that epoch) and the mean ± std over the
seeds, and exits non-zero if any run failed, naming its log and showing the last
lines of its output.

SIGINT / SIGTERM: no further run starts, the running ones are sent SIGTERM (they stop
cleanly, keeping the checkpoint of their last complete epoch) and the script exits
non-zero once they have. The runs are in process groups of their own, so a Ctrl-C
in the terminal reaches them only through this script, once.
"""
import argparse
import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import replace

import checkpoint
import config
from data import DATASETS, DatasetError, InMemory
from utils.run_dir import MAX_NAME_BYTES, STOPPED, RunDir, exit_stopped
from utils.summarize import paper_format, read_tail

MAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "main.py")
SHOWN_LINES = 15  # of a failed run's output


class Run:
    """One seed of the recipe: its files and how it went."""

    def __init__(self, seed, name, results_dir):
        self.seed = seed
        self.files = RunDir(results_dir, name)
        self.resume = False
        self.process = None
        self.slot = None
        self.returncode = None  # stays None for a run skipped as finished, or never started
        self.planned = False    # it was to run (not skipped as finished)
        self.failure = None     # why it could not be started


def say(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# Settings that do not change what a run computes: a finished run made with others is the run asked for.
NOT_COMPUTED = ("workers", "eval_batch_size")


def plan(run, asked):
    """Decide between a new run, resuming, and skipping; say which. True if it must run.
    ``asked``: the Config of this seed's run. A finished run made with other settings
    (those its name does not state, such as RECALIBRATE) is not the run asked for: it is
    named as a failure, not taken for it."""
    files = run.files
    if not os.path.isfile(files.checkpoint):
        say(f"seed {run.seed}: new run, log {files.log}")
        return True
    fields = checkpoint.peek(files.checkpoint)
    progress = (fields["epoch"], fields["epochs"]) if fields and fields["epoch"] is not None else None
    if progress is not None and progress[1] is not None and progress[0] >= progress[1]:
        different = settings_other_than(asked, fields.get("config"))
        if different:
            run.failure = (f"finished already with other settings ({', '.join(different)}): it is not redone; "
                           f"move {files.folder} and its log, or give RESULTS_DIR another folder")
            run.returncode = 1
            say(f"seed {run.seed}: {run.failure}")
            return False
        status = files.status()
        if not (asked.recalibrate and status is not None and status.best_epoch and status.deployed_prec1 is None):
            say(f"seed {run.seed}: finished already (epoch {progress[0]}/{progress[1]} in "
                f"{files.checkpoint}), skipped")
            return False
        say(f"seed {run.seed}: every epoch done; resuming {files.folder} for the deployed network of its best "
            f"epoch, which a stop interrupted")
        run.resume = True
        return True
    run.resume = True
    at = f"epoch {progress[0]}/{progress[1]}" if progress else "a checkpoint that could not be read here"
    say(f"seed {run.seed}: resuming {files.folder} from its checkpoint ({at})")
    return True


def settings_other_than(asked, saved):
    """``name=saved (asked: value)`` for each setting of a run's checkpoint (``saved``, its
    config dict; older files: the defaults where it has none) that differs from ``asked``."""
    try:
        saved = config.Config.from_dict(saved).to_dict()
    except (TypeError, ValueError):
        return []  # a file of another version: its settings are checked when it is read
    return [f"{name}={saved[name]} (asked: {value})" for name, value in asked.to_dict().items()
            if name not in NOT_COMPUTED and saved[name] != value]


def launch(run, slot, recipe, main_args, env):
    """main.py for this seed: a new run from the recipe, or the run resumed (its settings
    then come from its checkpoint, and those given must agree with them). A slot of
    several GPUs runs it under torchrun, one rank per GPU."""
    files = run.files
    devices = slot.split()
    command = [sys.executable, MAIN]
    if len(devices) > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(len(devices)), MAIN]
        if devices[0] != "cpu":
            env = dict(env, CUDA_VISIBLE_DEVICES=",".join(devices))
    command += [*main_args, "--seed", str(run.seed), "--save", files.name, "--results-dir", files.results_dir]
    if len(devices) == 1 or devices[0] == "cpu":
        command += ["--gpus", devices[0]]
    command += ["--resume", files.folder] if run.resume else ["--recipe", recipe]
    os.makedirs(files.folder, exist_ok=True)
    # appended to, never through a link (O_NOFOLLOW) nor into a file with another name (a hard link)
    console = os.open(files.console, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    found = os.fstat(console)
    if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
        os.close(console)
        raise OSError(errno.EMLINK, "it is not a file of its own (a hard link, or not a file): never appended to",
                      files.console)
    try:
        run.process = subprocess.Popen(command, stdout=console, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    finally:
        os.close(console)
    run.slot = slot
    where = "the CPU" if devices[0] == "cpu" else ("GPU " if len(devices) == 1 else "GPUs ") + ", ".join(devices)
    say(f"seed {run.seed}: started on {where}" + (f" ({len(devices)} ranks)" if len(devices) > 1 else ""))


def slot_environment(slot, slots):
    """Runs sharing the CPU split its cores between them unless OMP_NUM_THREADS is set:
    several runs each using every core slow each other down badly."""
    env = dict(os.environ)
    processes = sum(len(s.split()) for s in slots if s.split()[0] == "cpu")
    if slot.split()[0] == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def run_all(runs, slots, recipe, main_args):
    """Start the runs as slots free up and wait for all; the signal that stopped them, if any."""
    queue, free, running = list(runs), list(slots), []
    stop = []

    def on_signal(signum, frame):
        stop.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    forwarded = False
    try:
        while running or (queue and not stop):
            while queue and free and not stop:
                run, slot = queue.pop(0), free.pop(0)
                try:
                    launch(run, slot, recipe, main_args, slot_environment(slot, slots))
                except OSError as error:  # its folder cannot be written: the others go on
                    run.failure = f"cannot start it: {error.strerror or error}: {error.filename or run.files.folder}"
                    run.returncode = 1
                    free.append(slot)
                    say(f"seed {run.seed}: {run.failure}")
                    continue
                running.append(run)
            if stop and not forwarded:
                say(f"{signal.Signals(stop[0]).name}: stopping the running runs (each keeps the "
                    f"checkpoint of its last complete epoch); the same command resumes them")
                for run in running:
                    run.process.send_signal(signal.SIGTERM)
                forwarded = True
            time.sleep(0.2)
            for run in [r for r in running if r.process.poll() is not None]:
                running.remove(run)
                free.append(run.slot)
                run.returncode = run.process.returncode
                if forwarded and run.returncode != 0 and stopped_cleanly(run):
                    run.returncode = exit_stopped(signal.SIGTERM)
                if run.returncode == 0:
                    say(f"seed {run.seed}: finished")
                else:
                    say(f"seed {run.seed}: exited with status {run.returncode}")
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return stop[0] if stop else None


def stopped_cleanly(run):
    """After our SIGTERM: a run killed by it before its handler was in place, or a
    torchrun run whose ranks stopped cleanly (torchrun itself then exits 1)."""
    if run.returncode == -signal.SIGTERM:
        return True
    try:
        return any(line.startswith("Stopped by ") for line in read_tail(run.files.log)[-3:])
    except OSError:
        return False


def table(runs, template):
    """One row per seed and the mean ± std over the seeds that finished."""
    lines = ["", "  seed   best top-1   epoch of best   that epoch: mean network   deployed network"]
    best, mean_net, deployed = [], [], []
    for run in runs:
        status = run.files.status()
        if run.planned and run.process is None and run.failure is None:
            lines.append(f"  {run.seed:<6} not started (the command was stopped first); runs when it is run again")
            continue
        if run.failure is not None:
            lines.append(f"  {run.seed:<6} FAILED ({run.failure})")
            continue
        if run.returncode in STOPPED:
            at = f" after epoch {status.epoch}/{status.epochs}" if status else ""
            lines.append(f"  {run.seed:<6} stopped{at}, resumes when the command is run again")
            continue
        if run.returncode not in (None, 0) or status is None:
            why = f"exit status {run.returncode}" if run.returncode else f"no metrics {run.files.metrics}"
            lines.append(f"  {run.seed:<6} FAILED ({why})")
            continue
        net, ours = status.mean_prec1, status.deployed_prec1
        best.append(status.best_prec1)
        mean_net += [net] if net is not None else []
        deployed += [ours] if ours is not None else []
        lines.append(f"  {run.seed:<6} {status.best_prec1:>10.2f}   "
                     f"{f'{status.best_epoch}/{status.epochs}':>13}   "
                     f"{'-' if net is None else f'{net:.2f}':>24}   {'-' if ours is None else f'{ours:.2f}':>16}")
    if best:
        lines += ["", template.replace("{seed}", "*"),
                  f"  best top-1 {paper_format(best)}   mean network "
                  f"{paper_format(mean_net) if mean_net else '-'}   deployed network "
                  f"{paper_format(deployed) if deployed else '-'}   "
                  f"(mean ± sample std, ddof=1, over {len(best)} of {len(runs)} seed{'s' if len(runs) > 1 else ''})"]
    return "\n".join(lines)


def failure_report(run):
    if run.failure is not None:
        return f"FAILED: seed {run.seed}: {run.failure}"
    log = f"log {run.files.log}" if os.path.exists(run.files.log) else "it wrote no log"
    lines = [f"FAILED: seed {run.seed} (exit status {run.returncode}), {log}; "
             f"the last lines of its output ({run.files.console}):"]
    try:
        lines += ["    " + line for line in read_tail(run.files.console)[-SHOWN_LINES:]]
    except OSError as error:
        lines.append(f"    (cannot read it: {error.strerror})")
    return "\n".join(lines)


# The environment variables of the settings, and the main.py options they set.
SETTINGS = {"K": "-K", "S": "--scale", "L": "-L", "LR": "--lr", "WD": "--wd", "LR_DECAY": "--lr-decay",
            "WARMUP_EPOCHS": "--warmup-epochs", "EPOCHS": "--epochs", "BATCH": "-b", "WIDTH": "--width",
            "LOADER": "--loader", "WORKERS": "-j", "METHOD": "--method", "METHOD_LR": "--method-lr",
            "TEMPERATURE": "--temperature", "RECALIBRATE": "--recalibrate"}
PAPER_SEEDS = "2020 2024 1314 512 2333"


def usage_error(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse(argv, env):
    """The recipe, seeds, slots, results folder and main.py arguments the environment
    and the arguments (slots) ask for; exit status 2 with one line for bad ones."""
    recipe = env.get("RECIPE", "")
    if recipe not in config.RECIPES:
        usage_error(f"RECIPE must be one of {', '.join(sorted(config.RECIPES))}, got {recipe!r}")
    try:
        seeds = [int(s) for s in env.get("SEEDS", PAPER_SEEDS).split()]
    except ValueError:
        usage_error(f"SEEDS must be integers, got {env['SEEDS']!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        usage_error(f"give one or more different seeds, got {seeds}")
    slots = argv or (env.get("GPUS") or "0 1 2 3 4").split()  # empty: unset
    bad = [s for s in slots if s != "cpu" and not s.isdigit()]
    if not slots or bad:
        usage_error(f"GPU slots are CUDA device indices or 'cpu', got {' '.join(slots) or 'none'}")
    nproc = env.get("NPROC", "1")
    if not nproc.isdigit() or int(nproc) < 1 or len(slots) % int(nproc):
        usage_error(f"NPROC must be a number of GPUs per run that divides the {len(slots)} slots, got {nproc!r}")
    nproc = int(nproc)
    slots = [" ".join(slots[i:i + nproc]) for i in range(0, len(slots), nproc)]  # a slot: a run's GPUs
    main_args = []
    for variable, option in SETTINGS.items():
        if env.get(variable, "") != "":
            main_args += [option, env[variable]]
    settings = argparse.ArgumentParser(add_help=False)
    config.add_arguments(settings, config.RECIPES[recipe])
    try:
        cfg = config.from_args(settings.parse_args(main_args))
    except SystemExit:
        usage_error(f"a setting is not valid: {' '.join(main_args)}")
    vispas = [variable for variable in ("K", "S") if env.get(variable, "") != ""]
    if cfg.method != "vispa" and vispas:
        usage_error(f"{' and '.join(vispas)}: the rank and scale of VISPA's covariance factor, which METHOD="
                    f"{cfg.method} does not have; unset {'them' if len(vispas) > 1 else 'it'}")
    for problem in cfg.contradictions():
        usage_error(problem)
    if env.get("DATA_ROOT", "") != "":  # else main.py's default for the dataset
        main_args += ["--data-root", env["DATA_ROOT"]]
    return recipe, cfg, seeds, slots, env.get("RESULTS_DIR") or "./results", main_args


def check_slots(slots):
    """One line, in the scripts' own terms, when a slot names a GPU this machine does not have."""
    import torch
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = sorted({d for slot in slots for d in slot.split() if d != "cpu" and int(d) >= count}, key=int)
    if not missing:
        return None
    given = " ".join(slots)
    if count == 0:
        return (f"GPUS={given!r}: this machine has no GPU; run on the CPU with GPUS=cpu (GPUS=\"cpu cpu\" for two "
                f"runs at a time)")
    return (f"GPUS={given!r} names GPU {', '.join(missing)}, and this machine has {count} "
            f"(GPUs 0 to {count - 1}); give those, or cpu")


def check_dataset(cfg, env):
    """One line, before anything starts, when the recipe's dataset is not where the runs would read it."""
    dataset = DATASETS[cfg.dataset]
    root = env.get("DATA_ROOT") or dataset.default_root
    try:
        if isinstance(dataset, InMemory):
            dataset.read(root, "test")
        else:
            dataset.check(root)
    except DatasetError as error:
        return f"{error} (DATA_ROOT={root!r}: set DATA_ROOT to the folder that holds it)"
    return None


def main(argv=None):
    recipe, cfg, seeds, slots, results_dir, main_args = parse(sys.argv[1:] if argv is None else argv,
                                                             os.environ)
    problem = check_slots(slots) or check_dataset(cfg, os.environ)
    if problem:  # once, before any run starts or any folder is made
        print(f"error: {problem}", file=sys.stderr)
        return 1
    runs = [Run(seed, config.run_name(recipe, cfg, seed), results_dir) for seed in seeds]
    too_long = max(len(run.files.name.encode()) for run in runs)
    if too_long > MAX_NAME_BYTES:  # a run name states the settings other than the recipe's
        print(f"error: these settings give run names of {too_long} bytes, more than {MAX_NAME_BYTES} (e.g. "
              f"{runs[0].files.name}): set fewer of them away from the recipe, or shorter values", file=sys.stderr)
        return 2
    try:  # a results folder that cannot be written: one line, before anything starts
        os.makedirs(results_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=results_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        print(f"error: cannot write to RESULTS_DIR {results_dir}: {error.strerror or error}", file=sys.stderr)
        return 1
    say(f"{len(runs)} seed{'s' if len(runs) != 1 else ''} of {recipe} on the slot{'s' if len(slots) != 1 else ''} "
        f"{' '.join(slots)}; logs in {results_dir}/")
    to_run = [run for run in runs if plan(run, replace(cfg, seed=run.seed))]
    for run in to_run:
        run.planned = True
    signum = run_all(to_run, slots, recipe, main_args)
    print(table(runs, config.run_name(recipe, cfg)))
    for run in runs:  # runs stopped by our own signal are not failures
        if run.returncode not in (None, 0) and not (signum and run.returncode in STOPPED):
            print(failure_report(run))
    if signum is not None:
        print(f"Stopped by {signal.Signals(signum).name}: run the same command again to resume.")
        return exit_stopped(signum)
    return 1 if any(run.returncode not in (None, 0) for run in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
