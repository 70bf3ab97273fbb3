"""Train a binary network with VISPA, evaluate one, or export one.

    python main.py --demo                              # about a minute, generated data, CPU
    python main.py --model resnet18 --dataset cifar100 --save my_run
    python main.py --recipe vgg16_1w32a_cifar10 --seed 2020 --save my_vgg
    torchrun --nproc_per_node 4 main.py --recipe resnet18_1w32a_tiny-imagenet --save t
    python main.py --resume results/my_run             # continue a stopped run exactly
    python main.py --evaluate results/my_run/model_best.pth.tar
    python main.py --export results/my_run/model_best.pth.tar --out model.bnn

This file is the command line: the options (made from config.py), then one of
training (training.py: the run), --evaluate, --export and --demo (factory.py makes the
network, its data, and a network read back from a file). The run's
files are described in ``utils/run_dir.py``: the log is ``results/<save>.txt`` and
ends with the best accuracy; checkpoints and ``metrics.csv`` are in
``results/<save>/``.

A kill at any moment loses at most the current epoch: checkpoints are replaced
atomically, and ``--resume`` continues from the last one exactly as if the run
had not stopped. Exit status: 0 done; 1 an error (one line on stderr, nothing
overwritten); 2 bad command line; 3 the training diverged (the checkpoint of the
last good epoch stays); 128 + signal number after SIGINT / SIGTERM (the log says
how to resume).
"""
import argparse
import glob
import os
import shutil
import signal
import sys
import tempfile

import torch

from config import (DEFAULT_RECIPE, RECIPES, Config, UsageError, add_arguments, from_args, settings_on_command_line,
                    spellings, vispa_settings_for_a_rival)
from data import DATASETS, DatasetError
from evaluate import Evaluation, Export, evaluate, export
from training import FORK, NEW, RESUME, REWIND, Request, train
from utils import distributed, environment, threads
from utils.files import FileError
from utils.tensorboard import Unavailable
from utils.run_dir import EXIT_ERROR, MAX_NAME_BYTES, NotOurs, RunInUse, exit_stopped, valid_run_name


# ---- command line ------------------------------------------------------------------------

class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one to show (not None, not a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def build_parser(defaults=RECIPES[DEFAULT_RECIPE]):
    p = argparse.ArgumentParser(
        description="Train binary networks on CIFAR, Tiny-ImageNet or ImageNet with VISPA: Gaussian "
                    "variational inference over the binary weights with a rank-K covariance factor. "
                    "The defaults are the paper's recipe (ResNet18, CIFAR-100, 1W32A).",
        formatter_class=HelpWithDefaults)
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="start from one of the authors' configurations (options given too override it)")
    add_arguments(p, defaults)

    def a(*flags, **options):  # hyphens documented, underscores accepted (config.spellings)
        return p.add_argument(*spellings(*flags), **options)
    a("--data-root", default=None, type=path,
      help="folder holding cifar-100-python/, cifar-10-batches-py/ or tiny-imagenet-200/ (ImageNet: its "
           "train/ and val/) (default: ./datasets, for ImageNet ./datasets/imagenet; with --resume or --evaluate "
           "of a checkpoint of ours, the folder the run was trained on)")
    a("--gpus", default=None, help="CUDA device index, or 'cpu' (default: GPU 0 if there is one)")
    a("--save", default=None, help="run name: log results/<save>.txt, checkpoints results/<save>/ "
      "(default: <model>_<dataset>_<date>)")
    a("--results-dir", default="./results", type=path, help="where run logs (<save>.txt) and run folders go")
    a("-e", "--evaluate", metavar="FILE", default=None, type=path,
      help="evaluate a checkpoint on the test set (ours, or the authors' released layout with "
           "--model/--dataset naming the network; K is read from the file), or an exported network "
           "(.bnn), and exit")
    a("--export", metavar="FILE", default=None, type=path,
      help="export the network to deploy of a checkpoint (ours, or the authors' with --model/--dataset) to "
           "--out: sign(M) with BatchNorm statistics of its own, recomputed on --recalibrate training images "
           "(--recalibrate 0: those of training), binary weights packed 8 per byte, the rest float32; then exit")
    a("--out", metavar="FILE", default=None, type=path, help="where --export writes the network (e.g. model.bnn)")
    a("--predictions", metavar="FILE", default=None, type=path,
      help="with --evaluate: write the per-image probabilities of the L-sample predictive ('probs', N x C), of "
           "the mean network ('mean_probs') and of the deployed network ('deployed_probs'), the 'labels', the "
           "averaged 'logits' and each image's negative log-likelihood ('nll', 'mean_nll', 'deployed_nll') to "
           "FILE (torch.load(FILE, weights_only=True))")
    a("--ood", metavar="DATASET", choices=sorted(DATASETS), default=None,
      help="with --evaluate: tell the test set of the network's dataset from that of DATASET (e.g. cifar10 "
           "against cifar100) by the predictive entropy, the mutual information and the mean network's maximum "
           "probability: AUROC and FPR at 95%% TPR")
    a("--ood-data-root", metavar="DIR", default=None, type=path,
      help="where --ood's dataset is (default: its usual folder)")
    a("--tensorboard", action="store_true",
      help="also write every column of metrics.csv as a TensorBoard scalar to results/<save>/tb/ (needs the "
           "tensorboard package; a resumed run goes on writing there)")
    a("--resume", nargs="?", const="", default=None, metavar="PATH",
      help="continue a run from its latest checkpoint: the run folder, its checkpoint.pth.tar, or "
           "nothing for the folder of --save")
    a("--rewind", action="store_true",
      help="with --resume FILE: go back to the epoch of FILE (the run's model_best.pth.tar, say), "
           "discarding the run's later epochs")
    a("--fork", action="store_true",
      help="with --resume FILE --save NAME: start the new run NAME from the state in FILE, with its "
           "settings except those given; nothing outside NAME's own files is written")
    a("--overwrite", action="store_true", help="start over in a --save folder that already holds a run")
    a("--threads", type=positive_int, default=None,
      help="CPU threads of this process (default: OMP_NUM_THREADS if set, else the cores it may use, shared "
           "among torchrun's ranks on the machine; a resumed run keeps the count it started with). Results "
           "on the CPU depend on the thread count; the log states it")
    a("--demo", action="store_true",
      help="a run of the whole pipeline on a small generated dataset, on the CPU with one thread "
           "(about a minute; its result does not depend on the machine's cores)")
    return p


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def path(text):
    """An empty path is refused: it is usually an unset shell variable, and would mean the current folder."""
    if not text:
        raise argparse.ArgumentTypeError("expected a path, got an empty string (an unset shell variable?)")
    return text


def parse_args(argv):
    """(options, the run config they describe, the names of the settings typed on the command line)."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    chosen = recipe.parse_known_args(argv)[0].recipe
    parser = build_parser(RECIPES[chosen or DEFAULT_RECIPE])
    args = parser.parse_args(argv)
    cfg = from_args(args)
    typed = settings_on_command_line(argv)
    if args.resume is None and args.evaluate is None and args.export is None:  # else: with the file's settings
        for problem in cfg.contradictions():
            parser.error(problem)
        problem = vispa_settings_for_a_rival(cfg.method, typed)
        if problem:
            parser.error(problem)
    return args, cfg, typed


def check_combinations(args):
    """Options that contradict each other are refused before anything is read or written."""
    if args.evaluate is not None and args.resume is not None:
        raise UsageError("--evaluate and --resume exclude each other: evaluate a checkpoint, or resume a run")
    if (args.export is None) != (args.out is None):
        raise UsageError("--export FILE and --out FILE go together: the checkpoint, and where its network goes")
    if args.export is not None and (args.evaluate is not None or args.resume is not None):
        raise UsageError("--export excludes --evaluate and --resume: export a checkpoint, then evaluate the file")
    if args.resume is not None and args.overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run, or start it over")
    if args.resume is not None and args.recipe is not None:
        raise UsageError("a resumed run keeps the settings of its checkpoint: leave --recipe out")
    if args.save is not None and not (valid_run_name(args.save) and len(args.save.encode()) <= MAX_NAME_BYTES):
        raise UsageError(f"--save takes a run name (a folder name in --results-dir, printable, without '/', not "
                         f"starting with '.', at most {MAX_NAME_BYTES} bytes), got {args.save!r}")
    if (args.rewind or args.fork) and not args.resume:
        raise UsageError("--rewind and --fork go with --resume FILE, the checkpoint to start from")
    if args.rewind and args.fork:
        raise UsageError("--rewind and --fork exclude each other: go back in the same run, or start a new one")
    if args.fork and args.save is None:
        raise UsageError("--fork needs --save NAME, the name of the new run")
    if (args.predictions or args.ood or args.ood_data_root) and args.evaluate is None:
        raise UsageError("--predictions, --ood and --ood-data-root go with --evaluate FILE")
    if args.ood_data_root and not args.ood:
        raise UsageError("--ood-data-root goes with --ood DATASET")
    if args.threads is not None and args.threads > threads.usable_cores():
        raise UsageError(f"--threads {args.threads}: this process may use {threads.usable_cores()} CPU cores; give "
                         f"at most that many (more threads than cores wait for each other)")
    if args.tensorboard and (args.evaluate is not None or args.export is not None):
        raise UsageError("--tensorboard writes a training run's metrics: it goes with training, not --evaluate "
                         "or --export")


def evaluation_request(args, cfg, on_command_line) -> Evaluation:
    return Evaluation(args.evaluate, cfg, frozenset(on_command_line), data_root=args.data_root,
                      predictions=args.predictions, ood=args.ood, ood_data_root=args.ood_data_root,
                      overwrite=args.overwrite)


def export_request(args, cfg, on_command_line) -> Export:
    return Export(args.export, args.out, cfg, frozenset(on_command_line), data_root=args.data_root,
                  overwrite=args.overwrite)


def run_request(args) -> Request:
    """What the command line asks of a training run, decided once."""
    mode = FORK if args.fork else REWIND if args.rewind else RESUME if args.resume is not None else NEW
    return Request(mode, name=args.save, results_dir=args.results_dir, source=args.resume or None,
                   start_over=args.overwrite, data_root=args.data_root, gpus=args.gpus, threads=args.threads,
                   tensorboard=args.tensorboard, start_over_only_on=args.data_root if args.demo else None)


DEMO = Config(model="resnet18", dataset="cifar10", width=12, epochs=6, batch_size=64,
              eval_batch_size=500, lr=0.1, warmup_epochs=1, K=4, L=4, seed=0)


def demo(args):
    """A small setting that trains in about a minute on one CPU thread, on a generated
    dataset in the CIFAR-10 format (written once into the results folder, whole or not
    at all). It replaces the demo's earlier run, and no other run named "demo"."""
    from data.synthetic import write_structured_cifar
    args.gpus, args.save, args.overwrite = "cpu", "demo", True
    args.threads = args.threads or 1  # the same result on every machine, and no waiting for busy cores
    args.data_root = os.path.join(args.results_dir, "demo_data")
    target = os.path.join(args.data_root, "cifar-10-batches-py")
    if not os.path.isdir(target):
        os.makedirs(args.data_root, exist_ok=True)
        for left in glob.glob(os.path.join(args.data_root, ".writing.*")):  # by a demo killed while writing
            shutil.rmtree(left, ignore_errors=True)
        staging = tempfile.mkdtemp(prefix=".writing.", dir=args.data_root)
        write_structured_cifar(staging, "cifar10", num_train=2000, num_test=500, seed=0)
        os.rename(os.path.join(staging, "cifar-10-batches-py"), target)
        shutil.rmtree(staging)
    return DEMO


# ---- devices, seeds, the network -----------------------------------------------------------

def select_device(gpus, world):
    """--gpus, or with torchrun the GPU of the rank's LOCAL_RANK (or the CPU with --gpus cpu)."""
    if world.several and (gpus or "").strip().lower() != "cpu":
        if not torch.cuda.is_available():
            raise UsageError("torchrun found no GPU for its ranks: add --gpus cpu to run them on the CPU")
        return torch.device("cuda", world.local_rank)
    if gpus is None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if gpus.strip().lower() == "cpu":
        return torch.device("cpu")
    try:
        index = int(gpus)
    except ValueError:
        raise UsageError(f"--gpus takes one CUDA device index or 'cpu', got {gpus!r}") from None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not 0 <= index < count:
        raise UsageError(f"--gpus {index}: no such CUDA device (this machine has "
                         f"{count or 'no'} GPU{'s' if count != 1 else ''}; use --gpus cpu)")
    return torch.device("cuda", index)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, cfg, on_command_line = parse_args(argv)
    broken = environment.problem()  # a torchvision of another torch: one line, before anything else
    if broken:
        print(f"error: {broken}", file=sys.stderr)
        return EXIT_ERROR
    world = distributed.World()
    try:
        world = distributed.from_environment()
        check_combinations(args)
        if args.demo:
            cfg = demo(args)
        device = select_device(args.gpus, world)
        threads.use(threads.choose(args.threads))
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True
        if args.export:
            return export(export_request(args, cfg, on_command_line))
        distributed.start(world, device)
        try:
            distributed.agree(dict(vars(args), **cfg.to_dict()), world, "options")
            if args.evaluate:
                return evaluate(evaluation_request(args, cfg, on_command_line), device, world)
            return train(run_request(args), cfg, on_command_line, device, world)
        finally:
            distributed.finish(world)
    except (UsageError, DatasetError, FileError, RunInUse, NotOurs, distributed.RankError, Unavailable) as error:
        print(f"error: {error}" + (f" (rank {world.rank})" if world.several else ""), file=sys.stderr)
        return EXIT_ERROR
    except (MemoryError, torch.cuda.OutOfMemoryError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else "no detail"
        print(f"error: out of memory ({first[:200]}): try a smaller -b, --eval-batch-size, -K or --width",
              file=sys.stderr)
        return EXIT_ERROR
    except OSError as error:  # a file the run writes: disk full, permissions, ...
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run started
        print("error: interrupted; the last checkpoint written, if any, is intact", file=sys.stderr)
        return exit_stopped(signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
