"""`medrpn predict` end to end with a real (small, untrained) detector on real and synthetic DICOM.

The checkpoint is a real `LesionDetectionModule` saved the way Lightning saves one, so the code
path is the user's: load with weights_only, read in DataLoader workers, detect, write per study.
Real scans come from pydicom's test files and the pydicom-data package.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import warnings
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
from medrpn.inference.predict import predict_files, resolve_threshold, scan_inputs
from medrpn.data.synth import write_synthetic_dataset
from medrpn.training.lightning_module import LesionDetectionModule

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
    assert json.loads((folder / "findings.json").read_text())["schema_version"] == "2.2"


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
    everything, _ = _run(ckpt, tmp_path / "syn" / "images", tmp_path / "all", score_threshold=0.0, num_workers=0)
    assert (report.score_threshold, report.threshold_source) == (0.34, "checkpoint operating point")
    assert "score >= 0.34 (checkpoint operating point)" in log
    assert everything.findings > 0  # so the comparison below has findings to keep or drop

    def found(document: dict) -> list[tuple]:
        return [(im["source"], f["label"], f["score"], f["box_px"]) for im in document["images"] for f in im["findings"]]

    for path in report.studies:
        document = json.loads((path / "findings.json").read_text())
        assert document["model"]["operating_point"] == point
        unfiltered = found(json.loads((tmp_path / "all" / path.name / "findings.json").read_text()))
        assert found(document) == [f for f in unfiltered if f[2] >= 0.34]  # those of threshold 0 at >= 0.34
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


@pytest.mark.parametrize("setting", ["command line", "checkpoint"])
def test_decompression_bombs_are_skipped_with_the_reason(tmp_path, setting):
    """A bomb is known from its header: at the scan (DICOM) or in the reader worker (PNG); the run goes on."""
    from bombs import deflated_dicom, one_bit_png, rle_bomb

    from medrpn.commands.predict import main

    inputs = tmp_path / "in"
    (inputs / "png").mkdir(parents=True)
    shutil.copy(_testdata("MR_small.dcm"), inputs / "MR_small.dcm")
    rle_bomb(inputs / "rle.dcm")  # declares 65535 x 65535 x 16 bits
    deflated_dicom(inputs / "deflated.dcm", 2048, 2048)  # inflates to 8 MiB
    one_bit_png(inputs / "png" / "big.png", 2000, 2000)  # 3.8 MiB decoded
    PILImage.new("L", (100, 80), color=90).save(inputs / "png" / "plain.png")
    limit = 2**20
    ckpt = save_checkpoint(tmp_path / "tiny.ckpt")
    args = ["--ckpt", str(ckpt), "--input", str(inputs), "--output", str(tmp_path / "out"), "--num-workers", "1"]
    if setting == "command line":
        args += ["--max-decoded-bytes", str(limit)]
    else:  # trained with data.read.max_decoded_bytes
        checkpoint = torch.load(ckpt, weights_only=True)
        checkpoint["datamodule_hyper_parameters"]["read"] = {"max_decoded_bytes": limit}
        torch.save(checkpoint, ckpt)
    out = io.StringIO()
    with redirect_stdout(out):
        main(args)
    log = out.getvalue()
    assert f"skipped {inputs / 'rle.dcm'}: declares 65535 x 65535 pixels x 1 frame(s) x 1 sample(s) x 16 bits" in log
    assert f"skipped {inputs / 'deflated.dcm'}: its deflated data set inflates to more than 1.0 MiB" in log
    assert f"skipped {inputs / 'png' / 'big.png'}: declares 2000 x 2000 pixels" in log
    assert "medrpn predict: 2 images in 2 output folders" in log and "3 files skipped" in log
    folder = json.loads((tmp_path / "out" / "png" / "findings.json").read_text())
    (skipped,) = folder["skipped"]
    assert skipped["source"] == "png/big.png" and "over the limit of 1.0 MiB" in skipped["reason"]
    assert [im["source"] for im in folder["images"]] == ["png/plain.png"]


def test_scan_refuses_bombs_from_their_headers_without_inflating_them(tmp_path):
    """pydicom inflates a deflated file whole even for its header: the scan counts it in chunks instead."""
    import tracemalloc

    from bombs import deflated_dicom, rle_bomb

    shutil.copy(_testdata("MR_small.dcm"), tmp_path / "MR_small.dcm")
    deflated_dicom(tmp_path / "deflated.dcm", 4096, 4096)  # inflates to 32 MiB
    multiframe = rle_bomb(tmp_path / "frames.dcm", 64, 64)
    ds = pydicom.dcmread(multiframe)
    ds.NumberOfFrames = 100_000  # 64 x 64 x 2 bytes each: 781 MiB, and an image to analyse per frame
    ds.save_as(multiframe)
    tracemalloc.start()
    scan = scan_inputs(tmp_path, max_decoded_bytes=16 * 2**20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8 * 2**20
    reasons = {Path(path).name: reason for path, reason in scan.skipped}
    assert reasons["deflated.dcm"].startswith("its deflated data set inflates to more than 16.0 MiB")
    assert reasons["frames.dcm"].startswith("declares 64 x 64 pixels x 100000 frame(s)")
    assert [item.path.name for group in scan.groups for item in group.items] == ["MR_small.dcm"]
@pytest.fixture(scope="module")
def dicom_image(tmp_path_factory) -> Path:
    """One real synthetic DICOM image (64 x 64, 0.5 mm pixels) to copy with other UIDs."""
    root = tmp_path_factory.mktemp("dicom")
    write_synthetic_dataset(root, n_images=1, image_size=64, seed=12)
    return next((root / "images").glob("*.dcm"))


def _dicom(source: Path, path: Path, **attributes) -> Path:
    """A copy of the DICOM file ``source`` at ``path`` with a new SOP Instance UID and ``attributes``."""
    ds = pydicom.dcmread(source)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _sources(folder: Path) -> list[str]:
    """The sources a findings.json lists, after checking that every overlay it names is there."""
    document = json.loads((folder / "findings.json").read_text())
    assert all((folder / im["overlay"]).is_file() for im in document["images"])
    return [im["source"] for im in document["images"]]


def test_every_input_group_gets_an_output_folder_of_its_own(ckpt, dicom_image, tmp_path):
    # a DICOM without a study UID (grouped by its folder) and a PNG in a folder named like a study,
    # beside a file of that study: the folder's results must not be written and then replaced
    inputs = tmp_path / "in"
    _dicom(dicom_image, inputs / "1.2.3" / "h.dcm", StudyInstanceUID="")
    PILImage.new("L", (60, 50), color=90).save(inputs / "1.2.3" / "p.png")
    _dicom(dicom_image, inputs / "g.dcm", StudyInstanceUID="1.2.3")
    report, log = _run(ckpt, inputs, tmp_path / "out", score_threshold=0.0, num_workers=0)
    assert report.images == 3 and sorted(report.studies) == [tmp_path / "out" / "1.2.3", tmp_path / "out" / "1.2.3-2"]
    assert _sources(tmp_path / "out" / "1.2.3") == ["g.dcm"]  # the study keeps its UID's name
    assert sorted(_sources(tmp_path / "out" / "1.2.3-2")) == ["1.2.3/h.dcm", "1.2.3/p.png"]
    assert f"output folder; the images of 1.2.3: {tmp_path / 'out' / '1.2.3-2'}" in log

    # a later run's folder named like an earlier run's study neither takes its outputs as its own
    # (and is kept, unanalysed) nor replaces them
    again = tmp_path / "again"
    _dicom(dicom_image, again / "1.2.3" / "k.dcm", StudyInstanceUID="")
    (tmp_path / "out" / "1.2.3-2").rename(tmp_path / "earlier")  # only the study's folder is there now
    report, _ = _run(ckpt, again, tmp_path / "out", score_threshold=0.0, num_workers=0, overwrite=True)
    assert report.images == 1 and report.kept == [] and report.studies == [tmp_path / "out" / "1.2.3-2"]
    assert _sources(tmp_path / "out" / "1.2.3") == ["g.dcm"]
    assert _sources(tmp_path / "out" / "1.2.3-2") == ["1.2.3/k.dcm"]


def test_a_long_file_name_is_shortened_and_the_run_goes_on(ckpt, dicom_image, tmp_path):
    long_name = "x" * 241 + ".dcm"  # legal (245 bytes), but an overlay named after it would not be
    _dicom(dicom_image, tmp_path / "in" / long_name, StudyInstanceUID="1.2.4")
    _dicom(dicom_image, tmp_path / "in" / "z.dcm", StudyInstanceUID="1.2.5")
    report, _ = _run(ckpt, tmp_path / "in", tmp_path / "out", score_threshold=0.0, num_workers=0)
    assert report.images == 2 and report.skipped == []
    assert _sources(tmp_path / "out" / "1.2.4") == [long_name] and _sources(tmp_path / "out" / "1.2.5") == ["z.dcm"]
    (overlay,) = (tmp_path / "out" / "1.2.4").glob("*.png")
    assert overlay.name.startswith("x" * 80) and len(overlay.name.encode()) <= 124


def test_a_study_that_cannot_be_written_is_skipped_and_never_looks_complete(ckpt, dicom_image, tmp_path):
    _dicom(dicom_image, tmp_path / "in" / "a.dcm", StudyInstanceUID="1.2.6")
    _dicom(dicom_image, tmp_path / "in" / "b.dcm", StudyInstanceUID="1.2.7")
    out = tmp_path / "out"
    _run(ckpt, tmp_path / "in", out, score_threshold=0.0, num_workers=0)
    study, other = out / "1.2.6", out / "1.2.7"
    (study / "sr.dcm").unlink()
    (study / "sr.dcm").mkdir()  # something in the way: replacing this study's outputs fails midway
    (study / "sr.dcm" / "keep").write_text("")
    report, log = _run(ckpt, tmp_path / "in", out, score_threshold=0.2, num_workers=0, overwrite=True)
    ((path, reason),) = report.skipped
    assert path == str(tmp_path / "in" / "a.dcm") and f"the outputs of {study} could not be written" in reason
    assert report.studies == [other] and report.images == 1 and f"skipped {path}: {reason}" in log
    assert json.loads((other / "findings.json").read_text())["model"]["score_threshold"] == 0.2
    # no findings.json of either run beside the other run's files, and no overlay of the second run
    assert not (study / "findings.json").exists() and not (study / "a.png").exists()
    assert list(study.glob("*.json")) == []

    # once what was in the way is gone, a run without --overwrite redoes the unfinished study only
    shutil.rmtree(study / "sr.dcm")
    report, log = _run(ckpt, tmp_path / "in", out, score_threshold=0.2, num_workers=0)
    assert report.kept == [other] and report.studies == [study] and f"an earlier run stopped while writing {study}" in log
    assert _sources(study) == ["a.dcm"] and (study / "sr.dcm").is_file()
    assert sorted(p.name for p in study.iterdir()) == ["a.png", "findings.json", "gsps.dcm", "sr.dcm"]


def test_anonymized_paths_name_no_input_file_folder_or_checkpoint(dicom_image, tmp_path):
    ckpt = save_checkpoint((tmp_path / "Dr_Who").mkdir() or tmp_path / "Dr_Who" / "tiny.ckpt")
    inputs = tmp_path / "in"
    dicom = _dicom(dicom_image, inputs / "Smith_John" / "IM_Smith.dcm", StudyInstanceUID="1.2.8")
    no_study = _dicom(dicom_image, inputs / "Doe_Jane" / "IM_Doe.dcm", StudyInstanceUID="")
    PILImage.new("L", (60, 50), color=90).save(inputs / "Doe_Jane" / "photo_Doe.png")
    out = tmp_path / "out"
    report, _ = _run(ckpt, inputs, out, score_threshold=0.0, num_workers=0, anonymize_paths=True, proposals=True)
    assert report.images == 3 and len(report.studies) == 2
    written = [p for p in out.rglob("*") if p.is_file()]
    for path in written:
        named = path.relative_to(out).as_posix() + (path.read_text() if path.suffix == ".json" else "")
        for secret in ("Smith", "Doe", "Dr_Who", str(tmp_path)):
            assert secret not in named, path
    study = json.loads((out / "1.2.8" / "findings.json").read_text())
    assert study["anonymized_paths"] and study["model"]["checkpoint"] is None
    assert study["model"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    uid = pydicom.dcmread(dicom, stop_before_pixels=True).SOPInstanceUID
    assert _sources(out / "1.2.8") == [uid] and study["images"][0]["overlay"] == f"{uid}.png"
    (folder,) = (p for p in report.studies if p.name != "1.2.8")
    assert folder.name == hashlib.sha256(b"Doe_Jane").hexdigest()[:16]
    expected = [pydicom.dcmread(no_study).SOPInstanceUID, hashlib.sha256(b"Doe_Jane/photo_Doe.png").hexdigest()[:16]]
    assert sorted(_sources(folder)) == sorted(expected)


def test_an_overlay_that_cannot_be_written_costs_its_image_only(ckpt, dicom_image, tmp_path):
    # an output folder so deep (about 4000 bytes of path) that a long overlay name no longer fits
    # in the system's path limit, while short names still do
    _dicom(dicom_image, tmp_path / "in" / ("x" * 200 + ".dcm"), StudyInstanceUID="1.2.9")
    _dicom(dicom_image, tmp_path / "in" / "z.dcm", StudyInstanceUID="1.2.9")
    out = tmp_path
    while len(str(out / "1.2.9" / ".medrpn-partial")) < 3800:
        out = out / ("d" * 200)
    out = out / ("d" * (4000 - len(str(out / "1.2.9" / ".medrpn-partial"))))
    out.mkdir(parents=True)
    report, log = _run(ckpt, tmp_path / "in", out, score_threshold=0.0, num_workers=0)
    ((path, reason),) = report.skipped
    assert path == str(tmp_path / "in" / ("x" * 200 + ".dcm")) and "its overlay could not be written" in reason
    assert report.images == 1 and f"skipped {path}: {reason}" in log
    document = json.loads((out / "1.2.9" / "findings.json").read_text())
    assert [im["source"] for im in document["images"]] == ["z.dcm"]
    assert document["skipped"] == [{"source": "x" * 200 + ".dcm", "reason": reason}]
    assert sorted(p.name for p in (out / "1.2.9").iterdir()) == ["findings.json", "gsps.dcm", "sr.dcm", "z.png"]


def test_pgm_and_tiff_inputs_are_analysed_and_a_multi_page_tiff_is_reported(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    PILImage.new("L", (90, 70), color=80).save(inputs / "mdb001.pgm")
    PILImage.fromarray(np.full((60, 50), 30000, dtype=np.uint16)).save(inputs / "scan.tif")
    pages = [PILImage.new("L", (40, 40), color=v) for v in (10, 200)]
    pages[0].save(inputs / "stack.tif", save_all=True, append_images=pages[1:])
    report = predict_files(save_checkpoint(tmp_path / "tiny.ckpt"), inputs, tmp_path / "out", num_workers=0)
    findings = json.loads((tmp_path / "out" / "findings.json").read_text())
    assert sorted(image["source"] for image in findings["images"]) == ["mdb001.pgm", "scan.tif"]
    assert {(i["width"], i["height"]) for i in findings["images"]} == {(90, 70), (50, 60)}
    assert [(Path(p).name, "multi-page" in reason) for p, reason in report.skipped] == [("stack.tif", True)]


def test_a_library_warning_is_said_once_in_plain_words_without_the_name(ckpt, dicom_image, tmp_path):
    for study in ("1.2.10", "1.2.11"):
        _dicom(dicom_image, tmp_path / "in" / f"{study}.dcm", StudyInstanceUID=study, PatientName="Smithson")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that escapes the summary fails the test
        report, log = _run(ckpt, tmp_path / "in", tmp_path / "out", score_threshold=0.0, num_workers=0)
    assert report.images == 2
    notes = [line for line in log.splitlines() if "single component" in line]
    assert len(notes) == 1 and notes[0].startswith("note: a person name in the source DICOM headers")
    assert "Smithson" not in log


def test_predict_shows_a_progress_bar_on_a_terminal_only(ckpt, dicom_image, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import sys
    import termios

    _dicom(dicom_image, tmp_path / "in" / "a.dcm", StudyInstanceUID="1.2.12")
    command = [sys.executable, "-m", "medrpn", "predict", "--ckpt", str(ckpt), "--input", str(tmp_path / "in"),
               "--num-workers", "0"]
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal has a size
    done = subprocess.run([*command, "--output", str(tmp_path / "tty")], stdin=secondary, stdout=secondary,
                          stderr=secondary, timeout=300)
    os.close(secondary)
    seen = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal is closed once everything was read
            break
        if not chunk:
            break
        seen += chunk
    os.close(primary)
    assert done.returncode == 0, seen.decode(errors="replace")[-2000:]
    assert b"medrpn predict: 100%" in seen and b"1/1" in seen, seen.decode(errors="replace")[-2000:]
    piped = subprocess.run([*command, "--output", str(tmp_path / "log")], capture_output=True, text=True, timeout=300)
    assert piped.returncode == 0 and "medrpn predict: 1 images" in piped.stdout
    assert "%|" not in piped.stderr + piped.stdout  # quiet in logs


def test_predict_help_answers_without_loading_torch():
    import sys

    from medrpn.commands.predict import FLIPS
    from medrpn.model.flip_proposals import FLIP_DIMS

    assert set(FLIPS) == set(FLIP_DIMS)
    code = (
        "import sys\n"
        "from medrpn.cli import main\n"
        "try:\n    main(['predict', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, sorted(sys.modules)[:20]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--anonymize-paths" in done.stdout
