"""Small helpers shared by test modules (and the scripts they run in subprocesses)."""

from __future__ import annotations

import locale
import multiprocessing
import os
import runpy
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
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


# What every `medrpn` command imports; the fork server imports it once (the first command waits).
_PRELOADED = ["medrpn.cli", "medrpn.training.cli", "medrpn.commands.predict", "medrpn.commands.evaluate",
              "medrpn.commands.check_data", "medrpn.commands.plan", "medrpn.commands.fit_crops"]
_CHILD = Path(__file__).with_name("medrpn_child.py")


def run_medrpn(*args: str, cwd: Path, env: Mapping[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`medrpn ARGS` in its own process, as `subprocess.run(..., capture_output=True)` would give it
    (exit status, standard output and error as text), without the 6-13 s of importing torch,
    Lightning and MLflow that each new Python process pays: the process is forked from a server
    that imported them once per test process (multiprocessing's forkserver; it has run nothing, so
    every command starts from a clean state). For commands that must be started as programs
    (DDP launchers, which start `sys.argv` again; signals; servers) the tests use subprocess."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOADED)
    with tempfile.TemporaryDirectory(prefix="medrpn-output-") as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        command = (list(args), str(cwd), dict(os.environ if env is None else env), str(out), str(err))
        process = context.Process(target=runpy.run_path, args=(str(_CHILD),), kwargs={"init_globals": {"COMMAND": command}})
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired(["medrpn", *args], timeout, _read(out), _read(err))
        return subprocess.CompletedProcess(["medrpn", *args], process.exitcode, _read(out), _read(err))


def _read(path: Path) -> str:
    # progress bars and Lightning's tips are UTF-8 whatever the locale
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
