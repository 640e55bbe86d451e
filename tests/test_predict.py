"""`medrpn predict` end to end with a real (small, untrained) detector on real and synthetic DICOM.

The checkpoint is a real `LesionDetectionModule` saved the way Lightning saves one, so the code
path is the user's: load with weights_only, read in DataLoader workers, detect, write per study.
Real scans come from pydicom's test files and the pydicom-data package.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
from contextlib import redirect_stdout
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from PIL import Image as PILImage
from pydicom.data import get_testdata_file

from medrpn.data.io import read_image
from medrpn.errors import ConfigError, MedrpnError
from medrpn.outputs import Finding, ImageFindings, ModelInfo
from medrpn.outputs.gsps import build_presentation_states
from medrpn.outputs.references import reference_header
from medrpn.outputs.sr import write_dicom
from medrpn.predict import predict_files, resolve_threshold, scan_inputs
from medrpn.synth import write_synthetic_dataset
from medrpn.training import LesionDetectionModule

CLASSES = ["nodule", "spiculated"]
SECRETS = ("CompressedSamples", "1CT1", "4MR1", "9RG1", "SYNTH^", "19400305")


def save_checkpoint(path: Path, operating_point: dict | None = None, image_size: int = 128) -> Path:
    """A small real detector saved like Lightning saves one (untrained: its scores sit near 1/3)."""
    torch.manual_seed(0)
    module = LesionDetectionModule(
        class_names=CLASSES,
        backbone={"name": "resnet18", "fpn_channels": 16},
        rpn={"pre_nms_top_n_test": 100, "post_nms_top_n_test": 50},
        roi={"detections_per_img": 3},
    )
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "datamodule_hyper_parameters": {"image_size": image_size},
    }
    if operating_point is not None:
        checkpoint["operating_point"] = operating_point
    torch.save(checkpoint, path)
    return path


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(path)


def _run(*args, **kwargs):
    out = io.StringIO()
    with redirect_stdout(out):
        report = predict_files(*args, **kwargs)
    return report, out.getvalue()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("model") / "tiny.ckpt")


@pytest.fixture(scope="module")
def real_run(ckpt, tmp_path_factory):
    """A folder tree of real scans, non-image DICOM, a broken file, a PNG and a text file, predicted once."""
    root = tmp_path_factory.mktemp("real")
    inputs = root / "scans"
    for name, folder in [
        ("CT_small.dcm", "a"),
        ("reportsi.dcm", "a"),  # Basic Text SR
        ("rtstruct.dcm", "a"),  # RT Structure Set (written without a preamble)
        ("MR_small.dcm", "a/b"),
        ("MR_truncated.dcm", "a/b"),  # pixel data cut short, same study as MR_small
        ("RG1_UNCR.dcm", "c"),  # computed radiograph, MONOCHROME1, 1955 x 1841
    ]:
        (inputs / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(_testdata(name), inputs / folder / name)
    ct = inputs / "a" / "CT_small.dcm"
    header = reference_header(pydicom.dcmread(ct, stop_before_pixels=True))
    image = ImageFindings("CT_small.dcm", 128, 128, None, [Finding("nodule", 0.9, [1.0, 1.0, 9.0, 9.0])], uids={})
    model = ModelInfo("x", "0" * 64, CLASSES, 0.5)
    write_dicom(inputs / "a" / "old-gsps.dcm", build_presentation_states([(header, image)], model)[0][0])
    PILImage.new("L", (100, 80), color=90).save(inputs / "c" / "plain.png")
    (inputs / "c" / "notes.txt").write_text("not an image")
    report, log = _run(ckpt, inputs, root / "out", score_threshold=0.0, batch_size=4, num_workers=1)
    return inputs, root / "out", report, log


def test_folder_tree_is_grouped_by_study_with_notes_and_reasons(real_run):
    inputs, out, report, log = real_run
    studies = {
        str(pydicom.dcmread(inputs / p, stop_before_pixels=True).StudyInstanceUID)
        for p in ("a/CT_small.dcm", "a/b/MR_small.dcm", "c/RG1_UNCR.dcm")
    }
    assert {p.name for p in report.studies} == studies | {"c"}
    assert {p.name for p in out.iterdir()} == studies | {"c"}
    assert report.images == 4 and report.ignored == 1
    notes = {Path(p).name: note for p, note in report.notes}
    assert notes == {
        "reportsi.dcm": "not an image (Basic Text SR Storage), skipped",
        "rtstruct.dcm": "not an image (RT Structure Set Storage), skipped",
        "old-gsps.dcm": "not an image (Grayscale Softcopy Presentation State Storage), skipped",
    }
    ((path, reason),) = report.skipped
    assert Path(path).name == "MR_truncated.dcm" and "truncated" in reason
    assert f"skipped {path}: {reason}" in log
    assert "medrpn predict: 4 images in 4 output folders" in log
    mr_study = json.loads(next(p for p in out.glob("*/findings.json") if "MR_small" in p.read_text()).read_text())
    assert [s["source"] for s in mr_study["skipped"]] == ["a/b/MR_truncated.dcm"]
    assert [im["source"] for im in mr_study["images"]] == ["a/b/MR_small.dcm"]
    plain = json.loads((out / "c" / "findings.json").read_text())
    assert [im["source"] for im in plain["images"]] == ["c/plain.png"] and plain["dicom"]["sr"] is None


def test_sr_and_json_agree_with_the_source_files(real_run):
    inputs, out, report, _ = real_run
    checked = 0
    for path in out.glob("*/findings.json"):
        document = json.loads(path.read_text())
        if document["study_instance_uid"] is None:
            continue
        assert document["model"]["checkpoint_sha256"] and document["model"]["score_threshold"] == 0.0
        assert document["model"]["threshold_source"] == "command line"
        sr = hd.sr.srread(path.parent / document["dicom"]["sr"])
        groups = {str(g.tracking_uid): g for g in sr.content.get_planar_roi_measurement_groups()}
        for entry in document["images"]:
            source = pydicom.dcmread(inputs / entry["source"], stop_before_pixels=True)
            assert (entry["study_instance_uid"], entry["series_instance_uid"], entry["sop_instance_uid"]) == (
                source.StudyInstanceUID, source.SeriesInstanceUID, source.SOPInstanceUID,
            )
            assert (entry["height"], entry["width"]) == (source.Rows, source.Columns)
            assert entry["findings"], "an untrained model at threshold 0 always proposes something"
            for finding in entry["findings"]:
                x1, y1, x2, y2 = finding["box_px"]
                assert 0 <= x1 < x2 <= source.Columns and 0 <= y1 < y2 <= source.Rows
                if entry["pixel_spacing_mm"]:
                    row, col = entry["pixel_spacing_mm"]
                    assert finding["box_mm"] == pytest.approx([x1 * col, y1 * row, x2 * col, y2 * row], abs=0.02)
                group = groups.pop(finding["tracking_uid"])
                np.testing.assert_allclose(group.roi.value[[0, 2]], [[x1, y1], [x2, y2]], atol=1e-4)
                assert group.roi.ContentSequence[0].referenced_sop_instance_uid == source.SOPInstanceUID
                checked += 1
        assert not groups  # every finding of the SR is one of the JSON
    png_findings = json.loads((out / "c" / "findings.json").read_text())["images"][0]["findings"]
    assert checked == report.findings - len(png_findings)


def test_no_patient_identifiers_in_the_log_or_json(real_run):
    _, out, _, log = real_run
    texts = [log] + [p.read_text() for p in out.glob("*/findings.json")]
    for text in texts:
        for secret in SECRETS:
            assert secret not in text


def test_overlays_show_the_image_as_windowed_for_the_detector(real_run):
    inputs, out, _, _ = real_run
    document = json.loads(next(p for p in out.glob("*/findings.json") if "RG1_UNCR" in p.read_text()).read_text())
    (entry,) = document["images"]
    overlay = np.asarray(PILImage.open(out / document["study_instance_uid"] / entry["overlay"]))
    expected = np.rint(read_image(inputs / entry["source"]).array * 255)
    assert overlay.shape == (entry["height"], entry["width"], 3)
    # away from the boxes and their labels (a small part of the image) the overlay is the image
    same = np.abs(overlay.astype(int) - expected[..., None]).max(axis=2) <= 1
    assert same.mean() > 0.98
    # MONOCHROME1 stored values were inverted: the lungs (dark in a radiograph) are darker than the spine
    assert expected[900:1100, 400:600].mean() < expected[900:1100, 880:960].mean()


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
def test_dciodvfy_finds_no_errors_in_predicted_outputs(real_run):
    _, out, _, _ = real_run
    files = sorted(out.glob("*/*.dcm"))
    assert len(files) >= 6  # an SR and a GSPS for each of the three studies
    for path in files:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path}: {errors}"


def test_existing_outputs_are_kept_unless_overwrite(ckpt, tmp_path):
    write_synthetic_dataset(tmp_path / "syn", n_images=2, image_size=64, seed=3)
    images = tmp_path / "syn" / "images"
    first, _ = _run(ckpt, images, tmp_path / "out", score_threshold=0.0, num_workers=0)
    folder = first.studies[0]
    (folder / "findings.json").write_text("{}")  # a reader's edit, or another run's result
    again, log = _run(ckpt, images, tmp_path / "out", score_threshold=0.0, num_workers=0)
    assert again.images == 0 and again.studies == [] and sorted(again.kept) == sorted(first.studies)
    assert f"kept existing outputs in {folder}" in log and "--overwrite" in log
    assert (folder / "findings.json").read_text() == "{}"
    replaced, log = _run(ckpt, images, tmp_path / "out", score_threshold=0.0, num_workers=0, overwrite=True)
    assert sorted(replaced.studies) == sorted(first.studies) and f"replacing existing outputs in {folder}" in log
    assert json.loads((folder / "findings.json").read_text())["schema_version"] == "2.1"


def test_threshold_comes_from_the_operating_point_unless_given(tmp_path):
    point = {"score_threshold": 0.34, "fp_per_image": 1.0, "sensitivity": 0.8}
    assert resolve_threshold({"operating_point": point}, None) == (0.34, "checkpoint operating point", point)
    assert resolve_threshold({"operating_point": point}, 0.7) == (0.7, "command line", point)
    assert resolve_threshold({}, None) == (0.5, "default", None)
    with pytest.raises(ConfigError, match="within"):
        resolve_threshold({}, 1.5)

    ckpt = save_checkpoint(tmp_path / "op.ckpt", operating_point=point)
    write_synthetic_dataset(tmp_path / "syn", n_images=2, image_size=64, seed=4)
    report, log = _run(ckpt, tmp_path / "syn" / "images", tmp_path / "out", num_workers=0)
    assert (report.score_threshold, report.threshold_source) == (0.34, "checkpoint operating point")
    assert "score >= 0.34 (checkpoint operating point)" in log
    for path in report.studies:
        document = json.loads((path / "findings.json").read_text())
        assert document["model"]["operating_point"] == point
        assert all(f["score"] >= 0.34 for im in document["images"] for f in im["findings"])
        sr = pydicom.dcmread(path / "sr.dcm")
        assert "score threshold 0.34" in sr.to_json()


def test_reading_in_workers_gives_the_same_findings(ckpt, tmp_path):
    write_synthetic_dataset(tmp_path / "syn", n_images=5, image_size=64, seed=6)
    images = tmp_path / "syn" / "images"
    in_process, _ = _run(ckpt, images, tmp_path / "a", score_threshold=0.0, batch_size=2, num_workers=0)
    workers, _ = _run(ckpt, images, tmp_path / "b", score_threshold=0.0, batch_size=3, num_workers=1)
    assert in_process.images == workers.images == 5
    for folder in in_process.studies:
        a = json.loads((folder / "findings.json").read_text())
        b = json.loads((tmp_path / "b" / folder.name / "findings.json").read_text())
        assert a["images"] == b["images"]
        sr_a, sr_b = (pydicom.dcmread(f / "sr.dcm") for f in (folder, tmp_path / "b" / folder.name))
        assert sr_a.SOPInstanceUID == sr_b.SOPInstanceUID  # the same inputs and model give the same UIDs


def test_output_inside_the_input_is_not_read_back(ckpt, tmp_path):
    write_synthetic_dataset(tmp_path / "syn", n_images=1, image_size=64, seed=8)
    images = tmp_path / "syn" / "images"
    first, _ = _run(ckpt, images, images / "findings", score_threshold=0.0, num_workers=0)
    second, _ = _run(ckpt, images, images / "findings", score_threshold=0.0, num_workers=0)
    assert first.images == 1 and second.notes == [] and second.kept == first.studies
    with pytest.raises(MedrpnError, match="must not be the input folder"):
        predict_files(ckpt, images, images)


def test_single_file_and_scan_order(ckpt, tmp_path):
    write_synthetic_dataset(tmp_path / "syn", n_images=6, image_size=64, seed=9)
    images = tmp_path / "syn" / "images"
    scan = scan_inputs(images)
    assert len(scan.groups) < 6  # several images per patient study
    for group in scan.groups:
        sources = [pydicom.dcmread(i.path, stop_before_pixels=True) for i in group.items]
        assert {ds.StudyInstanceUID for ds in sources} == {group.study_instance_uid}
        numbers = [(int(ds.SeriesNumber), int(ds.InstanceNumber)) for ds in sources]
        assert numbers == sorted(numbers)
        assert len({i.overlay for i in group.items}) == len(group.items)
    one = sorted(images.glob("*.dcm"))[0]
    report, log = _run(ckpt, one, tmp_path / "out", score_threshold=0.0, num_workers=0)
    assert report.images == 1 and "medrpn predict: 1 images" in log
    (folder,) = report.studies
    assert (folder / f"{one.stem}.png").is_file() and (folder / "sr.dcm").is_file()


def test_nifti_slices_are_images_of_their_folder(ckpt, tmp_path):
    nib = pytest.importorskip("nibabel")
    (tmp_path / "in" / "sub").mkdir(parents=True)
    volume = np.random.default_rng(0).normal(100, 20, (64, 48, 3)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([0.7, 0.8, 2.0, 1.0])), tmp_path / "in" / "sub" / "ct.nii.gz")
    report, _ = _run(ckpt, tmp_path / "in", tmp_path / "out", score_threshold=0.0, num_workers=0)
    assert report.images == 3 and report.studies == [tmp_path / "out" / "sub"]
    document = json.loads((tmp_path / "out" / "sub" / "findings.json").read_text())
    assert [(im["source"], im["frame"], im["overlay"]) for im in document["images"]] == [
        ("sub/ct.nii.gz", k, f"ct_{k}.png") for k in range(3)
    ]
    assert document["dicom"]["sr"] is None and all(im["pixel_spacing_mm"] for im in document["images"])
