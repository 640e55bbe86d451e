"""Findings JSON and overlay PNG: millimetres, ordering, schema, de-identification, drawing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from medrpn.outputs import FINDINGS_SCHEMA_VERSION, Finding, make_findings, write_findings_json, write_overlay_png
from medrpn.outputs.overlay import class_colour

CLASSES = ["nodule", "mass"]


def test_make_findings_converts_to_mm_with_row_and_column_spacing():
    # Anisotropic spacing so that swapping rows and columns would show: rows 0.5 mm, columns 0.2 mm.
    findings = make_findings(np.array([[10.0, 20.0, 60.0, 40.0]]), np.array([0.8]), np.array([1]), CLASSES, (0.5, 0.2))
    (f,) = findings
    assert f.label == "mass"
    assert f.box_px == [10.0, 20.0, 60.0, 40.0]
    assert f.box_mm == pytest.approx([10 * 0.2, 20 * 0.5, 60 * 0.2, 40 * 0.5])
    assert f.size_mm == pytest.approx([50 * 0.2, 20 * 0.5])


def test_make_findings_without_spacing_has_no_mm():
    (f,) = make_findings(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([0.5]), np.array([0]), CLASSES, None)
    assert f.box_mm is None and f.size_mm is None


def test_make_findings_sorted_by_score_descending():
    boxes = np.array([[0, 0, 5, 5], [10, 10, 20, 20], [30, 30, 40, 40]], dtype=np.float32)
    scores = np.array([0.2, 0.9, 0.5], dtype=np.float32)
    findings = make_findings(boxes, scores, np.array([0, 1, 0]), CLASSES, (1.0, 1.0))
    assert [round(f.score, 3) for f in findings] == [0.9, 0.5, 0.2]
    assert [f.box_px[0] for f in findings] == [10.0, 30.0, 0.0]
    assert [f.label for f in findings] == ["mass", "nodule", "nodule"]


def test_make_findings_rejects_bad_input():
    with pytest.raises(ValueError, match="class names"):
        make_findings(np.array([[0, 0, 1, 1]]), np.array([0.5]), np.array([2]), CLASSES, None)
    with pytest.raises(ValueError, match="must match"):
        make_findings(np.array([[0, 0, 1, 1]]), np.array([0.5, 0.4]), np.array([0]), CLASSES, None)
    with pytest.raises(ValueError, match="spacing"):
        make_findings(np.array([[0, 0, 1, 1]]), np.array([0.5]), np.array([0]), CLASSES, (0.0, 1.0))


def test_make_findings_empty():
    assert make_findings(np.zeros((0, 4)), np.zeros(0), np.zeros(0, dtype=np.int64), CLASSES, (1.0, 1.0)) == []


def test_findings_json_round_trips_without_patient_identifiers(tmp_path):
    findings = make_findings(
        np.array([[10.0, 20.0, 60.0, 40.0], [5.0, 5.0, 15.0, 25.0]]),
        np.array([0.31, 0.93]),
        np.array([0, 1]),
        CLASSES,
        (0.5, 0.2),
    )
    meta = {
        "SOPInstanceUID": "1.2.3.4.5",
        "SeriesInstanceUID": "1.2.3.4",
        "StudyInstanceUID": "1.2.3",
        "Modality": "DX",
        "PatientID": "SECRET-ID-123",
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19700101",
    }
    model = {
        "name": "medrpn",
        "version": "0.1.0",
        "checkpoint": tmp_path / "best.ckpt",  # a Path and a numpy scalar: written without help
        "checkpoint_sha256": "ab" * 32,
        "score_threshold": np.float32(0.25),
    }
    out = write_findings_json(
        tmp_path / "sub" / "img.json",
        source="scans/img.dcm",
        image_size=(512, 256),
        spacing=(0.5, 0.2),
        findings=findings,
        image_meta=meta,
        model=model,
    )
    text = out.read_text()
    for secret in ("SECRET-ID-123", "Doe^Jane", "PatientID", "PatientName", "19700101"):
        assert secret not in text
    with open(out) as f:
        doc = json.load(f)
    assert doc["schema_version"] == FINDINGS_SCHEMA_VERSION
    assert doc["source"] == "scans/img.dcm"
    assert doc["image"]["height"] == 512 and doc["image"]["width"] == 256
    assert doc["image"]["pixel_spacing_mm"] == [0.5, 0.2]
    kept = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality")
    assert doc["image"]["meta"] == {k: meta[k] for k in kept}
    assert doc["model"]["checkpoint"] == str(tmp_path / "best.ckpt")
    assert doc["model"]["checkpoint_sha256"] == "ab" * 32
    assert doc["model"]["score_threshold"] == pytest.approx(0.25)
    assert [d["score"] for d in doc["findings"]] == [0.93, 0.31]
    first = doc["findings"][0]
    assert first["label"] == "mass"
    assert first["box_px"] == [5.0, 5.0, 15.0, 25.0]
    assert first["box_mm"] == pytest.approx([1.0, 2.5, 3.0, 12.5])
    assert first["size_mm"] == pytest.approx([2.0, 10.0])
    # Nothing but the file itself is left in the folder (the temporary file was renamed away).
    assert [p.name for p in out.parent.iterdir()] == ["img.json"]


def _gradient(height: int, width: int) -> np.ndarray:
    return np.tile(np.linspace(0.1, 0.9, width, dtype=np.float32), (height, 1))


def test_overlay_draws_boxes_in_class_colours_and_keeps_background_grey(tmp_path):
    height, width = 200, 300  # not square, so a swapped H/W would show
    findings = [Finding("nodule", 0.9, [50.0, 60.0, 100.0, 120.0]), Finding("mass", 0.7, [180.0, 100.0, 260.0, 180.0])]
    out = write_overlay_png(tmp_path / "o.png", _gradient(height, width), findings, CLASSES)
    png = PILImage.open(out)
    assert png.mode == "RGB" and png.size == (width, height)
    rgb = np.asarray(png)
    # Left edges at mid-height (away from the labels): the outline sits just outside the box.
    assert tuple(rgb[90, 49]) == class_colour(0)
    assert tuple(rgb[140, 179]) == class_colour(1)
    assert class_colour(0) != class_colour(1)
    # Inside a box and far from any box the image stays grey, with its gradient intact.
    for row, col in [(90, 75), (190, 10), (5, 150)]:
        r, g, b = rgb[row, col]
        assert r == g == b
    assert rgb[190, 10, 0] < rgb[190, 290, 0]


def test_overlay_box_on_image_border_does_not_crash(tmp_path):
    height, width = 64, 80
    findings = [
        Finding("nodule", 0.99, [0.0, 0.0, 80.0, 64.0]),  # the whole image
        Finding("mass", 0.5, [70.0, 50.0, 95.0, 90.0]),  # past the bottom-right corner
        Finding("mass", 0.4, [-10.0, -10.0, -2.0, -2.0]),  # entirely outside
    ]
    out = write_overlay_png(tmp_path / "edge.png", _gradient(height, width), findings)
    rgb = np.asarray(PILImage.open(out))
    assert rgb.shape == (height, width, 3)
    assert not (rgb[..., 0] == rgb[..., 1]).all()  # something was drawn


def test_overlay_rejects_non_2d_image_and_unknown_label(tmp_path):
    with pytest.raises(ValueError, match="2D"):
        write_overlay_png(tmp_path / "x.png", np.zeros((4, 4, 3)), [])
    with pytest.raises(ValueError, match="class names"):
        write_overlay_png(tmp_path / "x.png", np.zeros((8, 8)), [Finding("cyst", 0.5, [1, 1, 4, 4])], CLASSES)
