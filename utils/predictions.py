"""The file of ``main.py --evaluate ... --predictions FILE``: the per-image outputs of an
evaluation, as plain data (``torch.load(FILE, weights_only=True)``).

    probs       (N, C) the L-sample predictive: the mean of the L networks' softmaxes
    mean_probs  (N, C) the mean network sign(M)'s softmax
    labels      (N,)   the true classes
    logits      (N, C) the L passes' logits averaged (their top-1 is the released code's)
    nll, mean_nll (N,) float64: -log of the label's probability, computed in log space
    deployed_probs, deployed_nll   the deployed network's (sign(M) with BatchNorm
                statistics of its own), where the evaluation had one

with ``format`` "vispa-predictions", ``version`` and a content digest, by which
``--overwrite`` knows a file of predictions from any other file.
"""
import torch

from .files import FileError, load, save_atomic, verify_digest, with_digest

FORMAT = "vispa-predictions"
VERSION = 1
NEEDED = ("probs", "mean_probs", "labels")
# An average of L float32 distributions may pass 1 by a few units in the last place (seen:
# 1.0000002 for L = 40 near-certain samples); beyond this it is not rounding.
ROUNDING = 1e-4


def write(content: dict, path: str, new_only=False):
    save_atomic(with_digest(dict(content, format=FORMAT, version=VERSION)), path, new_only=new_only)


def is_predictions(path: str) -> bool:
    """Whether ``path`` is a whole file of predictions this program wrote."""
    try:
        read(path)
        return True
    except FileError:
        return False


def read(path: str) -> dict:
    """The predictions in ``path``, checked: FileError (one line) for anything else."""
    obj = load(path, what="file of predictions")
    if obj.get("format") != FORMAT:
        raise FileError(f"{path} is not a file of predictions (write one with main.py --evaluate CHECKPOINT "
                        f"--predictions FILE)")
    content = verify_digest(obj, path, "a file of predictions")
    missing = [key for key in NEEDED if not isinstance(content.get(key), torch.Tensor)]
    if missing:
        raise FileError(f"{path} is an incomplete file of predictions: it has no {', '.join(missing)}")
    probs, labels = content["probs"], content["labels"]
    if probs.dim() != 2 or labels.dim() != 1 or labels.dtype != torch.int64:
        raise FileError(f"{path}: its probs must be N x C and its labels N whole numbers")
    for key in ("probs", "mean_probs", "deployed_probs"):
        found = content.get(key)
        if found is None:
            continue
        if found.shape != probs.shape or len(found) != len(labels):
            raise FileError(f"{path}: its {key} ({tuple(found.shape)}) and labels ({len(labels)}) do not match")
        if not bool(((found >= 0) & (found <= 1 + ROUNDING)).all()):
            raise FileError(f"{path}: its {key} are not probabilities (values outside [0, 1])")
    if len(labels) and not bool(((labels >= 0) & (labels < probs.shape[1])).all()):
        raise FileError(f"{path}: labels outside the {probs.shape[1]} classes")
    return content
