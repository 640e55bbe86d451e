"""Several co-registered sequences of a scan as input channels (`data.sequences`): read beside
each annotated scan in the order given, each on the annotated scan's grid (one that is not is
reported and its scan left out, not resampled), trained on with as many model input channels
(other counts refused before any step), and found again by `medrpn predict`."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medrpn.data.annotations import read_annotations
from medrpn.data.synth_volumes import write_synthetic_volumes
from medrpn.data.volume_files import read_volume
from medrpn.data.volume_loading import read_channels
from medrpn.data.volume_patches import scale_to_unit
from medrpn.errors import DataError
from tests.trained_run import REPO, medrpn

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _save(array: np.ndarray, affine_lps: np.ndarray, path: Path) -> None:
    """A NIfTI holding `array` in its LPS voxel order: its own indices are medrpn's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), LPS_TO_RAS @ affine_lps), str(path))


@pytest.fixture(scope="module")
def patients(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sequences")
    write_synthetic_volumes(root / "synth", n_volumes=8, shape=(40, 40, 16), seed=9)
    records, classes = read_annotations(root / "synth" / "annotations.csv")
    rows = []
    for i, record in enumerate(records):
        volume = read_volume(record.image_path)
        folder = root / "patients" / f"p{i}"
        _save(volume.array, volume.affine, folder / "FLAIR.nii.gz")
        t1 = volume.array.max() - volume.array  # another contrast on the same grid
        if i == 7:  # this patient's T1 misses a slice: not on the FLAIR's grid
            t1 = t1[:, :, :-1]
        _save(t1, volume.affine, folder / "T1.nii.gz")
        for box, label in zip(record.boxes, record.labels):
            rows.append([f"patients/p{i}/FLAIR.nii.gz", *[f"{v:g}" for v in box], classes[label], f"P{i}"])
        if not len(record.boxes):
            rows.append([f"patients/p{i}/FLAIR.nii.gz", "", "", "", "", "", "", "", f"P{i}"])
    with open(root / "annotations.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "x1", "y1", "z1", "x2", "y2", "z2", "label", "patient_id"])
        writer.writerows(rows)
    config = root / "config.yaml"
    config.write_text(
        (REPO / "configs" / "synth_volumes.yaml").read_text()
        .replace("demo/volumes/annotations.csv", str(root / "annotations.csv"))
        .replace("window: [64, 64, 32]", "window: [40, 40, 16]")
        .replace("size: [48, 48, 16]", "size: [32, 32, 16]")
        .replace("num_workers: 2", "num_workers: 0")
        .replace("batch_size: 4", "batch_size: 2")
        .replace("in_channels: 1", "in_channels: 2")
        .replace("val_fraction: 0.15", "val_fraction: 0.3")
        .replace("test_fraction: 0.25", "test_fraction: 0.2")
        + "  sequences: [FLAIR.nii.gz, T1.nii.gz]\n"
    )
    return root


def test_sequences_are_read_as_channels_in_order(patients: Path):
    volume, channels = read_channels(patients / "patients" / "p0" / "FLAIR.nii.gz", ["T1.nii.gz", "FLAIR.nii.gz"])
    assert channels.shape == (2, 40, 40, 16)
    np.testing.assert_allclose(channels[1], scale_to_unit(volume.array))
    np.testing.assert_allclose(channels[0], scale_to_unit(volume.array.max() - volume.array), atol=1e-6)
    with pytest.raises(DataError, match="not on the grid of FLAIR.nii.gz"):
        read_channels(patients / "patients" / "p7" / "FLAIR.nii.gz", ["FLAIR.nii.gz", "T1.nii.gz"])


def test_fit_and_predict_on_two_sequences(patients: Path, tmp_path: Path):
    result = medrpn(
        "fit", "--config", str(patients / "config.yaml"), "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
        "--trainer.check_val_every_n_epoch", "1", "--model.bootstrap_samples", "20", cwd=patients,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    report = (patients / "demo" / "volume_runs" / "data_problems.csv").read_text()
    assert "p7/T1.nii.gz" in report and "not on the grid" in report  # that patient left out, reported
    ckpt = patients / "demo" / "volume_checkpoints" / "best.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert saved["datamodule_hyper_parameters"]["sequences"] == ["FLAIR.nii.gz", "T1.nii.gz"]
    assert saved["state_dict"]["model.backbone.body.conv1.weight"].shape[1] == 2

    out = tmp_path / "findings"
    predicted = medrpn("predict", "--ckpt", str(ckpt), "--input", str(patients / "patients"), "--output", str(out),
                       "--score-threshold", "0", cwd=patients)
    text = predicted.stdout + predicted.stderr
    assert predicted.returncode == 0, text[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [f"p{i}" for i in range(7)]  # p7's T1 is off-grid: skipped
    assert "p7: skipped: " in text and "not on the grid" in text


def test_a_model_with_other_input_channels_is_refused_before_training(patients: Path):
    result = medrpn("fit", "--config", str(patients / "config.yaml"), "--model.volume.backbone.in_channels", "1",
                    "--trainer.max_epochs", "1", cwd=patients)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "the volumes have 2 channel(s) (data.sequences) but model.volume.backbone.in_channels is 1" in output
