"""Reading a checkpoint file safely: tensors and plain data only, with errors that name the file.

Every command that opens a checkpoint (`fit`/`validate`/`test --ckpt_path`, `predict`, `evaluate`,
a second stage) reads it here, with `weights_only=True`: a file that carries pickled code is
refused before any of it runs. A remote checkpoint (`https://...`, `s3://...`) is downloaded
first (`download_checkpoint`) and then read here like any other.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


def is_remote(path: str | Path) -> bool:
    """Whether `path` is a URL (`https://...`, `s3://...`) rather than a local file."""
    return "://" in str(path) and not str(path).startswith("file://")


def download_checkpoint(url: str, folder: Path) -> Path:
    """The checkpoint at `url` copied into `folder` (with fsspec: http(s), and s3, gs, ... where their
    packages are installed), to be read with `read_checkpoint`.

    Raises:
        MedrpnError: naming the URL (without credentials) and why it could not be downloaded.
    """
    import fsspec

    from medrpn.training.runs import redact_uri

    local = folder / (Path(urlsplit(url).path).name or "checkpoint.ckpt")
    try:
        filesystem, remote = fsspec.core.url_to_fs(url)
        filesystem.get_file(remote, str(local))
    except Exception as error:  # noqa: BLE001 - a network, server or missing-package failure gets one clear line
        raise MedrpnError(
            f"{redact_uri(url)}: could not download the checkpoint ({error.__class__.__name__}: {redact_uri(_first_line(error))})"
        ) from None
    return local


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0][:200]


def _refusal_reason(error: Exception) -> str:
    """The line of torch's refusal that names what the file holds (its first line only explains
    the weights_only default, and suggests turning it off)."""
    lines = [line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "Unsupported" in line]
    return (lines[0] if lines else _first_line(error))[:200]
