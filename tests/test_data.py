"""Splits, transforms, the dataset's handling of bad files, and batching."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from medrpn.data.batch import collate_detection
from medrpn.data.dataset import DetectionDataset
from medrpn.data.records import Record
from medrpn.data.splits import split_by_patient
from medrpn.data.transforms import AugmentConfig, build_transform, fit_scale
from medrpn.errors import ConfigError


def _records(n_patients: int, per_patient: int) -> list[Record]:
    return [
        Record(f"p{p}_{k}.png", np.zeros((0, 4)), np.zeros(0), patient_id=f"P{p}")
        for p in range(n_patients)
        for k in range(per_patient)
    ]


def test_no_patient_is_in_two_splits_and_fractions_are_respected():
    records = _records(60, 3)
    splits = split_by_patient(records, val_fraction=0.2, test_fraction=0.1, seed=3)
    patients = {name: {r.patient_id for r in part} for name, part in splits.items()}
    assert not patients["train"] & patients["val"]
    assert not patients["train"] & patients["test"]
    assert not patients["val"] & patients["test"]
    assert sum(len(p) for p in splits.values()) == len(records)
    assert abs(len(splits["val"]) - 36) <= 3 and abs(len(splits["test"]) - 18) <= 3
    again = split_by_patient(records, val_fraction=0.2, test_fraction=0.1, seed=3)
    assert [r.image_path for r in again["val"]] == [r.image_path for r in splits["val"]]


def test_split_fractions_that_leave_nothing_to_train_are_refused():
    with pytest.raises(ConfigError, match="split fractions"):
        split_by_patient(_records(4, 1), val_fraction=0.6, test_fraction=0.4)


def test_resize_and_pad_scale_boxes_with_the_image():
    transform = build_transform(128)
    image = np.zeros((200, 100), dtype=np.float32)
    image[50:70, 20:40] = 1.0
    out = transform(image=image, bboxes=np.array([[20.0, 50.0, 40.0, 70.0]]), labels=[1])
    assert out["image"].shape == (128, 128)
    scale = fit_scale(200, 100, 128)
    np.testing.assert_allclose(out["bboxes"][0], np.array([20, 50, 40, 70]) * scale, atol=0.5)
    rows, cols = np.nonzero(out["image"] > 0.5)
    assert abs(rows.min() - 50 * scale) <= 1 and abs(cols.max() + 1 - 40 * scale) <= 1


def test_augmentation_keeps_boxes_on_their_lesion():
    transform = build_transform(96, AugmentConfig(horizontal_flip=1.0, affine=1.0, intensity=0.0))
    image = np.zeros((96, 96), dtype=np.float32)
    image[10:30, 60:80] = 1.0
    for seed in range(5):
        np.random.seed(seed)
        out = transform(image=image, bboxes=np.array([[60.0, 10.0, 80.0, 30.0]]), labels=[0])
        if len(out["bboxes"]) == 0:
            continue  # pushed out of the image by the random shift: allowed
        x1, y1, x2, y2 = (int(round(v)) for v in out["bboxes"][0])
        inside = out["image"][max(y1, 0) : y2, max(x1, 0) : x2]
        assert inside.mean() > 0.6  # the box still frames the bright square


def test_unreadable_file_is_reported_by_path_and_skipped(tmp_path, caplog):
    good = tmp_path / "good.png"
    PILImage.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    missing = tmp_path / "missing.dcm"
    records = [Record(p, np.array([[2.0, 2.0, 10.0, 10.0]]), np.array([0])) for p in (good, bad, missing)]
    dataset = DetectionDataset(records, build_transform(32), image_size=32)
    with caplog.at_level(logging.WARNING):
        samples = [dataset[i] for i in range(3)]
    assert samples[0] is not None and samples[1] is None and samples[2] is None
    assert str(bad) in caplog.text and str(missing) in caplog.text
    batch = collate_detection(samples)
    assert batch["images"].shape == (1, 1, 32, 32)
    assert batch["targets"][0]["labels"].dtype == torch.int64
    assert batch["meta"][0]["path"] == str(good)
    assert collate_detection([None, None])["images"].numel() == 0
