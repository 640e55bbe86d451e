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
    """Flip, then a random scale/shift/rotation: the box must follow the bright square every time.
    The square lies 10 px inside the image and the shift is at most 5%, so no draw may push it out.
    Albumentations 2 ignores numpy's seed: its own (`set_random_seed`) makes the draws repeatable."""
    transform = build_transform(96, AugmentConfig(horizontal_flip=1.0, affine=1.0, intensity=0.0))
    image = np.zeros((96, 96), dtype=np.float32)
    image[10:30, 60:80] = 1.0
    boxes = []
    for seed in range(8):
        transform.set_random_seed(seed)
        out = transform(image=image, bboxes=np.array([[60.0, 10.0, 80.0, 30.0]]), labels=[0])
        assert len(out["bboxes"]) == 1, f"seed {seed}: the box was dropped"
        x1, y1, x2, y2 = (int(round(v)) for v in out["bboxes"][0])
        inside = out["image"][max(y1, 0) : y2, max(x1, 0) : x2]
        assert inside.mean() > 0.6, f"seed {seed}: the box no longer frames the bright square"
        assert x2 < 48  # flipped to the left half with its square
        boxes.append(out["bboxes"][0])
    assert len({tuple(np.round(b, 3)) for b in boxes}) == 8  # every seed drew another transform
    transform.set_random_seed(3)
    again = transform(image=image, bboxes=np.array([[60.0, 10.0, 80.0, 30.0]]), labels=[0])
    np.testing.assert_allclose(again["bboxes"][0], boxes[3])  # the seed decides the draw


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


def test_a_programming_error_in_making_a_sample_propagates(tmp_path):
    """Only a file that cannot be read is skipped: a bug (here a transform raising TypeError) must
    stop the epoch, not silently shrink the training, validation and test sets."""
    import albumentations as A

    def broken(image, **params):
        raise TypeError("a bug in a transform")

    image = tmp_path / "good.png"
    PILImage.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(image)
    transform = A.Compose([A.Lambda(image=broken)], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]))
    dataset = DetectionDataset([Record(image, np.array([[2.0, 2.0, 10.0, 10.0]]), np.array([0]))], transform, image_size=32)
    with pytest.raises(TypeError, match="a bug in a transform"):
        dataset[0]


# ---------------------------------------------------------------------------------------------
# Patient groups, stratification, k folds

import csv  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

from medrpn.data.splits import SplitConfig, group_keys, kfold_by_patient  # noqa: E402
from medrpn.data.synth import write_synthetic_dataset  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, n_images=16, image_size=64, seed=3)
    return root


def _groups_per_split(splits, keys):
    return {name: {keys[r.key] for r in part} for name, part in splits.items()}


def test_group_keys_fall_back_from_patient_id_to_dicom_header_to_file_number_blocks(synth, tmp_path):
    from medrpn.data.annotations import read_annotations

    records, _ = read_annotations(synth / "annotations.csv")
    assert group_keys(records[:2]) == [f"patient:{r.patient_id}" for r in records[:2]]
    for r in records:
        r.patient_id = None  # as if the CSV named no patients: the DICOM header does
    keys = group_keys(records)
    assert all(k.startswith("PatientID:") for k in keys)
    assert len(set(keys)) == len({r.image_path.name.split("_")[0] for r in records})
    jpgs = [Record(Path(f"/data/{c}/{n}.jpg"), np.zeros((0, 4)), np.zeros(0)) for c in (0, 1) for n in (8, 9, 10, 11, 25)]
    keys = group_keys(jpgs, group_blocks=10)
    assert keys[0] == keys[1] != keys[2] == keys[3] != keys[4]  # 8, 9 | 10, 11 | 25 within folder 0
    assert not set(keys[:5]) & set(keys[5:])  # folders never share a block
    assert group_keys(jpgs[:1]) == ["image:/data/0/8.jpg"]  # no rule: the image alone


def _labelled(n_patients: int, rare_every: int) -> list[Record]:
    """Patients of 2 images; every `rare_every`-th patient has the rare class 1, others class 0 or nothing."""
    records = []
    for p in range(n_patients):
        label = 1 if p % rare_every == 0 else (0 if p % 3 else None)
        for k in range(2):
            boxes = np.zeros((0, 4)) if label is None else np.array([[1, 1, 5, 5]])
            labels = np.zeros(0) if label is None else np.array([label])
            records.append(Record(f"p{p}_{k}.png", boxes, labels, patient_id=f"P{p}"))
    return records


def test_stratified_split_spreads_a_rare_class_and_keeps_patients_whole():
    records = _labelled(200, 10)  # 20 patients (40 images) with the rare class
    splits = split_by_patient(records, val_fraction=0.15, test_fraction=0.15, seed=1)
    keys = {r.key: r.patient_id for r in records}
    patients = _groups_per_split(splits, keys)
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert not (patients["val"] & patients["test"])
    rare = {name: sum(1 for r in part if 1 in r.labels) for name, part in splits.items()}
    assert rare["val"] == 6 and rare["test"] == 6 and rare["train"] == 28  # 15% / 15% / 70% of 40
    for name, fraction in (("val", 0.15), ("test", 0.15)):
        assert abs(len(splits[name]) - fraction * len(records)) <= 4


def test_kfold_covers_everything_once_by_patient():
    records = _labelled(100, 5)
    folds = kfold_by_patient(records, 5, seed=2)
    assert sorted(r.key for fold in folds for r in fold) == sorted(r.key for r in records)
    owners = Counter(p for fold in folds for p in {r.patient_id for r in fold})
    assert set(owners.values()) == {1}  # every patient in exactly one fold
    assert [sum(1 for r in fold if 1 in r.labels) for fold in folds] == [8] * 5  # 40 rare images / 5
    assert all(abs(len(fold) - 40) <= 2 for fold in folds)


# ---------------------------------------------------------------------------------------------
# The image cache

from medrpn.data.cache import CacheConfig, ImageCache, prepare  # noqa: E402
from medrpn.data.datamodule import LesionDataModule  # noqa: E402
from medrpn.data.io import ReadConfig, read_image  # noqa: E402
from medrpn.errors import DataError  # noqa: E402


def _synth_records(root: Path) -> list[Record]:
    from medrpn.data.annotations import read_annotations

    return read_annotations(root / "annotations.csv")[0]


@pytest.mark.parametrize("mode", ["memory", "disk", "none"])
def test_cache_serves_the_image_the_file_gives(synth, tmp_path, mode):
    records = _synth_records(synth)[:4]
    cache = ImageCache(CacheConfig(mode=mode, dir=str(tmp_path / "cache")), ReadConfig(), 48)
    cache.fill(records, num_workers=0)
    for record in records:
        direct = prepare(record, ReadConfig(), 48)
        served = cache.get(record)
        assert served.array.shape == (48, 48) and served.original_size == (64, 64)
        np.testing.assert_allclose(served.array, direct.array, atol=1 / 65535)
        assert served.spacing == read_image(record.image_path).spacing == (0.5, 0.5)
        assert cache.sizes[record.key] == (64, 64)


def test_cached_images_are_not_decoded_again(synth, tmp_path):
    """Once cached, the files may even be damaged: the cache (keyed by size and mtime) serves the pixels."""
    copy = tmp_path / "data"
    shutil.copytree(synth, copy)
    records = _synth_records(copy)[:3]
    memory = ImageCache(CacheConfig(mode="memory"), ReadConfig(), 32)
    disk = ImageCache(CacheConfig(mode="disk", dir=str(tmp_path / "cache")), ReadConfig(), 32)
    memory.fill(records, num_workers=2)
    disk.fill(records, num_workers=0)
    before = [memory.get(r).array for r in records]
    for record in records:  # same size, same modification time, pixels gone
        stat = record.image_path.stat()
        record.image_path.write_bytes(b"\0" * stat.st_size)
        os.utime(record.image_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    fresh = ImageCache(CacheConfig(mode="disk", dir=str(tmp_path / "cache")), ReadConfig(), 32)  # a later run
    for record, expected in zip(records, before):
        assert np.array_equal(memory.get(record).array, expected)
        assert np.array_equal(fresh.get(record).array, expected)
    with pytest.raises(DataError):  # the files really are unreadable now
        read_image(records[0].image_path)
    other = ImageCache(CacheConfig(mode="disk", dir=str(tmp_path / "cache")), ReadConfig(channels=3), 32)
    with pytest.raises(DataError):  # other settings: another key, so the damaged file is read
        other.get(records[0])


# ---------------------------------------------------------------------------------------------
# The data module: bad input under the skip and fail policies

from medrpn.data.datamodule import REPORT_NAME  # noqa: E402


def _broken_dataset(synth: Path, tmp_path: Path) -> Path:
    """The synthetic set plus: a truncated DICOM, a missing file, a box outside its image, a bad row."""
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    images = sorted((root / "images").glob("*.dcm"))
    images[0].write_bytes(images[0].read_bytes()[:400])
    text = (root / "annotations.csv").read_text()
    text += "images/absent.dcm,1,1,5,5,nodule,PX1\n"
    text += f"images/{images[1].name},30,30,90,40,nodule,\n"  # the images are 64 x 64
    text += "images/bad_row.dcm,1,1,5,5,nodule,PX2,extra\n"
    (root / "annotations.csv").write_text(text)
    return root


def test_skip_policy_leaves_bad_images_out_with_a_written_report(synth, tmp_path, monkeypatch):
    root = _broken_dataset(synth, tmp_path)
    monkeypatch.chdir(tmp_path)
    dm = LesionDataModule(str(root / "annotations.csv"), image_size=64, num_workers=0, batch_size=4, on_error="skip")
    dm.setup("fit")
    kept = {r.image_path.name for part in dm.splits.values() for r in part}
    images = sorted((root / "images").glob("*.dcm"))
    assert images[0].name not in kept and images[1].name not in kept and "absent.dcm" not in kept
    assert len(kept) == 16 - 2
    report = (tmp_path / REPORT_NAME).read_text()
    assert {line.split(",")[0] for line in report.splitlines()[1:]} == {
        "bad_row", "outside", "missing_image", "unreadable_image"
    }
    assert str(images[0]) in report and "absent.dcm" in report and "lies outside its 64x64" in report
    batches = list(dm.train_dataloader()) + list(dm.val_dataloader()) + list(dm.test_dataloader())
    assert sum(len(b["images"]) for b in batches) == 14


@pytest.mark.parametrize("cache", ["memory", "none"])
def test_decompression_bombs_are_left_out_and_reported_before_training(synth, tmp_path, monkeypatch, cache):
    from bombs import deflated_dicom, rle_bomb

    root = tmp_path / "data"
    shutil.copytree(synth, root)
    images = sorted((root / "images").glob("*.dcm"))
    rle_bomb(images[0])  # declares 65535 x 65535 x 16 bits
    deflated_dicom(images[1], 2048, 2048)  # inflates to 8 MiB
    monkeypatch.chdir(tmp_path)
    dm = LesionDataModule(
        str(root / "annotations.csv"), image_size=64, num_workers=0, batch_size=4,
        read={"max_decoded_bytes": 2**20}, cache={"mode": cache},
    )
    dm.setup("fit")
    kept = {r.image_path.name for part in dm.splits.values() for r in part}
    assert len(kept) == 14 and images[0].name not in kept and images[1].name not in kept
    rows = {row[1]: row for row in csv.reader((tmp_path / REPORT_NAME).read_text().splitlines()[1:])}
    kind, _, _, left_out, reason = rows[str(images[0])]
    assert kind == "unreadable_image" and left_out and "= 8.0 GiB decoded, over the limit of 1.0 MiB" in reason
    kind, _, _, left_out, reason = rows[str(images[1])]
    assert kind == "unreadable_image" and left_out and "inflates to more than 1.0 MiB" in reason
    batches = list(dm.train_dataloader()) + list(dm.val_dataloader()) + list(dm.test_dataloader())
    assert sum(len(b["images"]) for b in batches) == 14


def test_fail_policy_stops_before_the_first_step_naming_file_and_row(synth, tmp_path):
    root = _broken_dataset(synth, tmp_path)
    with pytest.raises(DataError, match="expected 7 fields as in the header, got 8") as err:
        LesionDataModule(str(root / "annotations.csv"), num_workers=0, on_error="fail")
    lines = (root / "annotations.csv").read_text().splitlines()
    assert err.value.row == len(lines) and err.value.path == str(root / "annotations.csv")  # the last line
    (root / "annotations.csv").write_text("\n".join(lines[:-1]) + "\n")  # without the bad row
    dm = LesionDataModule(str(root / "annotations.csv"), image_size=64, num_workers=0, on_error="fail")
    with pytest.raises(DataError) as err:
        dm.setup("fit")
    assert err.value.path in {str(sorted((root / "images").glob("*.dcm"))[0]), str(root / "images" / "absent.dcm")}


def test_fail_policy_names_the_row_of_a_box_outside_its_image(synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    name = sorted((root / "images").glob("*.dcm"))[2].name
    with open(root / "annotations.csv", "a") as f:
        f.write(f"images/{name},10,10,20,70,nodule,\n")
    line = len((root / "annotations.csv").read_text().splitlines())
    dm = LesionDataModule(str(root / "annotations.csv"), image_size=64, num_workers=0, on_error="fail")
    with pytest.raises(DataError, match="box \\[10, 10, 20, 70\\] lies outside its 64x64") as err:
        dm.setup("fit")
    assert (err.value.path, err.value.row) == (str(root / "annotations.csv"), line)


def test_a_file_that_breaks_after_the_check_never_ends_an_epoch(synth, tmp_path, caplog):
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    dm = LesionDataModule(
        str(root / "annotations.csv"), image_size=64, num_workers=0, batch_size=16, cache=CacheConfig(mode="none"),
        val_fraction=0.0, test_fraction=0.0,
    )
    dm.setup("fit")
    victim = dm.splits["train"][0].image_path
    victim.unlink()
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dm.train_dataloader()))
    assert len(batch["images"]) == 15 and f"Skipping unreadable image {victim}: file not found" in caplog.text


def test_hyperparameters_are_plain_and_load_without_code(synth, tmp_path):
    dm = LesionDataModule(
        str(synth / "annotations.csv"), num_workers=0, read={"window": {"mode": "percentile"}}, split={"num_folds": 3, "fold": 1}
    )
    path = tmp_path / "h.pt"
    torch.save({"datamodule_hyper_parameters": dict(dm.hparams)}, path)
    loaded = torch.load(path, weights_only=True)["datamodule_hyper_parameters"]
    assert loaded["read"]["window"]["mode"] == "percentile" and loaded["split"]["num_folds"] == 3
    assert ReadConfig.parse(loaded["read"]) == dm.read
    # fold 1 of 3 validates; the held-out test split is the same for every fold
    other = LesionDataModule(str(synth / "annotations.csv"), num_workers=0, split={"num_folds": 3, "fold": 2})
    assert [r.key for r in other.splits["test"]] == [r.key for r in dm.splits["test"]]
    assert not {r.key for r in other.splits["val"]} & {r.key for r in dm.splits["val"]}


def test_an_ordered_split_tests_the_highest_file_numbers_of_each_folder():
    """split.ordered: blocks of neighbouring numbers stay whole, and each class folder is cut in
    number order, so the test split holds the latest patients of every class."""
    records = [
        Record(f"{folder}/{n}.jpg", np.array([[1.0, 1, 5, 5]]), np.array([label]))
        for folder, label in (("a", 0), ("b", 1))
        for n in (3, 12, 0, 19, 7, 15, 10, 1, 18, 5, 2, 16, 11, 4, 17, 9, 6, 14, 8, 13)  # shuffled on purpose
    ]
    groups = group_keys(records, group_blocks=5, read_dicom=False)
    splits = split_by_patient(records, val_fraction=0.25, test_fraction=0.25, groups=groups, ordered=True)
    for folder in ("a", "b"):
        numbers = {name: sorted(int(Path(r.image_path).stem) for r in part if Path(r.image_path).parent.name == folder) for name, part in splits.items()}
        assert numbers == {"train": list(range(10)), "val": list(range(10, 15)), "test": list(range(15, 20))}
    again = split_by_patient(list(reversed(records)), 0.25, 0.25, seed=7, groups=list(reversed(groups)), ordered=True)
    assert {k: {r.key for r in v} for k, v in again.items()} == {k: {r.key for r in v} for k, v in splits.items()}  # no seed, no input order
    with pytest.raises(ConfigError, match="ordered"):
        SplitConfig(ordered=True, num_folds=5)
