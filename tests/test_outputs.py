"""Findings JSON and overlay PNG: millimetres, ordering, schema 2.0, de-identification, drawing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image as PILImage

from medrpn.outputs import (
    FINDINGS_SCHEMA_VERSION,
    Finding,
    ImageFindings,
    ModelInfo,
    make_findings,
    write_findings_json,
    write_overlay_png,
)
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
    findings[0].tracking_id, findings[0].tracking_uid = "mass 1", "2.25.1"
    # Image identifiers next to patient identifiers, as a DICOM header has them: only the UIDs
    # and Modality may reach the file.
    uids = {
        "SOPInstanceUID": "1.2.3.4.5",
        "SeriesInstanceUID": "1.2.3.4",
        "StudyInstanceUID": "1.2.3",
        "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
        "Modality": "DX",
        "PatientID": "SECRET-ID-123",
        "PatientName": "Doe^Jane",
        "PatientBirthDate": "19700101",
    }
    image = ImageFindings(
        source="scans/img.dcm", height=512, width=256, spacing=(0.5, 0.2), findings=findings, uids=uids,
        overlay="img.png",
    )
    model = ModelInfo(
        checkpoint=str(tmp_path / "best.ckpt"),
        checkpoint_sha256="ab" * 32,
        class_names=CLASSES,
        score_threshold=np.float32(0.25),
        threshold_source="checkpoint operating point",
        operating_point={"score_threshold": 0.25, "fp_per_image": 1.0, "sensitivity": 0.8},
        version="0.1.0",
    )
    out = write_findings_json(
        tmp_path / "sub" / "findings.json",
        images=[image],
        model=model,
        study_instance_uid="1.2.3",
        sr="sr.dcm",
        gsps=["gsps.dcm"],
        skipped=[("scans/bad.dcm", "truncated")],
    )
    text = out.read_text()
    for secret in ("SECRET-ID-123", "Doe^Jane", "PatientID", "PatientName", "19700101"):
        assert secret not in text
    with open(out) as f:
        doc = json.load(f)
    assert doc["schema_version"] == FINDINGS_SCHEMA_VERSION == "2.2"
    assert doc["study_instance_uid"] == "1.2.3"
    assert doc["dicom"] == {"sr": "sr.dcm", "gsps": ["gsps.dcm"], "notes": []}
    assert doc["skipped"] == [{"source": "scans/bad.dcm", "reason": "truncated"}]
    assert doc["model"] == {
        "name": "medrpn",
        "version": "0.1.0",
        "checkpoint": str(tmp_path / "best.ckpt"),
        "checkpoint_sha256": "ab" * 32,
        "class_names": CLASSES,
        "score_threshold": pytest.approx(0.25),
        "threshold_source": "checkpoint operating point",
        "operating_point": {"score_threshold": 0.25, "fp_per_image": 1.0, "sensitivity": 0.8},
        "proposal_settings": None,
    }
    (entry,) = doc["images"]
    assert entry["source"] == "scans/img.dcm" and entry["frame"] is None and entry["overlay"] == "img.png"
    assert entry["height"] == 512 and entry["width"] == 256
    assert entry["pixel_spacing_mm"] == [0.5, 0.2]
    refs = (entry["study_instance_uid"], entry["series_instance_uid"], entry["sop_instance_uid"])
    assert refs == ("1.2.3", "1.2.3.4", "1.2.3.4.5")
    assert entry["sop_class_uid"] == "1.2.840.10008.5.1.4.1.1.2" and entry["modality"] == "DX"
    assert [d["score"] for d in entry["findings"]] == [0.93, 0.31]
    first = entry["findings"][0]
    assert first["label"] == "mass"
    assert first["box_px"] == [5.0, 5.0, 15.0, 25.0]
    assert first["box_mm"] == pytest.approx([1.0, 2.5, 3.0, 12.5])
    assert first["size_mm"] == pytest.approx([2.0, 10.0])
    assert (first["tracking_id"], first["tracking_uid"]) == ("mass 1", "2.25.1")
    assert entry["findings"][1]["tracking_uid"] is None
    # Nothing but the file itself is left in the folder (the temporary file was renamed away).
    assert [p.name for p in out.parent.iterdir()] == ["findings.json"]


def test_findings_json_for_images_without_dicom(tmp_path):
    image = ImageFindings(source="a.png", height=80, width=100, spacing=None, findings=[], overlay="a.png")
    model = ModelInfo(checkpoint="m.ckpt", checkpoint_sha256="0" * 64, class_names=CLASSES, score_threshold=0.5)
    doc = json.loads(write_findings_json(tmp_path / "f.json", images=[image], model=model).read_text())
    model.operating_point = {"score_threshold": 0.4, "fp_per_image": 0.0, "sensitivity": float("nan")}
    written = json.loads(write_findings_json(tmp_path / "g.json", images=[image], model=model).read_text())
    assert written["model"]["operating_point"]["sensitivity"] is None  # no lesions to measure it on
    assert doc["study_instance_uid"] is None and doc["dicom"]["sr"] is None
    entry = doc["images"][0]
    assert entry["pixel_spacing_mm"] is None and entry["sop_instance_uid"] is None and entry["findings"] == []
    assert doc["model"]["threshold_source"] == "default" and doc["model"]["operating_point"] is None


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
    with pytest.raises(ValueError, match="greyscale"):
        write_overlay_png(tmp_path / "x.png", np.zeros((4, 4, 2)), [])
    with pytest.raises(ValueError, match="class names"):
        write_overlay_png(tmp_path / "x.png", np.zeros((8, 8)), [Finding("cyst", 0.5, [1, 1, 4, 4])], CLASSES)


def test_overlay_takes_uint8_and_colour_images(tmp_path):
    grey = np.full((40, 50), 128, dtype=np.uint8)
    finding = [Finding("nodule", 0.9, [10.0, 10.0, 30.0, 30.0])]
    rgb = np.asarray(PILImage.open(write_overlay_png(tmp_path / "g.png", grey, finding, CLASSES)))
    assert tuple(rgb[36, 45]) == (128, 128, 128)  # uint8 values kept as they are, not rescaled
    assert tuple(rgb[28, 10 - 2]) == class_colour(0)
    colour = np.zeros((40, 50, 3), dtype=np.float32)
    colour[..., 2] = 1.0  # blue image stays blue
    rgb = np.asarray(PILImage.open(write_overlay_png(tmp_path / "c.png", colour, [], CLASSES)))
    assert tuple(rgb[5, 5]) == (0, 0, 255)
