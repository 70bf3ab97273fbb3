"""The binary network people deploy: ``sign(M)`` packed at one bit per weight.

A training checkpoint holds the whole distribution (M, Z, momenta: 837 MB for
ResNet18). What a user ships is the deterministic network ``b = sign(M)`` with its
scales, BatchNorm statistics and full-precision layers - the "mean network" whose
top-1 the training log reports every epoch. ``pack`` turns a network and its means
into a file of plain data (loadable with ``torch.load(weights_only=True)``):

    format, version          "vispa-binary-network", 3 (2: without "classes"; 1: nor "statistics")
    model, width, num_classes, image_size, dataset, mean, std
                             what to build and how to normalise its input
    classes                  images of one's own: the class names, output by output (the
                             class folders it was trained on); None for the paper's datasets
    statistics               which BatchNorm statistics it carries: {"source": "recomputed",
                             "images": N}, its own, recomputed on N training images (the
                             deployed network), or {"source": "training"}, those gathered in
                             training on sampled networks (the authors' mean network)
    binary                   {weight name: {"shape": [...], "bits": uint8, "zeros": int64}}
                             sign(M) > 0 as bits, 8 per byte (the first weight in the
                             highest bit); "zeros": the flat positions where M is exactly 0
                             (sign 0, almost never), so that the network is exact
    state                    every other tensor of the state_dict, floating ones as float32
    source                   what it was exported from
    data_root                the data folder of the run it comes from (or None), where
                             ``main.py --evaluate`` reads the test set without --data-root

``load_packed`` gives back a plain ``nn.Module`` in eval mode that computes the mean
network exactly, with no optimizer.
"""
import math
import unicodedata

import torch

try:  # installed as the library, vispa.models beside vispa.utils
    from ..utils import files
except ImportError:  # in the repository: the top-level folders models/ and utils/
    from utils import files

from . import build_model
from .binary import is_binary

FORMAT = "vispa-binary-network"
VERSION = 3
TRAINING_STATISTICS = {"source": "training"}
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(signs: torch.Tensor) -> dict:
    """{"shape", "bits", "zeros"} of a tensor of signs (-1, 0, +1)."""
    flat = signs.detach().reshape(-1).cpu()
    ones = torch.nn.functional.pad((flat > 0).to(torch.uint8), (0, -flat.numel() % 8))
    bits = (ones.view(-1, 8) * _BITS).sum(1, dtype=torch.uint8)
    return {"shape": list(signs.shape), "bits": bits, "zeros": torch.nonzero(flat == 0).view(-1)}


def unpack_bits(packed: dict, dtype=torch.float32) -> torch.Tensor:
    """The tensor of signs that ``pack_bits`` packed."""
    shape = packed["shape"]
    count = 1
    for size in shape:
        count *= size
    ones = (packed["bits"].view(-1, 1) & _BITS).ne(0).view(-1)[:count]
    signs = ones.to(dtype) * 2 - 1
    signs[packed["zeros"]] = 0
    return signs.view(shape)


def pack(model, means: dict, model_name, width, num_classes, image_size, dataset, mean, std, source,
         statistics=TRAINING_STATISTICS, data_root=None, classes=None) -> dict:
    """The packed file of ``model`` whose binary weights are ``sign(means[name])``;
    ``statistics``: which BatchNorm statistics ``model`` holds (see above)."""
    binary = {name for name, p in model.named_parameters() if is_binary(p)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name not in binary:
            state[name] = tensor.detach().float().cpu() if tensor.is_floating_point() else tensor.detach().cpu()
    return {"format": FORMAT, "version": VERSION, "model": model_name, "width": width,
            "num_classes": num_classes, "image_size": image_size, "dataset": dataset,
            "mean": list(mean), "std": list(std), "source": source, "statistics": dict(statistics),
            "data_root": data_root, "classes": None if classes is None else list(classes),
            "binary": {name: pack_bits(torch.sign(means[name])) for name in sorted(binary)},
            "state": state}


def is_class_name(name) -> bool:
    """A class folder's name as a file may carry it: a folder name without control
    characters, which would reach a terminal as escape sequences."""
    return (isinstance(name, str) and 0 < len(name.encode()) <= 255 and "/" not in name
            and not any(unicodedata.category(c) == "Cc" for c in name))


class PackedError(ValueError):
    """A file that is not a packed network this version can read; the message says why."""


def read_packed(path) -> dict:
    """The content of a packed file, checked: format, version, digest, every part there."""
    try:
        obj = files.load(path, what="exported network")
    except files.FileError as error:  # missing, truncated, not data
        raise PackedError(str(error)) from None
    return checked(obj, path)


def checked(obj: dict, path) -> dict:
    """The content of the packed file ``path`` already read (``obj``), checked as
    ``read_packed`` checks it; files of version 1 carry the statistics of training, and
    files before version 3 no class names."""
    if obj.get("format") != FORMAT:
        raise PackedError(f"{path} is not an exported binary network (no format {FORMAT!r}); "
                          f"export one with `python main.py --export CHECKPOINT --out FILE`")
    if obj.get("version") not in range(1, VERSION + 1):
        raise PackedError(f"{path} is an exported network of format version {obj.get('version')!r}; "
                          f"this version reads versions 1 to {VERSION}")
    try:
        obj = files.verify_digest(obj, path, "an exported network")
    except files.FileError as error:
        raise PackedError(str(error)) from None
    if obj.get("version") == 1:
        obj = dict(obj, statistics=TRAINING_STATISTICS)
    if obj.get("version") < 3:
        obj = dict(obj, classes=None)
    missing = [key for key in ("model", "width", "num_classes", "image_size", "dataset", "mean", "std",
                               "binary", "state", "statistics") if key not in obj]
    if missing:
        raise PackedError(f"{path} is an incomplete exported network: it has no {', '.join(missing)}")
    problem = _problem(obj)
    if problem:  # a digest is a checksum, not a schema: a hand-made file can carry a fresh one
        raise PackedError(f"{path} is not a valid exported network: {problem}")
    return obj


def save(content: dict, path: str, new_only=False):
    """Write ``pack``'s content atomically, with its digest (FileError if it cannot be written;
    ``new_only``: nor over a file that is there)."""
    files.save_atomic(files.with_digest(content), path, new_only=new_only)


def _problem(obj):
    """What is wrong with the fields of packed content, or None."""
    whole = lambda v: type(v) is int and v >= 1  # noqa: E731
    if not isinstance(obj["model"], str) or not isinstance(obj["dataset"], str):
        return "its model and dataset are not names"
    if not (whole(obj["width"]) and whole(obj["num_classes"]) and whole(obj["image_size"])):
        return (f"width {obj['width']!r}, classes {obj['num_classes']!r} and image size {obj['image_size']!r} "
                f"must be whole numbers")
    for key in ("mean", "std"):
        values = obj[key]
        if not (isinstance(values, list) and len(values) == 3 and
                all(type(v) in (int, float) and math.isfinite(v) for v in values)):
            return f"its {key} is not three finite numbers"
    for key in ("source", "data_root"):
        text = obj.get(key)
        if text is not None and not (isinstance(text, str) and len(text) <= 2000 and text.isprintable()):
            return f"its {key} is not one printable line of text"
    classes = obj.get("classes")
    if classes is not None and not (isinstance(classes, list) and len(classes) == obj["num_classes"] and
                                    all(map(is_class_name, classes)) and len(set(classes)) == len(classes)):
        return f"its class names are not {obj['num_classes']} different names of class folders"
    if not all(type(v) in (int, float) and v > 0 for v in obj["std"]):
        return "its std is not positive"
    statistics = obj["statistics"]
    if statistics != TRAINING_STATISTICS and not (
            isinstance(statistics, dict) and set(statistics) == {"source", "images"} and
            statistics["source"] == "recomputed" and whole(statistics["images"])):
        return f"its statistics {statistics!r} are neither {TRAINING_STATISTICS} nor recomputed on some images"
    if not isinstance(obj["state"], dict) or not all(isinstance(v, torch.Tensor) for v in obj["state"].values()):
        return "its state is not a dict of tensors"
    if not isinstance(obj["binary"], dict):
        return "its binary weights are not a dict"
    for name, entry in obj["binary"].items():
        if not (isinstance(entry, dict) and set(entry) == {"shape", "bits", "zeros"}):
            return f"binary weight {name!r} is not shape, bits and zeros"
        shape, bits, zeros = entry["shape"], entry["bits"], entry["zeros"]
        if not (isinstance(shape, list) and shape and all(whole(n) for n in shape)):
            return f"binary weight {name!r} has the shape {shape!r}"
        count = 1
        for n in shape:
            count *= n
        if not (isinstance(bits, torch.Tensor) and bits.dtype == torch.uint8 and bits.shape == ((count + 7) // 8,)):
            return f"binary weight {name!r} does not hold {(count + 7) // 8} bytes of bits for its shape {shape}"
        if not (isinstance(zeros, torch.Tensor) and zeros.dtype == torch.int64 and zeros.dim() == 1
                and (zeros.numel() == 0 or (zeros.min() >= 0 and zeros.max() < count))):
            return f"binary weight {name!r} names zero positions outside its {count} weights"
    return None


def network_of(obj, device="cpu"):
    """The ``nn.Module`` (eval mode) of packed content: the mean network, exactly."""
    try:
        model = build_model(obj["model"], obj["num_classes"], obj["width"], obj["image_size"])
    except ValueError as error:  # a network of another version, or an image size it does not take
        raise PackedError(f"the exported network cannot be built: {error}") from None
    state = dict(obj["state"])
    for name, packed in obj["binary"].items():
        state[name] = unpack_bits(packed)
    expected = model.state_dict()
    for name, tensor in state.items():  # load_state_dict would cast another dtype silently
        if name in expected and tensor.dtype != expected[name].dtype:
            raise PackedError(f"the exported tensor {name} is {tensor.dtype} where {obj['model']} has "
                              f"{expected[name].dtype}: not a file this program wrote")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = "; ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise PackedError(f"the exported tensors do not fit {obj['model']}: {first}") from None
    return model.to(device).eval()


def describe_statistics(statistics: dict) -> str:
    if statistics.get("source") == "recomputed":
        return f"its own BatchNorm statistics, recomputed on {statistics['images']:,} training images"
    return "the BatchNorm statistics of training (gathered on sampled networks)"


def load_packed(path, device="cpu"):
    """The exported network in ``path``, ready for inference: a plain ``nn.Module`` in
    eval mode computing ``sign(M)``'s network, with no optimizer. Its input is normalised
    with the file's ``mean`` and ``std`` (``read_packed(path)`` has them)."""
    return network_of(read_packed(path), device)
