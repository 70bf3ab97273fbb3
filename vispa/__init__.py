"""VISPA as a library: the optimizer, the binary layers and the exported networks, for a
network of one's own.

    pip install .          # in a clone of the repository (torch and numpy are its requirements)

    from vispa import VISPA, BinaryConv2d, BinaryLinear, mark_binary, load_packed

``examples/own_network.py`` is a complete program that uses it. The parts are the
repository's folders ``optim/`` (VISPA and its learning-rate schedule), ``models/`` (the
binary layers, the networks of the paper, the packed export) and ``utils/`` (the files
they read and write), installed as ``vispa.optim``, ``vispa.models`` and ``vispa.utils``.
"""
import os as _os

# In a clone of the repository the parts are its top-level folders; installed, they lie
# in this package's own folder.
if not _os.path.isdir(_os.path.join(__path__[0], "optim")):
    __path__.append(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))

from .models import (BinaryConv2d, BinaryLinear, build_model, is_binary, load_packed,  # noqa: E402
                     mark_binary, sign_activation)
from .optim import VISPA, learning_rate  # noqa: E402

__all__ = ["VISPA", "BinaryConv2d", "BinaryLinear", "mark_binary", "is_binary", "sign_activation",
           "load_packed", "build_model", "learning_rate"]
