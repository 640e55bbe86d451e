"""The demo dataset: real DICOM files, COCO and CSV that agree, determinism, photometric handling."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.uid import ExplicitVRLittleEndian

from medrpn.errors import ConfigError
from medrpn.data.synth import CLASS_NAMES, DX_FOR_PRESENTATION, write_synthetic_dataset

SIZE, SPACING, N = 128, 0.8, 30


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth")
    return out, write_synthetic_dataset(out, n_images=N, image_size=SIZE, pixel_spacing_mm=SPACING, seed=3)


def _coco_boxes(root: Path) -> dict[str, list[tuple]]:
    """file_name -> sorted (x1, y1, x2, y2, class name) from annotations.json (every image present)."""
    coco = json.loads((root / "annotations.json").read_text())
    names = {c["id"]: c["name"] for c in coco["categories"]}
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    boxes: dict[str, list[tuple]] = {name: [] for name in files.values()}
    for a in coco["annotations"]:
        x, y, w, h = a["bbox"]
        boxes[files[a["image_id"]]].append((x, y, x + w, y + h, names[a["category_id"]]))
    return {k: sorted(v) for k, v in boxes.items()}


def _csv_boxes(root: Path) -> dict[str, list[tuple]]:
    """image -> sorted (x1, y1, x2, y2, label) from annotations.csv (an empty row gives no box)."""
    boxes: dict[str, list[tuple]] = defaultdict(list)
    with (root / "annotations.csv").open(newline="") as fh:
        for row in csv.DictReader(fh):
            boxes[row["image"]]  # an image without lesions still appears
            if row["label"]:
                coords = tuple(int(row[k]) for k in ("x1", "y1", "x2", "y2"))
                boxes[row["image"]].append((*coords, row["label"]))
    return {k: sorted(v) for k, v in boxes.items()}


def _display(ds: pydicom.Dataset) -> np.ndarray:
    """Pixels as a viewer shows them: modality LUT, VOI window, MONOCHROME1 inverted (bright = dense)."""
    shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    return -shown if ds.PhotometricInterpretation == "MONOCHROME1" else shown


def _core_minus_ring(image: np.ndarray, box: tuple, others: list[tuple]) -> float:
    """Mean of the box's central half minus the mean of a 3-pixel ring just outside the box
    (pixels of other boxes left out of the ring)."""
    x1, y1, x2, y2 = box[:4]
    w, h = x2 - x1, y2 - y1
    core = image[y1 + h // 4 : y2 - h // 4, x1 + w // 4 : x2 - w // 4]
    ring = np.zeros(image.shape, bool)
    ring[max(y1 - 3, 0) : y2 + 3, max(x1 - 3, 0) : x2 + 3] = True
    for ox1, oy1, ox2, oy2, *_ in [box, *others]:
        ring[oy1:oy2, ox1:ox2] = False
    return float(core.mean() - image[ring].mean())


def test_images_are_valid_dx_dicom(dataset):
    root, summary = dataset
    files = sorted((root / "images").glob("*.dcm"))
    assert len(files) == summary["images"] == N
    photometric, rescale, studies, sops = set(), set(), defaultdict(set), set()
    for path in files:
        ds = pydicom.dcmread(path)  # no force: a Part 10 file with preamble and file meta
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == DX_FOR_PRESENTATION
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "DX"
        pid = path.stem.split("_")[0]
        assert ds.PatientID == pid and str(ds.PatientName) == f"SYNTH^{pid}"
        assert (ds.Rows, ds.Columns) == (SIZE, SIZE)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.SamplesPerPixel == 1
        assert [float(v) for v in ds.PixelSpacing] == [SPACING, SPACING]
        assert [float(v) for v in ds.ImagerPixelSpacing] == [SPACING, SPACING]
        assert "WindowCenter" in ds and float(ds.WindowWidth) > 0
        pixels = ds.pixel_array
        assert pixels.shape == (SIZE, SIZE) and int(pixels.max()) <= 4095
        assert pixels.std() > 0
        photometric.add(ds.PhotometricInterpretation)
        rescale.add((float(ds.RescaleSlope), float(ds.RescaleIntercept)))
        studies[pid].add(ds.StudyInstanceUID)
        sops.add(ds.SOPInstanceUID)
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
    assert len(rescale) > 1
    assert all(len(uids) == 1 for uids in studies.values())  # one study per patient ...
    assert len({next(iter(u)) for u in studies.values()}) == len(studies)  # ... and not shared
    assert len(sops) == N
    assert summary["patients"] == len(studies)
    per_patient = defaultdict(int)
    for path in files:
        per_patient[path.stem.split("_")[0]] += 1
    assert set(per_patient.values()) <= {1, 2, 3}


def test_coco_and_csv_describe_the_same_boxes(dataset):
    root, summary = dataset
    coco, table = _coco_boxes(root), _csv_boxes(root)
    assert coco == table
    assert len(coco) == N and all((root / name).is_file() for name in coco)
    data = json.loads((root / "annotations.json").read_text())
    assert [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])] == list(CLASS_NAMES)
    assert all(a["iscrowd"] == 0 and a["area"] == a["bbox"][2] * a["bbox"][3] for a in data["annotations"])
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    with (root / "annotations.csv").open(newline="") as fh:
        pids = {row["image"]: row["patient_id"] for row in csv.DictReader(fh)}
    assert all(pids[im["file_name"]] == im["patient_id"] for im in data["images"])
    labels = [b[4] for boxes in coco.values() for b in boxes]
    assert summary["lesions"] == {name: labels.count(name) for name in CLASS_NAMES}
    assert summary["images_without_lesions"] == sum(not boxes for boxes in coco.values())


def test_boxes_inside_images_both_classes_and_empty_images(dataset):
    root, _ = dataset
    boxes = _coco_boxes(root)
    all_boxes = [b for bs in boxes.values() for b in bs]
    for x1, y1, x2, y2, _ in all_boxes:
        assert 0 <= x1 < x2 <= SIZE and 0 <= y1 < y2 <= SIZE
    assert {b[4] for b in all_boxes} == set(CLASS_NAMES)
    empty = sum(not bs for bs in boxes.values())
    assert 0 < empty < N / 2
    assert max(len(bs) for bs in boxes.values()) <= 4


def test_same_seed_gives_identical_files_other_seed_differs(tmp_path):
    def write(name: str, seed: int) -> dict[str, bytes]:
        write_synthetic_dataset(tmp_path / name, n_images=5, image_size=64, seed=seed)
        return {str(p.relative_to(tmp_path / name)): p.read_bytes() for p in (tmp_path / name).rglob("*.*")}

    first, again, other = write("a", 7), write("b", 7), write("c", 8)
    assert first == again
    dcm = "images/P0001_1.dcm"
    assert first[dcm] != other[dcm]
    ds_first = pydicom.dcmread(tmp_path / "a" / dcm)
    ds_other = pydicom.dcmread(tmp_path / "c" / dcm)
    assert ds_first.SOPInstanceUID != ds_other.SOPInstanceUID
    assert ds_first.StudyInstanceUID != ds_other.StudyInstanceUID
    assert not np.array_equal(ds_first.pixel_array, ds_other.pixel_array)


def test_window_covers_the_useful_range(dataset):
    root, _ = dataset
    for path in sorted((root / "images").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        shown = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
        lo, hi = shown.min(), shown.max()
        assert hi > lo, path.name
        # A window off the data (e.g. a MONOCHROME1 window not mirrored with the values) clips a lot.
        assert (shown == lo).mean() < 0.02 and (shown == hi).mean() < 0.02, path.name


def test_lesions_are_bright_after_modality_voi_and_monochrome1_inversion(dataset):
    root, _ = dataset
    shown: dict[str, list[float]] = defaultdict(list)
    stored_m1: list[float] = []
    for name, boxes in _coco_boxes(root).items():
        ds = pydicom.dcmread(root / name)
        image = _display(ds)
        for i, box in enumerate(boxes):
            others = boxes[:i] + boxes[i + 1 :]
            shown[ds.PhotometricInterpretation].append(_core_minus_ring(image, box, others))
            if ds.PhotometricInterpretation == "MONOCHROME1":
                stored_m1.append(_core_minus_ring(ds.pixel_array.astype(np.float64), box, others))
    for photometric, diffs in shown.items():
        assert len(diffs) >= 5, photometric
        assert np.mean(np.array(diffs) > 0) >= 0.8, (photometric, diffs)
    # MONOCHROME1 stores lesions dark: only the inversion makes them bright.
    assert np.mean(np.array(stored_m1) < 0) >= 0.8


@pytest.mark.parametrize(
    "kwargs", [{"n_images": 0}, {"image_size": 32}, {"pixel_spacing_mm": 0.0}, {"pixel_spacing_mm": -1.0}]
)
def test_bad_arguments_raise_config_error(tmp_path, kwargs):
    with pytest.raises(ConfigError):
        write_synthetic_dataset(tmp_path, **kwargs)
