"""Safe checkpoints: loading never runs code from the file, and a checkpoint refuses, with the
reason, to load into a model of another shape."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from trained_run import TrainedRun, medrpn, trained_run

from medrpn.data.datamodule import LesionDataModule
from medrpn.errors import ConfigError, MedrpnError
from medrpn.predict import load_checkpoint
from medrpn.training import LesionDetectionModule


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
    with pytest.raises(MedrpnError, match=r"could run code when loaded; it was refused \(.*GLOBAL posix.mkdir"):
        load_checkpoint(malicious)
    assert not (tmp_path / "code-was-run").exists()


def test_validate_refuses_a_checkpoint_that_carries_code(run, malicious, tmp_path):
    result = medrpn("validate", "--config", str(run.config), "--ckpt_path", str(malicious), cwd=run.work)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "it was refused" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "code-was-run").exists()


def test_checkpoint_refuses_a_model_of_another_shape(run):
    # medrpn validate/test --ckpt_path rebuild the model from the checkpoint's own settings; this
    # is the path of Python users who restore a checkpoint into a model they configured.
    saved = torch.load(run.ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    data = LesionDataModule(str(run.annotations), image_size=128, num_workers=0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    other = LesionDetectionModule(**{**saved, "backbone": {**saved["backbone"], "fpn_channels": 16}})
    with pytest.raises(ConfigError, match=r"trained with other model settings.*backbone.*fpn_channels"):
        trainer.validate(other, datamodule=data, ckpt_path=str(run.ckpt), verbose=False)
    same_shape = LesionDetectionModule(**{**saved, "roi": {**saved["roi"], "nms_thresh": 0.3}})
    trainer.validate(same_shape, datamodule=data, ckpt_path=str(run.ckpt), verbose=False)  # thresholds may differ
