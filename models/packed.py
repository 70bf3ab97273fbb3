"""The binary network people deploy: ``sign(M)`` packed at one bit per weight.

A training checkpoint holds the whole distribution (M, Z, momenta: 837 MB for
ResNet18). What a user ships is the deterministic network ``b = sign(M)`` with its
scales, BatchNorm statistics and full-precision layers - the "mean network" whose
top-1 the training log reports every epoch. ``pack`` turns a network and its means
into a file of plain data (loadable with ``torch.load(weights_only=True)``):

    format, version          "vispa-binary-network", 1
    model, width, num_classes, image_size, dataset, mean, std
                             what to build and how to normalise its input
    binary                   {weight name: {"shape": [...], "bits": uint8, "zeros": int64}}
                             sign(M) > 0 as bits, 8 per byte (the first weight in the
                             highest bit); "zeros": the flat positions where M is exactly 0
                             (sign 0, almost never), so that the network is exact
    state                    every other tensor of the state_dict, floating ones as float32
    source                   what it was exported from

``load_packed`` gives back a plain ``nn.Module`` in eval mode that computes the mean
network exactly, with no optimizer.
"""
import torch

try:  # installed as the library, vispa.models beside vispa.utils
    from ..utils import checkpoint
except ImportError:  # in the repository: the top-level folders models/ and utils/
    from utils import checkpoint

from . import build_model
from .binary import is_binary

VERSION = 1
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


def pack(model, means: dict, model_name, width, num_classes, image_size, dataset, mean, std, source) -> dict:
    """The packed file of ``model`` whose binary weights are ``sign(means[name])``."""
    binary = {name for name, p in model.named_parameters() if is_binary(p)}
    state = {}
    for name, tensor in model.state_dict().items():
        if name not in binary:
            state[name] = tensor.detach().float().cpu() if tensor.is_floating_point() else tensor.detach().cpu()
    return {"format": checkpoint.PACKED, "version": VERSION, "model": model_name, "width": width,
            "num_classes": num_classes, "image_size": image_size, "dataset": dataset,
            "mean": list(mean), "std": list(std), "source": source,
            "binary": {name: pack_bits(torch.sign(means[name])) for name in sorted(binary)},
            "state": state}


class PackedError(ValueError):
    """A file that is not a packed network this version can read; the message says why."""


def read_packed(path) -> dict:
    """The content of a packed file, checked: format, version, digest, every part there."""
    obj = checkpoint.load(path)  # CheckpointError: missing, truncated, damaged, not data
    if obj.get("format") != checkpoint.PACKED:
        raise PackedError(f"{path} is not an exported binary network (no format {checkpoint.PACKED!r}); "
                          f"export one with `python main.py --export CHECKPOINT --out FILE`")
    if obj.get("version") != VERSION:
        raise PackedError(f"{path} is an exported network of format version {obj.get('version')!r}; "
                          f"this version reads version {VERSION}")
    missing = [key for key in ("model", "width", "num_classes", "image_size", "dataset", "mean", "std",
                               "binary", "state") if key not in obj]
    if missing:
        raise PackedError(f"{path} is an incomplete exported network: it has no {', '.join(missing)}")
    return obj


def network_of(obj, device="cpu"):
    """The ``nn.Module`` (eval mode) of packed content: the mean network, exactly."""
    model = build_model(obj["model"], obj["num_classes"], obj["width"], obj["image_size"])
    state = dict(obj["state"])
    for name, packed in obj["binary"].items():
        state[name] = unpack_bits(packed)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise PackedError(f"the exported tensors do not fit {obj['model']}: {error}") from None
    return model.to(device).eval()


def load_packed(path, device="cpu"):
    """The exported network in ``path``, ready for inference: a plain ``nn.Module`` in
    eval mode computing ``sign(M)``'s network, with no optimizer. Its input is normalised
    with the file's ``mean`` and ``std`` (``read_packed(path)`` has them)."""
    return network_of(read_packed(path), device)
