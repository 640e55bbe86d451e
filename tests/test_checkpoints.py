"""Safe checkpoints: loading never runs code from the file, and a checkpoint refuses, with the
reason, to load into a model of another shape."""

from __future__ import annotations

import os

import pytest
import torch
from trained_run import TrainedRun, medrpn, trained_run

from medrpn.errors import MedrpnError
from medrpn.predict import load_checkpoint


class _RunsCode:
    """Pickles as a call to os.mkdir: loading it without weights_only would create a folder."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture(scope="module")
def run(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


@pytest.fixture
def malicious(run, tmp_path):
    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["note"] = _RunsCode(str(tmp_path / "code-was-run"))
    path = tmp_path / "malicious.ckpt"
    torch.save(checkpoint, path)
    return path


def test_predict_refuses_a_checkpoint_that_carries_code(malicious, tmp_path):
    with pytest.raises(MedrpnError, match="not a loadable medrpn checkpoint"):
        load_checkpoint(malicious)
    assert not (tmp_path / "code-was-run").exists()


def test_validate_refuses_a_checkpoint_that_carries_code(run, malicious, tmp_path):
    result = medrpn("validate", "--config", str(run.config), "--ckpt_path", str(malicious), cwd=run.work)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "it was refused" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "code-was-run").exists()


def test_checkpoint_refuses_a_model_of_another_shape(run):
    result = medrpn(
        "validate", "--config", str(run.config), "--ckpt_path", str(run.ckpt), "--model.backbone.fpn_channels", "16",
        cwd=run.work,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "trained with other model settings" in result.stderr and "backbone" in result.stderr
    assert "Traceback" not in result.stderr
