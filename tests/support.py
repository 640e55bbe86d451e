"""Small helpers shared by test modules (and the scripts they run in subprocesses)."""

from __future__ import annotations

import locale
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# A tiny detector for 64 px test images: real training steps in a second or two.
SIZE = 64
TINY = dict(
    backbone={"name": "resnet18", "fpn_channels": 16, "returned_stages": [1, 2, 3]},
    anchors={"sizes": [[8.0], [16.0], [32.0], [64.0]]},
    rpn={"pre_nms_top_n_train": 100, "post_nms_top_n_train": 50, "pre_nms_top_n_test": 50, "post_nms_top_n_test": 50},
    roi={"batch_size_per_image": 32},
)


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_step(path: Path) -> int | None:
    """Global step of a checkpoint file, None while it is missing or being written."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
    except Exception:  # noqa: BLE001 - absent or half-written: look again later
        return None


@contextmanager
def locale_kept() -> Iterator[None]:
    """Puts the process locale back after SimpleITK's GDCM reads or writes DICOM, which sets it to
    "C": Python's default text encoding would then be ASCII for the rest of the test process, and
    a later test decoding a subprocess's UTF-8 output (MLflow prints an emoji) fails, depending on
    which tests happened to run before it in the same process."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)
