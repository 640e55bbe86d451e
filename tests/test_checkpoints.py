"""Safe checkpoints: loading never runs code from the file, and a checkpoint refuses, with the
reason, to load into a model of another shape."""

from __future__ import annotations

import functools
import http.server
import math
import os
import shutil
import threading

import lightning as L
import mlflow
import pytest
import torch
from trained_run import RUN_NAME, TrainedRun, medrpn, trained_run

from medrpn.data.datamodule import LesionDataModule
from medrpn.errors import ConfigError, MedrpnError
from medrpn.inference.predict import load_checkpoint
from medrpn.training.lightning_module import LesionDetectionModule, checkpoint_model_settings


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


@pytest.fixture
def served(tmp_path):
    """A real HTTP server on 127.0.0.1 that serves the files of `tmp_path`: a checkpoint store on the network."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.shutdown()


def test_validate_refuses_a_remote_checkpoint_that_carries_code(run, malicious, served, tmp_path):
    # Lightning's own reader loads a URL with weights_only=False, which would run the file's code
    url = f"{served}/{malicious.name}?token=T0kenValue"
    result = medrpn("validate", "--config", str(run.config), "--ckpt_path", url, cwd=run.work)
    assert not (tmp_path / "code-was-run").exists()
    assert result.returncode == 2, result.stderr[-2000:]
    assert "it was refused" in result.stderr and "Traceback" not in result.stderr
    assert "T0kenValue" not in result.stdout + result.stderr


def test_validate_reads_a_remote_checkpoint_like_a_local_one(run, served, tmp_path):
    shutil.copy(run.ckpt, tmp_path / "remote.ckpt")
    result = medrpn("validate", "--config", str(run.config), "--ckpt_path", f"{served}/remote.ckpt",
                    "--trainer.logger.init_args.run_name", "validate-remote", cwd=run.work)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"medrpn: downloaded {served}/remote.ckpt to " in result.stdout
    assert "model.backbone.fpn_channels: 32 from the checkpoint, not 64" in result.stdout


def test_weights_only_false_is_refused(run):
    result = medrpn("validate", "--config", str(run.config), "--ckpt_path", str(run.ckpt), "--weights_only", "false",
                    cwd=run.work)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--weights_only false is not supported" in result.stderr and "Traceback" not in result.stderr


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
    # medrpn validate/test --ckpt_path take the weights' settings from the checkpoint; this is the
    # path of Python users who restore a checkpoint into a model they configured.
    saved = torch.load(run.ckpt, map_location="cpu", weights_only=True)["hyper_parameters"]
    data = LesionDataModule(str(run.annotations), image_size=128, num_workers=0)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False)
    other = LesionDetectionModule(**{**saved, "backbone": {**saved["backbone"], "fpn_channels": 16}})
    with pytest.raises(ConfigError, match=r"trained with other model settings.*backbone.*fpn_channels"):
        trainer.validate(other, datamodule=data, ckpt_path=str(run.ckpt), verbose=False)
    same_shape = LesionDetectionModule(**{**saved, "roi": {**saved["roi"], "nms_thresh": 0.3}})
    trainer.validate(same_shape, datamodule=data, ckpt_path=str(run.ckpt), verbose=False)  # thresholds may differ


def test_validate_takes_the_weights_settings_from_the_checkpoint_and_the_rest_as_given(run):
    # The config lacks the fit's fpn_channels 32 and planned anchors (given on its command line);
    # the command line here asks for one proposal per image.
    result = medrpn(
        "validate", "--config", str(run.config), "--ckpt_path", str(run.ckpt),
        "--model.rpn.post_nms_top_n_test", "1", "--trainer.logger.init_args.run_name", "validate-top1", cwd=run.work,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model.backbone.fpn_channels: 32 from the checkpoint, not 64" in result.stdout
    assert "model.anchors.sizes: " in result.stdout
    assert "model.rpn.post_nms_top_n_test: 1 as given (the checkpoint was trained with 100)" in result.stdout
    client = mlflow.MlflowClient(tracking_uri=run.tracking_uri)
    runs = {r.info.run_name: r.data for r in client.search_runs(client.get_experiment_by_name("medrpn-demo").experiment_id)}
    # the run recorded the given value, not the checkpoint's
    assert runs["validate-top1"].params["model/rpn/post_nms_top_n_test"] == "1"
    assert runs[RUN_NAME].params["model/rpn/post_nms_top_n_test"] == "100"
    # and its model was built with it: the same weights on the same validation images give the
    # fit's validation figures exactly unless the proposals changed (the tiny model's recall may
    # be 0 after its two training steps, so no figure needs to be of a given size)
    top1, fit = runs["validate-top1"].metrics, runs[RUN_NAME].metrics
    changed = [k for k in top1 if k.startswith("val/") and k in fit and not math.isclose(top1[k], fit[k], abs_tol=1e-6)]
    assert changed, "validating with 1 proposal per image gave the figures of 100"


def test_checkpoint_model_settings_split_what_the_weights_need_from_what_is_given():
    saved = {
        "class_names": ["nodule"], "backbone": {"name": "resnet18", "fpn_channels": 32},
        "anchors": {"sizes": [[16.0]], "aspect_ratios": (1.0,)},
        "rpn": {"conv_depth": 1, "nms_thresh": 0.7, "sampler": "balanced"},
        "optim": {"lr": 0.001},
    }
    given = {
        "backbone": {"name": "resnet18", "fpn_channels": 64}, "anchors": "auto",
        "rpn": {"conv_depth": 1, "nms_thresh": 0.5, "sampler": "focal"}, "optim": {"lr": 0.01},
    }
    taken, notes = checkpoint_model_settings(saved, given, resume=False)
    assert taken == {"backbone": saved["backbone"], "anchors": saved["anchors"], "rpn": {"conv_depth": 1}}
    assert sorted(notes) == sorted([
        "model.anchors: {'sizes': [[16.0]], 'aspect_ratios': (1.0,)} from the checkpoint, not 'auto'",
        "model.backbone.fpn_channels: 32 from the checkpoint, not 64",
        "model.rpn.nms_thresh: 0.5 as given (the checkpoint was trained with 0.7)",
    ])  # the sampler and the optimiser only matter to training: nothing said of them
    # resuming a fit goes on with the checkpoint's optimiser state, so its settings too
    taken, notes = checkpoint_model_settings(saved, given, resume=True)
    assert taken["optim"] == {"lr": 0.001} and "model.optim.lr: 0.001 from the checkpoint, not 0.01" in notes
    assert "model.rpn.sampler: 'focal' as given (the checkpoint was trained with 'balanced')" in notes
    # a YAML list equals the checkpoint's tuple: nothing to say when nothing differs
    same = {"anchors": {"sizes": [[16.0]], "aspect_ratios": [1.0]}}
    assert checkpoint_model_settings({"anchors": saved["anchors"]}, same, resume=False)[1] == []
