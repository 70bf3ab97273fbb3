"""VISPA as a library: the optimizer, its rivals behind the same protocol, the binary
layers and the exported networks, for a network of one's own.

    pip install .          # in a clone of the repository (torch and numpy are its requirements)
    pip install -e .       # the same, for working on the library: edits take effect at once

    from vispa import VISPA, BinaryConv2d, BinaryLinear, mark_binary, load_packed, recalibrate

``examples/own_network.py`` is a complete program that uses it. The parts are the
repository's folders ``optim/`` (VISPA, BayesBiNN, STE, the learning-rate schedule, the
BatchNorm recalibration) and ``models/`` (the binary layers, the networks of the paper,
the packed export), and of ``utils/`` only ``files.py`` (the files they read and write),
installed as ``vispa.optim``, ``vispa.models`` and ``vispa.utils.files``: pyproject.toml
maps them, so this package lies apart from them (src/vispa) and nothing here changes
where Python looks for modules.

Inside the clone the training program imports those folders as ``optim``, ``models`` and
``utils``; ``vispa`` is not importable there unless installed, so no module of the library
is ever loaded twice in a process that keeps to one of the two names.
"""
from .models import BinaryConv2d, BinaryLinear, build_model, is_binary, load_packed, mark_binary, sign_activation
from .optim import STE, VISPA, BayesBiNN, learning_rate, recalibrate

__all__ = ["VISPA", "BayesBiNN", "STE", "BinaryConv2d", "BinaryLinear", "mark_binary", "is_binary",
           "sign_activation", "load_packed", "build_model", "learning_rate", "recalibrate"]
