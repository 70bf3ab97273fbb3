"""Train a binary network with VISPA, evaluate one, or export one.

    python main.py --demo                              # about a minute, generated data, CPU
    python main.py --model resnet18 --dataset cifar100 --save my_run
    python main.py --recipe vgg16_1w32a_cifar10 --seed 2020 --save my_vgg
    torchrun --nproc_per_node 4 main.py --recipe resnet18_1w32a_tiny-imagenet --save t
    python main.py --resume results/my_run             # continue a stopped run exactly
    python main.py --evaluate results/my_run/model_best.pth.tar
    python main.py --export results/my_run/model_best.pth.tar --out model.bnn

This file is the command line: the options (made from config.py), then one of
training (training.py: the epoch loop), --evaluate, --export and --demo. The run's
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
import os
import signal
import sys
from dataclasses import replace

import torch

import engine
from config import DEFAULT_RECIPE, RECIPES, Config, add_arguments, from_args, typed_settings
from data import DATASETS, DatasetError
from models import is_binary, packed, released
from training import (UsageError, build, conflicts, data_folder, dataset_moved,
                      evaluation_draws, load_ours, progress, require, saved_config, test_batches, train)
from utils import checkpoint, distributed, threads
from utils.checkpoint import CheckpointError
from utils.run_dir import EXIT_ERROR, EXIT_OK, RunInUse, exit_stopped


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
    a = p.add_argument
    a("--data_root", default=None,
      help=f"folder holding cifar-100-python/, cifar-10-batches-py/ or tiny-imagenet-200/ (ImageNet: its "
           f"train/ and val/) "
           f"(default: ./datasets, for ImageNet ./datasets/imagenet; with --resume or --evaluate of a checkpoint of ours, the "
           f"folder the run was trained on)")
    a("--gpus", default=None, help="CUDA device index, or 'cpu' (default: GPU 0 if there is one)")
    a("--save", default=None, help="run name: log results/<save>.txt, checkpoints results/<save>/ "
      "(default: <model>_<dataset>_<date>)")
    a("--results_dir", default="./results", help="where run logs (<save>.txt) and run folders go")
    a("-e", "--evaluate", metavar="FILE", default=None,
      help="evaluate a checkpoint on the test set (ours, or the authors' released layout with "
           "--model/--dataset naming the network; K is read from the file), or an exported network "
           "(.bnn), and exit")
    a("--export", metavar="FILE", default=None,
      help="export the mean network sign(M) of a checkpoint (ours, or the authors' with --model/--dataset) "
           "to --out: binary weights packed 8 per byte, the rest float32; then exit")
    a("--out", metavar="FILE", default=None, help="where --export writes the network (e.g. model.bnn)")
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


def parse_args(argv):
    """(options, the run config they describe, the names of the settings typed out)."""
    recipe = argparse.ArgumentParser(add_help=False)
    recipe.add_argument("--recipe", choices=sorted(RECIPES), default=None)
    chosen = recipe.parse_known_args(argv)[0].recipe
    args = build_parser(RECIPES[chosen or DEFAULT_RECIPE]).parse_args(argv)
    return args, from_args(args), typed_settings(argv)


def check_combinations(args, typed):
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
    if args.save is not None and (not args.save.strip(". ") or "/" in args.save or args.save.startswith(".")):
        raise UsageError(f"--save takes a run name (a folder name in --results_dir, without '/' and not "
                         f"starting with '.'), got {args.save!r}")
    if (args.rewind or args.fork) and not args.resume:
        raise UsageError("--rewind and --fork go with --resume FILE, the checkpoint to start from")
    if args.rewind and args.fork:
        raise UsageError("--rewind and --fork exclude each other: go back in the same run, or start a new one")
    if args.fork and args.save is None:
        raise UsageError("--fork needs --save NAME, the name of the new run")


DEMO = Config(model="resnet18", dataset="cifar10", width=12, epochs=6, batch_size=64,
              eval_batch_size=500, lr=0.1, warmup_epochs=1, K=4, L=4, seed=0)


def demo(args):
    """A small setting that trains in about a minute on one CPU thread, on a generated
    dataset in the CIFAR-10 format (written once into the results folder)."""
    from data.synthetic import write_structured_cifar
    args.gpus, args.save, args.overwrite = "cpu", "demo", True
    args.threads = args.threads or 1  # the same result on every machine, and no waiting for busy cores
    args.data_root = os.path.join(args.results_dir, "demo_data")
    if not os.path.isdir(os.path.join(args.data_root, "cifar-10-batches-py")):
        write_structured_cifar(args.data_root, "cifar10", num_train=2000, num_test=500, seed=0)
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


# ---- checkpoints ------------------------------------------------------------------------------

def load_released(model, opt, found):
    """Fill the network and the distribution from a released state_dict, mapped by
    ``models.released.from_released``."""
    model.load_state_dict(found.model_state)
    params = dict(model.named_parameters())
    for name, (M, Z) in found.distributions.items():
        opt.set_distribution(params[name], M, Z)


# ---- evaluating a file -------------------------------------------------------------------------

def load_network(path, cfg, typed, device):
    """The network and its distribution in a file of ours or of the authors' (any of
    their layouts): (model, VISPA, the config it was trained with, where it comes from,
    a note for the reader, the data folder it was trained on if the file says, its epoch)."""
    ckpt = checkpoint.load(path)
    note = ""
    if ckpt.get("format") == checkpoint.FORMAT:
        saved = saved_config(ckpt, path, "evaluated")
        require(ckpt, path, ("epoch", "model", "optimizer"))
        different = conflicts(cfg, saved, typed, ("model", "dataset", "width", "K"))
        if different:
            raise CheckpointError(f"{path} holds another network than the one asked for: " +
                                  ", ".join(different))
        model, opt = build(saved, device)
        load_ours(model, opt, ckpt, path)
        source = f"epoch {ckpt['epoch']} of run {ckpt.get('run', ckpt['config'].get('save'))}"
        asked = {key: getattr(cfg, key) for key in ("L", "bf16", "loader", "workers") if key in typed or key == "L"}
        return model, opt, replace(saved, **asked), source, note, ckpt.get("data_root"), ckpt["epoch"]
    if "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is neither one of our checkpoints nor in the released layout "
                              f"(no 'state_dict' key; keys: {sorted(ckpt)[:8]})")
    try:
        K = released.rank_of(ckpt["state_dict"])
    except released.LayoutError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if "K" in typed and cfg.K != K:
        raise CheckpointError(f"{path} holds K={K} (the first dimension of its Z), not the -K {cfg.K} "
                              f"asked for; leave -K out")
    cfg = replace(cfg, K=K)
    model, opt = build(cfg, device)
    try:
        found = released.from_released(ckpt["state_dict"], model)
    except released.LayoutError as error:
        raise CheckpointError(f"{path}: {error}") from None
    load_released(model, opt, found)
    source = f"released checkpoint, epoch {ckpt.get('epoch')}, best_prec1 {ckpt.get('best_prec1')}"
    if found.dropped:
        source += f"; its {len(found.dropped)} unused .sample tensors (zeros) were left out"
    if K == 0:
        note = ("The file has no Z (the 'without Z' layer): K=0, a deterministic network, so "
                "every one of the L samples is sign(M) and both results are the same network's.\n")
    return model, opt, cfg, source, note, None, 0


def evaluate_file(args, cfg, typed, device, world):
    """``--evaluate``: print the L-sample and mean-network results of a checkpoint, or the
    results of an exported network. With torchrun the ranks share the test set."""
    if packed_file(args.evaluate):
        return evaluate_packed(args, cfg, typed, device, world)
    model, opt, cfg, source, note, trained_on, epoch = load_network(args.evaluate, cfg, typed, device)
    try:
        test = test_batches(cfg, data_folder(args, cfg.dataset, trained_on), device, world)
    except DatasetError as error:
        raise dataset_moved(error, args, trained_on) from None
    total = lambda sums: distributed.sum_(sums, world)
    evaluation_draws(opt, cfg, epoch, world.rank)
    val = engine.evaluate(model, opt, progress(test, f"eval L={cfg.L}"), cfg.L, cfg.bf16, total)
    mean = engine.evaluate_mean(model, opt, test, cfg.bf16, total)
    if world.main:
        print(f"Evaluated {args.evaluate} ({cfg.model}, {cfg.dataset}, K={cfg.K}; {source})")
        print(note + f"Test: loss {val['loss']:.4f}  Prec@1 {val['prec1']:.2f}  Prec@5 {val['prec5']:.2f}  "
              f"(L={cfg.L})  |  mean network Prec@1 {mean['prec1']:.2f}")
    return EXIT_OK


# ---- the exported network --------------------------------------------------------------------

def packed_file(path):
    """Whether ``path`` is meant as an exported network (by its content, or its name)."""
    if path.endswith(".bnn"):
        return True
    try:
        return checkpoint_field(path, "format") == checkpoint.PACKED
    except Exception:
        return False


def checkpoint_field(path, key):
    """One plain value of a file, read without loading its tensors."""
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True).get(key)


def export_file(args, cfg, typed, device):
    """``--export FILE --out OUT``: the mean network sign(M) of a checkpoint, packed."""
    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists: choose another --out, or add --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"cannot write {args.out}: the folder {folder} does not exist")
    model, opt, cfg, source, _, _, _ = load_network(args.export, cfg, typed, torch.device("cpu"))
    means = {name: opt.state[p]["M"] for name, p in model.named_parameters() if is_binary(p)}
    dataset = DATASETS[cfg.dataset]
    exported = packed.pack(model, means, cfg.model, cfg.width, cfg.num_classes, cfg.image_size, cfg.dataset,
                           dataset.mean, dataset.std, f"{args.export} ({source})")
    checkpoint.save_atomic(exported, args.out)
    size = os.path.getsize(args.out)
    full = sum(t.numel() * (4 if t.is_floating_point() else t.element_size()) for t in model.state_dict().values())
    bits = sum(p.numel() for p in means.values())
    print(f"Exported the mean network sign(M) of {args.export} ({cfg.model}, {cfg.dataset}; {source}) to "
          f"{args.out}: {size / 1e6:.2f} MB, 1/{full / size:.1f} of its float32 state_dict ({full / 1e6:.1f} MB); "
          f"{bits / 1e6:.2f} M binary weights in {bits / 8e6:.2f} MB of bits")
    return EXIT_OK


def evaluate_packed(args, cfg, typed, device, world):
    """``--evaluate OUT.bnn``: the exported network's loss and accuracy on the test set."""
    try:
        content = packed.read_packed(args.evaluate)
        model = packed.network_of(content, device)
    except packed.PackedError as error:
        raise CheckpointError(str(error)) from None
    if "dataset" in typed and cfg.dataset != content["dataset"]:
        raise CheckpointError(f"{args.evaluate} is a network for {content['dataset']}, not --dataset {cfg.dataset}")
    cfg = Config(model=content["model"], dataset=content["dataset"], width=content["width"])
    result = engine.evaluate_deterministic(model, test_batches(cfg, data_folder(args, cfg.dataset), device, world), False,
                                           lambda sums: distributed.sum_(sums, world))
    if world.main:
        print(f"Evaluated {args.evaluate} ({cfg.model}, {cfg.dataset}; the exported network sign(M) of "
              f"{content.get('source')})")
        print(f"Test: loss {result['loss']:.4f}  Prec@1 {result['prec1']:.2f}  Prec@5 {result['prec5']:.2f}  "
              f"(the mean network sign(M))")
    return EXIT_OK


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, cfg, typed = parse_args(argv)
    world = distributed.from_environment()
    try:
        check_combinations(args, typed)
        if args.demo:
            cfg = demo(args)
        device = select_device(args.gpus, world)
        threads.use(threads.choose(args.threads))
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.backends.cudnn.benchmark = True
        if args.export:
            return export_file(args, cfg, typed, device)
        distributed.start(world, device)
        try:
            if args.evaluate:
                return evaluate_file(args, cfg, typed, device, world)
            return train(args, cfg, typed, device, world)
        finally:
            distributed.finish(world)
    except (UsageError, DatasetError, CheckpointError, RunInUse) as error:
        print(f"error: {error}" + (f" (rank {world.rank})" if world.several else ""), file=sys.stderr)
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
