"""Distributed training on CPU with real processes (gloo): one MLflow run, one set of
checkpoints, validation metrics that equal what a single process computes, and ranks that stay in
step when one of them has a batch of unreadable files only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from support import TINY, run_medrpn

from medrpn.data.batch import collate_detection
from medrpn.data.datamodule import LesionDataModule
from medrpn.data.synth import write_synthetic_dataset
from medrpn.training.lightning_module import LesionDetectionModule

REPO = Path(__file__).resolve().parents[1]


def _medrpn(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "medrpn", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return output


def _even_validation_seed(annotations: Path, val_fraction: float, test_fraction: float) -> int:
    """A split seed giving an even number of validation items, so the distributed sampler pads nothing."""
    return next(
        s for s in range(20)
        if len(LesionDataModule(str(annotations), val_fraction=val_fraction, test_fraction=test_fraction, split_seed=s).splits["val"]) % 2 == 0
    )


def _validate_on_one_and_two_processes(root: Path, common: list[str], checkpoint: Path, experiment: str, prefix: str):
    """`medrpn validate` of the checkpoint with 1 and then 2 processes; every MLflow run of the
    experiment by name, and the val/ metrics of the two validations, which must be equal."""
    for devices in ("1", "2"):
        args = ("validate", *common, "--trainer.devices", devices, "--trainer.strategy", "ddp" if devices == "2" else "auto",
                "--ckpt_path", str(checkpoint), "--trainer.logger.init_args.run_name", f"{prefix}-{devices}")
        if devices == "2":
            _medrpn(*args, cwd=root)  # a program of its own: Lightning's launcher starts its command line again
        else:
            single = run_medrpn(*args, cwd=root)
            assert single.returncode == 0, (single.stdout + single.stderr)[-4000:]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlruns.db'}")
    runs = {r.info.run_name: r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")}
    one, two = runs[f"{prefix}-1"].data.metrics, runs[f"{prefix}-2"].data.metrics
    keys = [k for k in one if k.startswith("val/")]
    assert "val/cpm" in keys and "val/rpn_recall100" in keys
    for key in keys:
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    return runs, one


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_synthetic_dataset(root / "data", n_images=40, image_size=128, seed=11)
    annotations = root / "data" / "annotations.csv"
    seed = _even_validation_seed(annotations, 0.25, 0.1)
    common = [
        "--config", str(REPO / "configs" / "demo.yaml"), "--data.annotations", str(annotations),
        "--data.image_size", "128", "--data.num_workers", "0", "--data.batch_size", "2",
        "--data.val_fraction", "0.25", "--data.test_fraction", "0.1", "--data.split_seed", str(seed),
        "--model.backbone.fpn_channels", "32", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
    ]
    return root, common


def test_two_process_ddp_fit_makes_one_run_and_validation_matches_one_process(data):
    root, common = data
    output = _medrpn(
        "fit", *common, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "3", "--trainer.logger.init_args.run_name", "ddp-fit",
        "--data.sampler", "balanced", cwd=root,  # a weighted sampler, sharded over the ranks
    )
    assert output.count("medrpn fit finished.") == 1  # the summary comes from rank 0 only
    assert "distributed_backend=gloo" in output and "All distributed processes registered" in output
    checkpoint = root / "demo" / "checkpoints" / "best.ckpt"
    assert checkpoint.is_file() and not list((root / "demo" / "checkpoints").glob("best-v*.ckpt"))

    runs, _ = _validate_on_one_and_two_processes(root, common, checkpoint, "medrpn-demo", "validate")
    assert sorted(runs) == ["ddp-fit", "validate-1", "validate-2"]  # one run per command, not per process
    assert "val/cpm" in runs["ddp-fit"].data.metrics and "test/froc_1fp" in runs["ddp-fit"].data.metrics


# ---------------------------------------------------------------------------------------------
# A batch in which every file failed


def test_a_rank_whose_batches_are_all_unreadable_stays_in_step(tmp_path):
    """Every batch of rank 1 is one missing file (reported, dropped: an empty batch). Its training
    step must still take part in the gradient all-reduce, or rank 0 waits for it until the DDP
    timeout (issue 21: `training_step` returned None). Both ranks end with the same weights."""
    from PIL import Image as PILImage

    good = tmp_path / "good.png"
    image = np.zeros((64, 64), dtype=np.uint8)
    image[16:40, 16:40] = 200
    PILImage.fromarray(image).save(good)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "tests" / "ddp_empty_batch.py"), str(good), str(tmp_path / "missing.png"), str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert f"Skipping unreadable image {tmp_path / 'missing.png'}: file not found" in output
    assert "Training batch 0 has no readable image" in output and "Training batch 1 has no readable image" in output
    sums = dict(line.split(" weights sum ") for line in output.splitlines() if " weights sum " in line)
    assert sorted(sums) == ["rank 0", "rank 1"] and sums["rank 0"] == sums["rank 1"], output[-4000:]


def test_the_loss_of_an_empty_batch_reaches_every_trainable_parameter():
    """What DDP needs from a rank with nothing to learn from: a zero loss whose backward gives
    every trainable parameter a gradient (zero), so that every gradient bucket is all-reduced."""
    module = LesionDetectionModule(class_names=["a", "b"], **TINY)
    module.model.backbone.body.conv1.requires_grad_(False)  # a frozen layer is left out
    loss = module.training_step(collate_detection([None, None]), 0)
    assert isinstance(loss, torch.Tensor) and loss.item() == 0.0
    loss.backward()
    trainable = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    assert len(trainable) > 50
    assert [name for name, p in trainable if p.grad is None] == []
    assert all(torch.count_nonzero(p.grad) == 0 for _, p in trainable)
    assert module.model.backbone.body.conv1.weight.grad is None


# ---------------------------------------------------------------------------------------------
# Volumes


def test_two_process_ddp_fit_on_volumes_and_per_scan_validation_matches_one_process(tmp_path):
    """The 3D detector under DDP: patches sharded over two processes, one MLflow run and one
    checkpoint, and whole-scan validation counted per scan equal to one process's (an even number
    of validation scans, so that the distributed sampler pads none)."""
    from medrpn.data.synth_volumes import write_synthetic_volumes

    write_synthetic_volumes(tmp_path / "data", n_volumes=10, shape=(40, 40, 16), seed=4)
    annotations = tmp_path / "data" / "annotations.csv"
    seed = _even_validation_seed(annotations, 0.2, 0.2)
    common = [
        "--config", str(REPO / "configs" / "synth_volumes.yaml"), "--data.annotations", str(annotations),
        "--data.num_workers", "0", "--data.batch_size", "2", "--data.patches.size", "[32, 32, 16]",
        "--data.patches.per_volume", "8", "--model.volume.window", "[40, 40, 16]",
        "--data.val_fraction", "0.2", "--data.test_fraction", "0.2", "--data.split_seed", str(seed),
        "--model.bootstrap_samples", "20", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
    ]
    output = _medrpn(
        "fit", *common, "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_epochs", "12",
        "--trainer.check_val_every_n_epoch", "6", "--trainer.logger.init_args.run_name", "ddp-fit-3d", cwd=tmp_path,
    )
    assert output.count("medrpn fit finished.") == 1 and "distributed_backend=gloo" in output
    assert "held-out test   FROC sensitivity at 1 FP/scan" in output
    checkpoint = tmp_path / "demo" / "volume_checkpoints" / "best.ckpt"
    assert checkpoint.is_file() and not list(checkpoint.parent.glob("best-v*.ckpt"))

    runs, one = _validate_on_one_and_two_processes(tmp_path, common, checkpoint, "medrpn-volumes", "validate-3d")
    assert sorted(runs) == ["ddp-fit-3d", "validate-3d-1", "validate-3d-2"]
    assert one["val/cpm"] > 0, one  # some lesions found: not a comparison of zeros
