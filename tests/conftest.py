"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import shutil

import torch


def pytest_configure(config) -> None:
    """One torch thread in each test process and in every process a test starts (OMP_NUM_THREADS
    is inherited: `medrpn fit` subprocesses, DDP ranks, the bench's trainers). The tests run in one
    process per core (the Makefile's PYTEST_PARALLEL), so a second thread only waits for a core that
    the other test process holds: small convolutions ran up to 40x slower that way (a 2.8 s training
    test took 68 s in the full suite). One thread also gives the same arithmetic on every machine."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def pytest_terminal_summary(terminalreporter) -> None:
    """Say it plainly when the DICOM conformance checks of the SR and GSPS did not run."""
    if shutil.which("dciodvfy") is None:
        terminalreporter.write_line(
            "DICOM conformance checks (dciodvfy) SKIPPED: dicom3tools is not installed "
            "(`apt-get install dicom3tools`; `make test` installs it where it runs as root)",
            yellow=True,
            bold=True,
        )
