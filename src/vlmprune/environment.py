"""Checks of the installed packages that every command importing transformers runs first.

A torchvision wheel from PyPI installed beside the CPU torch of the PyTorch index (lmms-eval pulls one
in) does not import (its compiled operators do not match this torch), and transformers, which imports
torchvision whenever it is installed, then fails in every command with "ModuleNotFoundError: Could
not import module 'LlamaConfig'", a message that names neither package. Imports nothing heavy: the
check imports torchvision only when it is installed, as transformers would anyway.
"""

from __future__ import annotations

import importlib
import importlib.util

from vlmprune.errors import VlmpruneError


def check_torchvision() -> None:
    """Refuse to go on when torchvision is installed but does not import beside this torch, naming the fix."""
    try:
        installed = importlib.util.find_spec("torchvision") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return
    try:
        importlib.import_module("torchvision")
    except Exception as exc:  # noqa: BLE001 - any failure to import it breaks transformers the same way
        lines = str(exc).strip().splitlines()
        raise VlmpruneError(
            f"torchvision is installed but does not import beside this torch ({type(exc).__name__}: "
            f"{lines[-1] if lines else exc!r}), and transformers imports it whenever it is installed, so no "
            f"command can load a model. PyPI's torchvision wheels are built against PyPI's (CUDA) torch, not the "
            f"CPU build from the PyTorch index: remove it (`pip uninstall torchvision`; vlmprune and lmms-eval's "
            f"image tasks do not need it) or install the torchvision build that matches your torch (the same index "
            f"and version pair, e.g. `pip install torchvision --index-url https://download.pytorch.org/whl/cpu`)"
        ) from None
