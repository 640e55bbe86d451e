"""Fixtures shared by several test modules."""

from __future__ import annotations

import shutil

import pytest
import torch


def pytest_terminal_summary(terminalreporter) -> None:
    """Say it plainly when the DICOM conformance checks of the SR and GSPS did not run."""
    if shutil.which("dciodvfy") is None:
        terminalreporter.write_line(
            "DICOM conformance checks (dciodvfy) SKIPPED: dicom3tools is not installed "
            "(`apt-get install dicom3tools`; `make test` installs it where it runs as root)",
            yellow=True,
            bold=True,
        )


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for a module, put back afterwards: the same arithmetic (so the same
    training runs) on every machine, and small convolutions on a CPU that other processes share
    run far faster (here 40x: the second thread mostly waits for a core). A module opts in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
