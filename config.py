"""The run config: one frozen dataclass whose defaults are the paper's recipe.

It is the single source of every setting that decides a run: ``main.py``'s options
are made from it, a checkpoint stores it, the benchmark scripts name their runs
with ``run_name`` and the speed benchmark trains with it. ``RECIPES`` holds the
authors' configurations by name; ``--recipe`` on the command line starts from one.
"""
import argparse
import math
from dataclasses import asdict, dataclass, field, fields

from data import DATASETS
from models import ALIASES, MODELS, canonical_name


class UsageError(Exception):
    """A request that cannot be carried out (options that contradict each other, a device
    that does not exist); the message says what to do instead."""


def _number(kind, low=None, above=None, high=None):
    """An argparse type: a finite ``kind`` >= ``low`` (or > ``above``) and <= ``high``, with a
    message that says so."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and not value >= low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if high is not None and not value <= high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value
    return parse


# The largest rate, weight decay or temperature taken: far above any that trains, and far
# below float32's range, where a step would end in a traceback rather than a divergence.
LARGEST = 1e6


def _model_name(text):
    try:
        return canonical_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _setting(default, *flags, help, type=None, choices=None):
    """A field of the config with what its command-line option needs."""
    return field(default=default, metadata=dict(flags=flags, help=help, type=type, choices=choices))


@dataclass(frozen=True)
class Config:
    model: str = _setting("resnet18", "--model", type=_model_name,
                          help=f"network: {', '.join(MODELS)} (also accepted: {', '.join(ALIASES)})")
    dataset: str = _setting("cifar100", "--dataset", choices=sorted(DATASETS),
                            help="dataset: the paper's, or 'imagefolder', images of one's own in class folders "
                                 "(--data-root DIR with DIR/train/<class>/ and DIR/val/<class>/)")
    folder_image_size: int = _setting(None, "--image-size", type=_number(int, low=8),
                                      help="--dataset imagefolder: every image is resized to this side and "
                                           "centre-cropped (default 32; the paper's datasets have theirs)")
    folder_classes: int = _setting(None, "--classes", type=_number(int, low=2),
                                   help="--dataset imagefolder: its classes (default: its class folders, counted "
                                        "when a run starts; the paper's datasets have theirs)")
    width: int = _setting(None, "--width", type=_number(int, low=1),
                          help="width of the first layer (None: the paper's network, 64 for the ResNets "
                               "and VGG16, 128 for VGG-Small, 96 for AlexNet; smaller for quick experiments)")
    epochs: int = _setting(500, "--epochs", type=_number(int, low=1), help="training epochs")
    batch_size: int = _setting(256, "-b", "--batch-size", type=_number(int, low=2),
                               help="training batch size (BatchNorm needs at least 2 images)")
    eval_batch_size: int = _setting(1000, "--eval-batch-size", type=_number(int, low=1),
                                    help="test batch size; evaluation uses BatchNorm's running "
                                         "statistics, so it computes the same function for any value")
    lr: float = _setting(0.1, "--lr", type=_number(float, low=0, high=LARGEST), help="peak learning rate")
    momentum: float = _setting(0.9, "--momentum", type=_number(float, low=0, high=LARGEST), help="SGD momentum")
    wd: float = _setting(5e-4, "--wd", type=_number(float, low=0, high=LARGEST),
                         help="weight decay (on M, Z and the real parameters)")
    lr_decay: str = _setting("cos", "--lr-decay", choices=["cos", "constant"],
                             help="after the warm-up: cosine to 0 per iteration, or constant")
    warmup_epochs: int = _setting(5, "--warmup-epochs", type=_number(int, low=0),
                                  help="linear warm-up from 0, per iteration")
    method: str = _setting("vispa", "--method", choices=["vispa", "bayesbinn", "ste"],
                           help="how the binary weights are trained: 'vispa', the paper's Gaussian with a rank-K "
                                "covariance factor; 'bayesbinn', BayesBiNN's mean-field Bernoulli trained by the "
                                "Bayesian learning rule; 'ste', latent weights through the straight-through "
                                "estimator with Adam and clipping to [-1, 1] (BayesBiNN's baseline). The real "
                                "parameters are trained alike by SGD with --lr, --momentum and --wd; -K, --scale "
                                "and --projection are VISPA's alone")
    method_lr: float = _setting(3e-4, "--method-lr", type=_number(float, low=0, high=LARGEST),
                                help="--method bayesbinn or ste: the peak learning rate of the binary weights' own "
                                     "update (of lamda; Adam's on the latent weights), on the schedule of --lr "
                                     "(the BayesBiNN authors' CIFAR value)")
    temperature: float = _setting(1e-8, "--temperature", type=_number(float, low=1e-30, high=LARGEST),
                                  help="--method bayesbinn: the temperature of its relaxed training samples (the "
                                       "BayesBiNN authors' CIFAR-100 value)")
    K: int = _setting(8, "-K", type=_number(int, low=0),
                      help="rank of the covariance factor Z; 0 = plain latent weights with sign and "
                           "straight-through (the 'without Z' ablation)")
    L: int = _setting(40, "-L", type=_number(int, low=1),
                      help="samples per test image; the logits of the L passes are averaged")
    scale: float = _setting(100.0, "--scale", "-scale", type=_number(float, above=0),
                            help="S: the draw is r ~ N(0, I_K / S); the Z gradient is scaled by sqrt(S)")
    projection: str = _setting("none", "--projection", choices=["none", "sphere"],
                               help="'sphere' rescales every entry to M_i^2 + |Z_i|^2/S = 1 after each "
                                    "step, the paper's constraint; the released code (and the published "
                                    "numbers) do not")
    seed: int = _setting(None, "--seed", type=_number(int, low=0, high=2**63 - 1),
                         help="random seed (default: drawn at random and logged)")
    bf16: bool = _setting(False, "--bf16",
                          help="bfloat16 autocast for the forward passes (faster on GPUs). The binary "
                               "weights are exact in bf16; activations and BatchNorm inputs are rounded, "
                               "so results differ slightly from the float32 reference")
    loader: str = _setting("device", "--loader", choices=["device", "torchvision", "dali-gpu", "dali-cpu"],
                           help="'device': the dataset stays on the training device and batches are "
                                "augmented there (CIFAR, Tiny-ImageNet); 'torchvision': a DataLoader with "
                                "PIL transforms in worker processes (the authors' CIFAR pipeline; ImageNet "
                                "from its files); 'dali-gpu' / 'dali-cpu': ImageNet through the authors' "
                                "NVIDIA DALI pipelines, decoding on the GPU or the CPU (their --dali_cpu)")
    virtual_ranks: int = _setting(1, "--virtual-ranks", type=_number(int, low=1),
                                  help="N: every step on this device is N ranks' step, as N GPUs make it "
                                       "with torchrun: N weight samples, each on its own batch with its own "
                                       "BatchNorm statistics, their gradients averaged (the running "
                                       "statistics are the first rank's); with torchrun, each rank has N")
    scale_lr: bool = _setting(False, "--scale-lr",
                              help="multiply --lr by batch x ranks / 256, as the authors' ImageNet program "
                                   "does (their ImageNet recipes)")
    recalibrate: int = _setting(10000, "--recalibrate", type=_number(int, low=0),
                                help="training images (a random subset; all if there are fewer) on which the "
                                     "deployed network, sign(M), gets BatchNorm statistics of its own, computed "
                                     "on itself instead of on the sampled networks of training: evaluated at the "
                                     "end of a run, by --evaluate, and written by --export (0: keep the statistics "
                                     "of training)")
    deployed_every_epoch: bool = _setting(False, "--deployed-every-epoch",
                                          help="evaluate the deployed network after every epoch, not only at the "
                                               "end (one pass over the --recalibrate images and the test set)")
    workers: int = _setting(4, "-j", "--workers", type=_number(int, low=0),
                            help="data-loading processes (only for --loader torchvision, where each "
                                 "worker draws its own augmentations)")

    def __post_init__(self):
        network = MODELS[canonical_name(self.model)]
        if self.width is None:  # the paper's width of the chosen network
            object.__setattr__(self, "width", network.width)


    def contradictions(self) -> list:
        """Settings that cannot go together, each said in a line: checked where a run's
        config is made (the command line of a new run, a fork, a checkpoint), before any
        data is read."""
        problems = []
        dataset = DATASETS.get(self.dataset)
        if dataset is not None and not dataset.own_images:
            for name, option, own in (("folder_image_size", "--image-size", dataset.image_size),
                                      ("folder_classes", "--classes", dataset.num_classes)):
                if getattr(self, name) is not None:
                    problems.append(f"{option} {getattr(self, name)}: {self.dataset} has {own}; {option} is for "
                                    f"--dataset imagefolder")
        sizes = MODELS[canonical_name(self.model)].image_sizes
        if self.dataset in DATASETS and self.image_size not in sizes:
            problems.append(f"--model {self.model} takes images of {' or '.join(map(str, sizes))} pixels, and "
                            f"--dataset {self.dataset} has images of {self.image_size}")
        if self.method == "vispa" and (self.method_lr != 3e-4 or self.temperature != 1e-8):
            problems.append("--method-lr and --temperature are settings of --method bayesbinn or ste, not of vispa")
        if self.method != "vispa" and self.projection != "none":
            problems.append(f"--projection {self.projection} is VISPA's (the paper's constraint on M and Z), not "
                            f"--method {self.method}'s")
        if self.method != "vispa" and not self.lr > 0:
            problems.append(f"--method {self.method} runs its --method-lr on the schedule of --lr: give --lr above 0")
        if self.deployed_every_epoch and self.recalibrate == 0:
            problems.append("--deployed-every-epoch evaluates the deployed network, whose BatchNorm statistics are "
                            "recomputed on --recalibrate images: give --recalibrate above 0")
        if self.recalibrate == 1:
            problems.append("--recalibrate 1: BatchNorm statistics are computed on batches of at least 2 images; "
                            "give 2 or more, or 0 to keep the statistics of training")
        if isinstance(self.warmup_epochs, int) and isinstance(self.epochs, int) and self.warmup_epochs > self.epochs:
            problems.append(f"--warmup-epochs {self.warmup_epochs} is more than --epochs {self.epochs}: the run "
                            f"would end inside its warm-up and never reach its peak lr; give --warmup-epochs "
                            f"{self.epochs} or less too (a recipe's warm-up is 5 epochs)")
        return problems

    @property
    def num_classes(self):
        """The dataset's classes (imagefolder: the run's count of its class folders; None before it)."""
        own = DATASETS[self.dataset].own_images
        return self.folder_classes if own else DATASETS[self.dataset].num_classes

    @property
    def image_size(self):
        own = DATASETS[self.dataset].own_images
        return (self.folder_image_size or DATASETS[self.dataset].image_size) if own else DATASETS[self.dataset].image_size

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "Config":
        """The config a checkpoint stored, checked as the command line checks its options.
        Settings it does not name keep their defaults (a file of an older version); a
        name this version does not know, or a value its option would refuse, is a
        ValueError."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown settings {unknown}")
        for name, value in values.items():
            _check(known[name], value)
        config = cls(**values)
        for problem in config.contradictions():
            raise ValueError(problem)
        return config


def _check(f, value):
    """ValueError unless ``value`` is what the option of field ``f`` would give."""
    m, default = f.metadata, f.default
    if value is None and default is None:
        return
    kind = type(default) if default is not None else int
    if type(value) is not kind and not (kind is float and type(value) is int):
        raise ValueError(f"{f.name} must be a {kind.__name__}, got {value!r}")
    if m["choices"] is not None and value not in m["choices"]:
        raise ValueError(f"{f.name} must be one of {m['choices']}, got {value!r}")
    if m["type"] is not None:
        try:
            parsed = m["type"](str(value))
        except argparse.ArgumentTypeError as error:
            raise ValueError(f"{f.name} {error}") from None
        if parsed != value:
            raise ValueError(f"{f.name} must be {parsed!r}, got {value!r}")


# The authors' configurations, by the names their runs carry (docs/recipes.md).
_1W1A = dict(dataset="cifar10", K=4, lr=0.5, wd=1e-5, epochs=600)
_IMAGENET = dict(dataset="imagenet", scale_lr=True, loader="torchvision", eval_batch_size=256, workers=8)
IMAGENET_RANKS = 4  # the authors' ImageNet runs: torchrun --nproc_per_node 4
RECIPES = {
    "resnet18_1w32a_cifar100": Config(model="resnet18", dataset="cifar100"),
    "vgg16_1w32a_cifar100": Config(model="vgg16", dataset="cifar100"),
    "resnet18_1w32a_cifar10": Config(model="resnet18", dataset="cifar10"),
    "vgg16_1w32a_cifar10": Config(model="vgg16", dataset="cifar10"),
    "vgg_small_1w1a_cifar10": Config(model="vgg_small", **_1W1A),
    "resnet18_1w1a_cifar10": Config(model="resnet18_1w1a", **_1W1A),
    "resnet18_1w32a_tiny-imagenet": Config(model="resnet18", dataset="tiny-imagenet"),
    # ImageNet (docs/recipes.md): IMAGENET_RANKS GPUs of 256 images, the lr scaled by 256 x 4 / 256.
    "alexnet_1w1a_imagenet": Config(model="alexnet_1w1a", K=2, lr=0.5, wd=1e-5, epochs=100, **_IMAGENET),
    "alexnet_1w32a_imagenet": Config(model="alexnet_1w32a", K=4, lr=0.1, wd=5e-5, epochs=100, **_IMAGENET),
    "birealnet18_1w1a_imagenet": Config(model="birealnet18", K=2, lr=0.5, wd=1e-5, epochs=200, **_IMAGENET),
    "resnet18_1w32a_imagenet": Config(model="resnet18_imagenet", K=4, lr=0.1, wd=5e-5, epochs=200, **_IMAGENET),
}
DEFAULT_RECIPE = "resnet18_1w32a_cifar100"
assert RECIPES[DEFAULT_RECIPE] == Config()

# The settings a run name states after the recipe's own (when they differ from it), by
# the word the name uses. Settings that do not change the computed function are not named.
NAMED_IF_CHANGED = {"method": "method", "method_lr": "method_lr", "temperature": "temperature",
                    "width": "width", "batch_size": "batch", "warmup_epochs": "warmup",
                    "momentum": "momentum", "projection": "projection", "bf16": "bf16",
                    "virtual_ranks": "ranks", "scale_lr": "scale_lr"}


def flag_of(name: str) -> str:
    """The option of a setting, as the command line spells it (``-K``, ``--scale``)."""
    return next(f for f in fields(Config) if f.name == name).metadata["flags"][0]


def vispa_settings_for_a_rival(method: str, typed) -> str:
    """What is wrong with VISPA's own settings typed for another ``method``, which would
    ignore them, or None."""
    named = [flag_of(name) for name in ("K", "scale") if name in typed]
    if method == "vispa" or not named:
        return None
    return (f"{' and '.join(named)}: the rank and scale of VISPA's covariance factor, which --method {method} does "
            f"not have; leave {'them' if len(named) > 1 else 'it'} out")


def spellings(*flags) -> list:
    """Every flag with hyphens (the documented spelling) and, where it has more than one
    word, with underscores too (the authors' spelling): ``--data-root`` and ``--data-root``."""
    found = []
    for flag in flags:
        if flag.startswith("--"):
            words = flag[2:].replace("_", "-")
            found += [f"--{words}"] + ([f"--{words.replace('-', '_')}"] if "-" in words else [])
        else:
            found.append(flag)
    return list(dict.fromkeys(found))


def add_arguments(parser, defaults):
    """One option per setting, with the values of the Config ``defaults`` as their
    defaults (None: no defaults, every option left out reads None)."""
    for f in fields(Config):
        m = f.metadata
        default = None if f.default is None else getattr(defaults, f.name, None)  # width: the network's
        options = dict(dest=f.name, default=default, help=m["help"])
        if isinstance(f.default, bool):
            options["action"] = "store_true"
        else:
            options.update(type=m["type"], choices=m["choices"])
            if options["type"] is None:
                del options["type"]
        parser.add_argument(*spellings(*m["flags"]), **options)


def from_args(namespace) -> Config:
    return Config(**{f.name: getattr(namespace, f.name) for f in fields(Config)})


def settings_on_command_line(argv) -> set:
    """The settings typed on the command line ``argv``, whatever their value (a default
    typed out counts too: ``--resume run -K 8`` must not quietly resume a K=2 run)."""
    probe = argparse.ArgumentParser(add_help=False)
    add_arguments(probe, None)
    given = vars(probe.parse_known_args(argv)[0])
    return {name for name, value in given.items() if value is not None}


def conflicts(asked: Config, saved: Config, on_command_line, names) -> list:
    """The settings among ``names`` typed on the command line with another value than the
    ``saved`` config's, each as ``name=asked (checkpoint: saved)``."""
    return [f"{name}={getattr(asked, name)} (checkpoint: {getattr(saved, name)})" for name in names
            if name in on_command_line and getattr(asked, name) != getattr(saved, name)]


def number(value) -> str:
    """A setting's value as run names write it: ``100`` for 100.0, ``5e-4`` for 0.0005,
    ``0.1`` for 0.1 (the shorter of the decimal and the exponent form)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if not isinstance(value, float):
        return str(value)
    decimal = repr(value)
    mantissa, _, exponent = f"{value:e}".partition("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    scientific = f"{mantissa}e{int(exponent)}"
    return scientific if len(scientific) < len(decimal) else decimal


def run_name(recipe: str, cfg: Config, seed="{seed}") -> str:
    """The name of a benchmark run, as the authors name theirs:
    ``<recipe>_seed=<s>_benchmark_K=8_S=100_L=40_wd=5e-4_lr=0.1_cos_epochs=500``, then every
    setting of ``NAMED_IF_CHANGED`` that differs from the recipe, so that such runs are
    never taken for the paper's (``..._width=8_batch=100``)."""
    name = (f"{recipe}_seed={seed}_benchmark_K={cfg.K}_S={number(cfg.scale)}_L={cfg.L}"
            f"_wd={number(cfg.wd)}_lr={number(cfg.lr)}_{cfg.lr_decay}_epochs={cfg.epochs}")
    base = RECIPES[recipe]
    for key, word in NAMED_IF_CHANGED.items():
        if getattr(cfg, key) != getattr(base, key):
            name += f"_{word}={number(getattr(cfg, key))}"
    return name

