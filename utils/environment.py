"""Whether the installed torch and torchvision work together, said in one line.

A torchvision built for another torch (another version, or a CUDA build beside a CPU
torch, as pip may pick when torch's own index cannot be reached) imports with
"operator torchvision::nms does not exist" or an undefined symbol: a traceback from the
first program that needs it. ``main.py`` and the test suite ask this module first.

    python -m utils.environment      # "torch 2.14.1 and torchvision 0.29.1 work together"
"""
import sys
from importlib import metadata

TESTED = ("2.14.1", "0.29.1")  # the pair the tests were run with (constraints.txt)
INSTALL = f"pip install torch=={TESTED[0]} torchvision=={TESTED[1]}"


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def problem():
    """What is wrong with the installed pair, in one line, or None."""
    try:
        import torch  # noqa: F401
    except Exception as error:  # an import of a broken wheel can raise anything
        return f"torch {version('torch')} cannot be imported ({first_line(error)}): reinstall it: {INSTALL}"
    try:
        import torchvision  # noqa: F401
    except Exception as error:
        return (f"torch {version('torch')} and torchvision {version('torchvision')} do not work together "
                f"({first_line(error)}): install a matching pair, e.g. {INSTALL} (the CPU build: add "
                f"--index-url https://download.pytorch.org/whl/cpu)")
    return None


def first_line(error) -> str:
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:160]


def main():
    found = problem()
    if found:
        print(f"error: {found}", file=sys.stderr)
        return 1
    print(f"torch {version('torch')} and torchvision {version('torchvision')} work together")
    return 0


if __name__ == "__main__":
    sys.exit(main())
