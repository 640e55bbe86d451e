"""Reading a checkpoint file safely: tensors and plain data only, with errors that name the file.

Every command that opens a checkpoint (`fit`/`validate`/`test --ckpt_path`, `predict`, `evaluate`,
a second stage) reads it here, with `weights_only=True`: a file that carries pickled code is
refused before any of it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from medrpn.errors import MedrpnError


def read_checkpoint(path: str | Path, kind: str = "checkpoint", mmap: bool = False) -> dict[str, Any]:
    """The contents of the checkpoint at `path`, on the CPU.

    Args:
        path: the file.
        kind: what the file should be, for the messages ("checkpoint", "second-stage checkpoint").
        mmap: map the tensors instead of reading them (for reading a few small entries of a
            large file).

    Raises:
        MedrpnError: naming the file: missing, damaged, not a dict, or refused for carrying code.
    """
    path = Path(path)
    if not path.is_file():
        raise MedrpnError(f"{path}: {kind} not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        raise MedrpnError(
            f"{path}: the {kind} holds objects other than tensors and plain data, which could run code when "
            f"loaded; it was refused ({_refusal_reason(error)})"
        ) from None
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file gets the same clear message
        raise MedrpnError(f"{path}: not a loadable {kind} ({error.__class__.__name__}: {_first_line(error)})") from None
    if not isinstance(checkpoint, dict):
        raise MedrpnError(f"{path}: not a {kind} (it holds a {type(checkpoint).__name__})")
    return checkpoint


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0][:200]


def _refusal_reason(error: Exception) -> str:
    """The line of torch's refusal that names what the file holds (its first line only explains
    the weights_only default, and suggests turning it off)."""
    lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return (lines[0] if lines else _first_line(error))[:200]
