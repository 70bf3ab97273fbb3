"""What a Config or a file becomes: the network and its optimizer, the batches of its
dataset, and a network read back from a file (one of our checkpoints, one of the authors'
released files, an exported ``.bnn``). Used by main.py, training.py and the speed benchmarks;
it imports the parts (models/, optim/, data/, utils/), never an entry point.

    model, opt = build(cfg, device)
    train, test = batches(cfg, DataFolder.of(None, cfg.dataset), device, world)
    loaded = load_network("results/run/model_best.pth.tar", cfg, on_command_line, device)
"""
import os
from dataclasses import dataclass, replace

import torch

import checkpoint
from checkpoint import CheckpointError
from config import Config, UsageError, conflicts, flag_of
from data import DATASETS, DatasetError, memory_format
from models import build_model, packed, released
from optim import STE, VISPA, BayesBiNN, is_binary
from utils import files, seeds


# ---- a Config's network and optimizer -----------------------------------------------------------

# BayesBiNN's data term counts every training image this many times: the authors' CIFAR
# scripts' --trainset_scale, for the augmented copies of each image.
TRAINSET_SCALE = 10


def build(cfg: Config, device, images_per_epoch=1):
    """The network (on ``device``, in its memory format) and its optimizer for a run config.
    The optimizer's own generator draws the evaluation's samples (``evaluation_draws``
    seeds it); training draws come from the generators of engine.Ranks.

    ``--method bayesbinn`` and ``ste`` put the binary weights in a group of their own,
    whose peak lr is ``--method-lr`` on the schedule of ``--lr`` (``lr_scale``); the real
    parameters are trained by SGD as VISPA trains them. BayesBiNN's training-set size N is
    ``images_per_epoch`` (steps x batch x ranks) times ``TRAINSET_SCALE``; a state read
    from a file brings its own."""
    with torch.device("meta"):  # its sizes, without allocating it
        check_memory(build_model(cfg.model, cfg.num_classes, cfg.width, cfg.image_size), cfg, device)
    model = build_model(cfg.model, cfg.num_classes, cfg.width, cfg.image_size)
    model = model.to(device, memory_format=memory_format(device))
    common = dict(momentum=cfg.momentum, weight_decay=cfg.wd, seed=0)
    if cfg.method == "vispa":
        opt = VISPA(model.parameters(), lr=cfg.lr, K=cfg.K, S=cfg.scale,
                    projection=None if cfg.projection == "none" else cfg.projection, **common)
        return model, opt
    binary = [p for p in model.parameters() if is_binary(p)]
    real = [p for p in model.parameters() if not is_binary(p)]
    groups = [{"params": binary, "lr": cfg.method_lr, "lr_scale": cfg.method_lr / cfg.lr}]
    groups += [{"params": real}] if real else []
    if cfg.method == "bayesbinn":
        opt = BayesBiNN(groups, train_set_size=images_per_epoch * TRAINSET_SCALE, lr=cfg.lr,
                        temperature=cfg.temperature, **common)
    else:
        opt = STE(groups, lr=cfg.lr, **common)
    return model, opt


def check_memory(model, cfg: Config, device):
    """UsageError, before anything is allocated, when the network and VISPA's state would
    not fit in the device's free memory: every parameter with its gradient and momentum
    (three float32 values), and per binary weight M and Z ((K + 1) floats), their
    gradients and their momenta, three times (K + 1) float32 values. (The activations
    come on top, and depend on the batch.)"""
    weights = sum(p.numel() for p in model.parameters() if getattr(p, "binary", False))
    network = sum(p.numel() for p in model.parameters())
    per_weight = 3 * (cfg.K + 1) if cfg.method == "vispa" else 4  # BayesBiNN: lamda, mu, momentum, grad; STE alike
    needed = 3 * 4 * network + per_weight * 4 * weights
    free = free_memory(device)
    if free is not None and needed > free:
        raise UsageError(f"-K {cfg.K}, --width {cfg.width}: {cfg.model} ({network:,} parameters, {weights:,} of them "
                         f"binary) with VISPA's state (M, Z, their gradients and momenta) needs about "
                         f"{needed / 2**30:,.1f} GiB, and {device} has {free / 2**30:,.1f} GiB free: choose a smaller "
                         f"-K or --width")


def free_memory(device):
    """Bytes free on ``device`` (the CPU: MemAvailable of /proc/meminfo), or None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def evaluation_draws(opt, cfg: Config, epoch: int, rank: int):
    """Seed the draws of the L-sample evaluation after ``epoch`` on ``rank`` from the run's
    seed: ``--evaluate`` of that epoch's checkpoint draws the same networks, and so gives
    the number the log gives (with the run's test batch size, ranks and device type)."""
    opt.generator.manual_seed(seeds.derived_seed(cfg.seed or 0, "evaluation draws", epoch, rank))


# ---- a Config's data ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataFolder:
    """Where a dataset is read from, and whether it is the folder a checkpoint remembers
    (the one its run was trained on), which an error then says."""
    path: str
    remembered: bool = False

    @classmethod
    def of(cls, given, dataset, trained_on=None) -> "DataFolder":
        """``--data-root`` if given, else the folder the run was trained on, else the
        dataset's default folder (./datasets; ImageNet: ./datasets/imagenet)."""
        if given:
            return cls(given)
        if trained_on:
            return cls(trained_on, remembered=True)
        return cls(DATASETS[dataset].default_root)

    def explain(self, error: DatasetError) -> DatasetError:
        if not self.remembered:
            return error
        return DatasetError(f"{error} ({self.path} is where the run was trained; give --data-root to read "
                            f"the dataset from elsewhere)")


def batches(cfg: Config, folder: DataFolder, device, world):
    """(training batches of this process, its test batches): DatasetError, before anything
    is written, if the data cannot serve the run."""
    try:
        return DATASETS[cfg.dataset].loaders(cfg, folder.path, world, device)
    except DatasetError as error:
        raise folder.explain(error) from None


def classes_in(cfg: Config, folder: DataFolder, recorded=None):
    """The class names of a dataset of one's own images, in the order of the labels (its
    class folders), or None for the paper's datasets, whose classes are theirs. A
    DatasetError if they are not those the network was trained on (``recorded``), or not
    as many as ``cfg`` says (``--classes``, or the count of a file without names): the
    labels would shift, or fall outside the network's outputs."""
    dataset = DATASETS[cfg.dataset]
    if not dataset.own_images:
        return None
    try:
        names = dataset.class_names(folder.path)
    except DatasetError as error:
        raise folder.explain(error) from None
    train = os.path.join(folder.path, "train")
    odd = [name for name in names if not packed.is_class_name(name)]
    if odd:
        raise folder.explain(DatasetError(f"{train} has a class folder whose name holds a control character "
                                          f"({odd[0]!r}): rename it"))
    if recorded is not None and names != list(recorded):
        missing = [c for c in recorded if c not in names]
        extra = [c for c in names if c not in recorded]
        how = "; ".join([f"no {_some(missing)}"] * bool(missing) + [f"also {_some(extra)}"] * bool(extra))
        raise folder.explain(DatasetError(
            f"the class folders of {train} are not the {len(recorded)} classes the network was trained on "
            f"({how or 'the same names, sorted otherwise'}): every label would be another class's; give "
            f"--data-root a folder with the classes {_some(recorded)}"))
    if cfg.folder_classes is not None and cfg.folder_classes != len(names):
        raise folder.explain(DatasetError(
            f"{train} has {len(names)} class folders ({_some(names)}), and the network has {cfg.folder_classes} "
            f"classes (--classes, or the file's): give a folder of {cfg.folder_classes} classes, or leave "
            f"--classes out to count them"))
    return names


def _some(names, shown=5):
    return ", ".join(names[:shown]) + (f", ... ({len(names)} in all)" if len(names) > shown else "")


def class_problem(cfg: Config, folder: DataFolder):
    """What is wrong with the classes of the dataset in ``folder`` (a class folder missing,
    so that every later label shifts), or None: a warning for a run of ours, a refusal
    for the authors' network, whose labels are the full set's."""
    return DATASETS[cfg.dataset].class_problem(folder.path)


def test_batches(cfg: Config, folder: DataFolder, device, world):
    """This rank's test batches (all of them on one process), for an evaluation."""
    try:
        return DATASETS[cfg.dataset].test_loader(cfg, folder.path, world, device)
    except DatasetError as error:
        raise folder.explain(error) from None


def recalibration_batches(cfg: Config, folder: DataFolder, device, world):
    """This process's batches of the training images on which the deployed network's
    BatchNorm statistics are recomputed (``--recalibrate``)."""
    try:
        return DATASETS[cfg.dataset].recalibration_loader(cfg, folder.path, world, device)
    except DatasetError as error:
        raise folder.explain(error) from None


# ---- a file's network ---------------------------------------------------------------------------------

CHECKPOINT, RELEASED, EXPORTED = "checkpoint", "released", "exported"


@dataclass
class Loaded:
    """A network read from a file: one of our checkpoints (``kind`` CHECKPOINT), one of
    the authors' released files (RELEASED), both with their distribution, or an exported
    network (EXPORTED: the mean network alone, ``opt`` None)."""
    kind: str
    model: torch.nn.Module
    opt: VISPA                # None for an exported network
    cfg: Config               # what it was trained with (and what was asked for the evaluation)
    source: str               # where it comes from, for the reader
    note: str = ""            # what the reader should know of the result
    trained_on: str = None    # the data folder of its run, if the file says
    epoch: int = 0            # the epoch it holds (0 for the authors' files)
    statistics: dict = None   # an exported network's BatchNorm statistics (models/packed.py)
    classes: list = None      # images of one's own: the class names it was trained on, if the file says


# What may be asked of an evaluation beside a checkpoint's own settings.
EVALUATION_SETTINGS = ("L", "bf16", "loader", "workers", "eval_batch_size", "batch_size", "recalibrate")


def open_network(path, cfg: Config, on_command_line, device) -> Loaded:
    """The network in ``path``, read once and told apart by its content: one of our
    checkpoints, an exported network, or one of the authors' files (any of their
    layouts). Settings typed on the command line that contradict the file's network are
    refused; the evaluation settings typed (``EVALUATION_SETTINGS``) replace the file's."""
    try:
        obj = files.load(path, what="exported network" if path.endswith(".bnn") else "checkpoint")
    except files.FileError as error:
        raise CheckpointError(str(error)) from None
    if checkpoint.is_ours(obj):
        loaded = _load_ours(checkpoint.from_file(obj, path, "evaluated"), path, cfg, on_command_line, device)
    elif obj.get("format") == packed.FORMAT:
        loaded = _load_exported(obj, path, cfg, on_command_line, device)
    elif path.endswith(".bnn"):
        raise CheckpointError(f"{path} is not an exported binary network (no format {packed.FORMAT!r}); export one "
                              f"with `python main.py --export CHECKPOINT --out FILE`")
    else:
        loaded = _load_released(obj, path, cfg, on_command_line, device)
    for problem in loaded.cfg.contradictions():  # the file's settings with those typed for the evaluation
        raise UsageError(problem)
    return loaded


def _asked(cfg, on_command_line, always=()):
    return {key: getattr(cfg, key) for key in EVALUATION_SETTINGS if key in on_command_line or key in always}


def _load_ours(state, path, cfg, on_command_line, device) -> Loaded:
    different = conflicts(cfg, state.config, on_command_line,
                          ("model", "dataset", "width", "K", "folder_classes", "folder_image_size"))
    if different:
        raise CheckpointError(f"{path} holds another network than the one asked for: " + ", ".join(different))
    model, opt = build(state.config, device)
    fill(model, opt, state, path)
    return Loaded(CHECKPOINT, model, opt, replace(state.config, **_asked(cfg, on_command_line, always=("L",))),
                  f"epoch {state.epoch} of run {state.run}", trained_on=state.data_root, epoch=state.epoch,
                  classes=state.classes)


def fill(model, opt, state: checkpoint.Checkpoint, path):
    """Fill the network and the distribution from one of our checkpoints, strictly."""
    try:
        model.load_state_dict(state.model)
        opt.load_state_dict(state.optimizer)
    except (RuntimeError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} does not fit this network: {error}") from None


def _load_released(obj, path, cfg, on_command_line, device) -> Loaded:
    """One of the authors' files: --model and --dataset name the network (their file's
    ``model`` string is not read), K is the first dimension of its Z."""
    if "state_dict" not in obj:
        raise CheckpointError(f"{path} is neither one of our checkpoints nor in the released layout "
                              f"(no 'state_dict' key; keys: {sorted(map(str, obj))[:8]})")
    try:
        K = released.rank_of(obj["state_dict"])
    except released.LayoutError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if "K" in on_command_line and cfg.K != K:
        raise CheckpointError(f"{path} holds K={K} (the first dimension of its Z), not the -K {cfg.K} "
                              f"asked for; leave -K out")
    cfg = replace(cfg, K=K)
    model, opt = build(cfg, device)
    try:
        found = released.from_released(obj["state_dict"], model)
    except released.LayoutError as error:
        raise CheckpointError(f"{path}: {error}") from None
    model.load_state_dict(found.model_state)
    params = dict(model.named_parameters())
    for name, (M, Z) in found.distributions.items():
        opt.set_distribution(params[name], M, Z)
    source = f"released checkpoint, epoch {obj.get('epoch')}, best_prec1 {obj.get('best_prec1')}"
    if found.dropped:
        source += f"; its {len(found.dropped)} unused .sample tensors (zeros) were left out"
    note = ""
    if K == 0:
        note = ("The file has no Z (the 'without Z' layer): K=0, a deterministic network, so "
                "every one of the L samples is sign(M) and both results are the same network's.\n")
    return Loaded(RELEASED, model, opt, cfg, source, note)


def _load_exported(obj, path, cfg: Config, on_command_line, device) -> Loaded:
    """An exported network: settings typed on the command line that the file contradicts
    are refused, as for a checkpoint."""
    try:
        content = packed.checked(obj, path)
        dataset = DATASETS.get(content["dataset"])
        if dataset is None or not (dataset.own_images or content["num_classes"] == dataset.num_classes):
            raise CheckpointError(f"{path} is a network of {content['num_classes']} classes for the dataset "
                                  f"{content['dataset']!r}, which this program does not know with that many classes")
        model = packed.network_of(content, device)
    except packed.PackedError as error:
        raise CheckpointError(str(error)) from None
    inapplicable = [flag_of(name) for name in ("K", "scale", "method", "recalibrate") if name in on_command_line]
    if inapplicable:
        raise UsageError(f"{path} is an exported network, one network with the BatchNorm statistics it was exported "
                         f"with: {' and '.join(inapplicable)} do not apply to it; leave them out")
    own = DATASETS[content["dataset"]].own_images
    saved = Config(model=content["model"], dataset=content["dataset"], width=content["width"],
                   folder_classes=content["num_classes"] if own else None,
                   folder_image_size=content["image_size"] if own else None)
    different = conflicts(cfg, saved, on_command_line, ("model", "dataset", "width", "folder_classes",
                                                         "folder_image_size"))
    if different:
        raise CheckpointError(f"{path} is another network than the one asked for: " + ", ".join(different))
    return Loaded(EXPORTED, model, None, replace(saved, **_asked(cfg, on_command_line)),
                  f"the exported network sign(M) of {content.get('source')}", trained_on=content.get("data_root"),
                  statistics=content["statistics"], classes=content["classes"])


def exported_network(loaded: Loaded, source: str, statistics=packed.TRAINING_STATISTICS, data_root=None) -> dict:
    """The packed file of a loaded network's mean network (VISPA's sign(M); each method's
    own), with the BatchNorm statistics the network holds now (``statistics`` says which)."""
    cfg = loaded.cfg
    with loaded.opt.mean_params():
        means = {name: p.detach().clone() for name, p in loaded.model.named_parameters() if is_binary(p)}
    dataset = DATASETS[cfg.dataset]
    return packed.pack(loaded.model, means, cfg.model, cfg.width, cfg.num_classes, cfg.image_size, cfg.dataset,
                       dataset.mean, dataset.std, source, statistics, data_root, loaded.classes)
