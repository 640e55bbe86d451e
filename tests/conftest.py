"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


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
