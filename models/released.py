"""The authors' checkpoint layouts, mapped both ways onto this repository's networks.

The authors' files (``torch.save`` of ``{epoch, model, config, state_dict,
best_prec1, fp_regime}``) hold their network's state_dict saved through
``nn.DataParallel``, so every key starts with ``module.``. A binary layer
``<layer>`` stores ``<layer>.Alpha`` (our ``<layer>.alpha``) and its distribution
``<layer>.M``, ``<layer>.Z`` (here kept by the optimizer for ``<layer>.weight``);
every other key is the same as ours.

The released files were written by the authors' code of 2024, and three layouts
exist (docs/released-checkpoints.md):

- today's code: ``Alpha``, ``M``, ``Z`` per binary layer;
- the code of February to December 2024: also ``<layer>.sample`` (shape (1, K),
  zeros, never used) after each ``Z``;
- VGG16 for two days around the release: the "without Z" layer, ``Alpha`` and
  ``M`` only - the K = 0 network, which is deterministic.

The rank K is read from the file (the first dimension of ``Z``). Everything else
is strict: a key that is missing, unexpected or of another shape is an error that
lists them.
"""
from dataclasses import dataclass

import torch

from .binary import is_binary

PREFIX = "module."


class LayoutError(ValueError):
    """A state_dict that does not fit the network; the message lists what does not."""


@dataclass
class Released:
    """What a released state_dict holds, in this repository's terms."""
    model_state: dict    # the network's state_dict; binary weights hold sign(M)
    distributions: dict  # binary weight name -> (M, Z)
    K: int               # the rank of Z (0: the file has no Z)
    dropped: list        # the `.sample` keys that were checked to be zero and left out


def binary_layers(model):
    """{layer name: its binary weight's shape} of the network."""
    return {name.rpartition(".")[0]: tuple(p.shape)
            for name, p in model.named_parameters() if is_binary(p)}


def rank_of(state_dict) -> int:
    """K of a released state_dict: the first dimension of its ``Z`` tensors (0 if it
    has none). LayoutError if they disagree."""
    _check_named_tensors(state_dict)
    ranks = {tuple(v.shape)[:1] for k, v in state_dict.items() if k.endswith(".Z")}
    if len(ranks) > 1:
        raise LayoutError(f"its Z tensors have different ranks: {sorted(r[0] for r in ranks if r)}")
    return ranks.pop()[0] if ranks and ranks != {()} else 0


def from_released(state_dict, model) -> Released:
    """Map a released state_dict onto ``model`` (any of the three layouts)."""
    K = rank_of(state_dict)
    prefix = PREFIX if state_dict and all(k.startswith(PREFIX) for k in state_dict) else ""
    layers = binary_layers(model)
    expected = {}  # released key -> (our key, shape)
    for name, tensor in model.state_dict().items():
        layer, _, leaf = name.rpartition(".")
        if layer in layers and leaf == "weight":
            expected[f"{prefix}{layer}.M"] = (name, layers[layer])
            if K > 0:
                expected[f"{prefix}{layer}.Z"] = (name, (K,) + layers[layer])
        elif layer in layers and leaf == "alpha":
            expected[f"{prefix}{layer}.Alpha"] = (name, tuple(tensor.shape))
        else:
            expected[prefix + name] = (name, tuple(tensor.shape))
    samples = [f"{prefix}{layer}.sample" for layer in layers]
    dropped = _check_samples(state_dict, samples, K)

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected and k not in dropped]
    wrong = [f"{k} {tuple(state_dict[k].shape)} in the file, {expected[k][1]} in the network"
             for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k][1]]
    if missing or unexpected or wrong:
        parts = filter(None, [_listing("missing", missing), _listing("unexpected", unexpected),
                              _listing("shape mismatch", wrong)])
        raise LayoutError("it does not match the network (another architecture or number of "
                          "classes?) - " + "; ".join(parts))

    model_state, distributions = dict(model.state_dict()), {}
    for key, (name, shape) in expected.items():
        value = state_dict[key]
        layer, _, leaf = key.rpartition(".")
        if leaf == "M":
            model_state[name] = torch.sign(value)
            distributions[name] = (value, distributions.get(name, (None, None))[1])
        elif leaf == "Z":
            distributions[name] = (distributions.get(name, (None, None))[0], value)
        else:
            model_state[name] = value
    for name, (M, Z) in distributions.items():
        if Z is None:  # the "without Z" layout: an empty factor
            distributions[name] = (M, M.new_zeros((0,) + tuple(M.shape)))
    return Released(model_state, distributions, K, dropped)


def to_released(model, distributions, samples=False) -> dict:
    """The released layout (``module.`` prefix, the authors' key order: Alpha, bias, M, Z
    within a binary layer) of ``model`` with
    the distributions ``{binary weight name: (M, Z)}``. ``samples=True`` adds the zero
    ``.sample`` of the code of 2024; a factor with K = 0 is left out, as in the
    "without Z" files."""
    layers = binary_layers(model)
    own = model.state_dict()
    state = {}
    for name, tensor in own.items():
        layer, _, leaf = name.rpartition(".")
        if layer in layers and leaf == "weight":
            M, Z = distributions[name]
            state[f"{PREFIX}{layer}.Alpha"] = own[f"{layer}.alpha"]
            if f"{layer}.bias" in own:
                state[f"{PREFIX}{layer}.bias"] = own[f"{layer}.bias"]
            state[f"{PREFIX}{layer}.M"] = M
            if Z.shape[0] > 0:
                state[f"{PREFIX}{layer}.Z"] = Z
                if samples:
                    state[f"{PREFIX}{layer}.sample"] = M.new_zeros(1, Z.shape[0])
        elif not (layer in layers and leaf in ("alpha", "bias")):
            state[PREFIX + name] = tensor
    return state


def _check_samples(state_dict, keys, K):
    """The ``.sample`` keys of the code of 2024: all binary layers have one or none, each
    of shape (1, K) and zero (they were never used). Returns the keys to drop."""
    present = [k for k in keys if k in state_dict]
    if not present:
        return []
    if len(present) != len(keys):
        absent = [k for k in keys if k not in state_dict]
        raise LayoutError(f"some binary layers have a .sample tensor and others not - missing: "
                          f"{', '.join(absent[:6])}")
    for key in present:
        value = state_dict[key]
        if tuple(value.shape) != (1, K):
            raise LayoutError(f"{key} has shape {tuple(value.shape)}, expected (1, {K}) "
                              f"(the authors' unused .sample tensors are 1 x K)")
        if not (value.is_floating_point() and torch.equal(value, torch.zeros_like(value))):
            raise LayoutError(f"{key} is not zero: the authors' .sample tensors are unused zeros, so "
                              f"this file was written by other code, which may use them")
    return present


def _check_named_tensors(state_dict):
    if not (isinstance(state_dict, dict) and
            all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state_dict.items())):
        raise LayoutError("its 'state_dict' is not a dict of named tensors")


def _listing(title, keys):
    shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")
    return f"{title}: {shown}" if keys else None
