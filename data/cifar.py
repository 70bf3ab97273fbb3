"""CIFAR-10 / CIFAR-100 as the python-version archives hold them: pickled batches of
uint8 images (N, 3072) and integer labels, written by Python 2.

A batch file is a pickle, and a pickle can name any function to call while it is
read. These files hold only dicts, lists, strings, bytes, numbers and numpy arrays,
so they are read by an unpickler that allows exactly what builds those, and refuses
a file that names anything else before calling it.
"""
import os
import pickle

import numpy as np
import torch

from .errors import DatasetError

# name -> (folder, training files, test file, label key, number of classes)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "labels", 10),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels", 100),
}


def read_cifar(root: str, name: str, split: str):
    """(images, labels) of the "train" or "test" split of ``name`` ("cifar10" or
    "cifar100") under ``root``: uint8 (N, 3, 32, 32) and int64 (N,)."""
    folder, train_files, test_file, label_key, num_classes = LAYOUTS[name]
    files = train_files if split == "train" else [test_file]
    missing = [f for f in files if not os.path.isfile(os.path.join(root, folder, f))]
    if missing:
        where = "" if os.path.normpath(root) == "datasets" else f"DATA_ROOT={root} "
        raise DatasetError(f"{name} not found: {os.path.join(root, folder, missing[0])} is missing; "
                           f"download it with `{where}bash download_data.sh {name}`")
    parts = [_read_batch(os.path.join(root, folder, f), label_key, num_classes) for f in files]
    return torch.cat([images for images, _ in parts]), torch.cat([labels for _, labels in parts])


# What building numpy arrays (and Python 3's bytes in protocol 2) calls; nothing else.
ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
           ("numpy._core.multiarray", "_reconstruct"), ("_codecs", "encode")}


class _DataOnly(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


class _Refused(Exception):
    pass


def _read_batch(path, label_key, num_classes):
    """One pickle file -> (uint8 images (N, 3, 32, 32), int64 labels (N,)).

    The files were written by Python 2: their strings load as ``str`` only with
    ``encoding="latin1"`` (which is also how numpy gets its raw bytes back)."""
    try:
        with open(path, "rb") as f:
            entry = _DataOnly(f, encoding="latin1").load()
        data = np.asarray(entry["data"])
        labels = _integer_labels(entry[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(f"expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
        if labels.shape != (data.shape[0],):
            raise ValueError(f"{labels.shape[0]} labels for {data.shape[0]} images")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels outside 0..{num_classes - 1}")
    except _Refused as refused:
        raise DatasetError(f"refusing to read {path}: it names {refused}, which is not data and "
                           f"could run code (a CIFAR file holds only arrays, lists and strings); "
                           f"delete the folder and download it again") from None
    except Exception as error:  # any failure to parse means the same thing to the user
        raise DatasetError(f"cannot read {path}: {type(error).__name__}: {error} "
                           f"(delete the folder and download it again)") from None
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels)


def _integer_labels(values):
    """The labels as int64, refusing anything that is not an integer (3.7 would
    otherwise be truncated to class 3)."""
    labels = np.asarray(values)
    if labels.size and labels.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, found {labels.dtype} values such as "
                         f"{labels.reshape(-1)[:1].tolist()}")
    return labels.astype(np.int64)
