"""DICOM SR (TID 1500) and GSPS written for findings on real DICOM files, read back with pydicom and highdicom.

The sources are real scans from pydicom's test files and the pydicom-data package (a CT slice, a
MONOCHROME1 computed radiograph with a full set of patient attributes, a colour ultrasound, a
multi-frame enhanced MR) and synthetic DX files. Findings are set by hand here, so that every
coordinate can be checked; the detector's part is tested in test_predict.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage, GrayscaleSoftcopyPresentationStateStorage

from medrpn.outputs import Finding, ImageFindings, ModelInfo
from medrpn.outputs.gsps import build_presentation_states, layer_names
from medrpn.outputs.references import EMPTY_KEYWORDS, derived_uid, reference_header
from medrpn.outputs.sr import PRIVATE_SCHEME, build_measurement_report, class_code, write_dicom
from medrpn.outputs.study import StudyOutputs, existing_outputs
from medrpn.data.synth import write_synthetic_dataset

CLASSES = ["nodule", "spiculated", "mass"]
MODEL = ModelInfo(
    checkpoint="/models/best.ckpt",
    checkpoint_sha256="0123456789abcdef" * 4,
    class_names=CLASSES,
    score_threshold=0.35,
    threshold_source="checkpoint operating point",
    version="0.1.0",
)
UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def _testdata(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not installed (pydicom-data)")
    return Path(path)


def _analysed(path: Path, findings: list[Finding], frame: int | None = None) -> tuple[pydicom.Dataset, ImageFindings]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    header = reference_header(ds)
    keywords = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality")
    uids = {k: str(ds.get(k)) for k in keywords}
    image = ImageFindings(
        source=path.name, height=ds.Rows, width=ds.Columns, spacing=None, findings=findings, frame=frame, uids=uids,
        overlay=f"{path.stem}{'' if frame is None else f'_{frame}'}.png",
    )
    return header, image


def _reread(document: pydicom.Dataset, folder: Path) -> hd.sr.Comprehensive3DSR:
    """A built SR as a reader gets it: written to a file and read back with highdicom."""
    return hd.sr.srread(write_dicom(folder / "read-back.dcm", document))


def _write_study(folder: Path, analysed: list[tuple[pydicom.Dataset, ImageFindings]], skipped=()) -> StudyOutputs:
    writer = StudyOutputs(folder, MODEL, str(analysed[0][0].StudyInstanceUID))
    for header, image in analysed:
        writer.add(image, np.zeros((image.height, image.width), dtype=np.uint8), header)
    for source, reason in skipped:
        writer.skip(source, reason)
    writer.finish()
    return writer


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """A CT slice (MONOCHROME2) and a computed radiograph (MONOCHROME1) with findings, written out."""
    out = tmp_path_factory.mktemp("studies")
    ct = _testdata("CT_small.dcm")
    cr = _testdata("RG1_UNCR.dcm")
    ct_findings = [
        Finding("nodule", 0.91234, [10.25, 20.5, 40.75, 60.0]),
        Finding("spiculated", 0.42, [0.0, 0.0, 128.0, 12.0]),  # on the image border: Columns is the right edge
    ]
    cr_findings = [Finding("mass", 0.77, [100.0, 200.0, 400.0, 500.0])]
    return {
        "ct": (ct, _write_study(out / "ct", [_analysed(ct, ct_findings)])),
        "cr": (cr, _write_study(out / "cr", [_analysed(cr, cr_findings)])),
    }


@pytest.mark.parametrize("name", ["ct", "cr"])
def test_sr_references_the_source_image_and_matches_the_findings_json(studies, name):
    source_path, writer = studies[name]
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    document = json.loads((writer.folder / "findings.json").read_text())
    assert document["dicom"]["sr"] == "sr.dcm"
    (entry,) = document["images"]
    assert entry["sop_instance_uid"] == source.SOPInstanceUID

    raw = pydicom.dcmread(writer.folder / "sr.dcm")
    assert raw.SOPClassUID == Comprehensive3DSRStorage and raw.Modality == "SR"
    assert raw.StudyInstanceUID == source.StudyInstanceUID  # filed with the source's study
    assert raw.SeriesInstanceUID != source.SeriesInstanceUID  # in a series of its own
    (evidence,) = raw.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == source.StudyInstanceUID
    (series,) = evidence.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (raw.CompletionFlag, raw.VerificationFlag, raw.PreliminaryFlag) == ("COMPLETE", "UNVERIFIED", "PRELIMINARY")

    sr = hd.sr.srread(writer.folder / "sr.dcm")
    groups = sr.content.get_planar_roi_measurement_groups()
    by_uid = {f["tracking_uid"]: f for f in entry["findings"]}
    assert len(groups) == len(by_uid) > 0
    for group in groups:
        finding = by_uid[str(group.tracking_uid)]
        assert group.tracking_identifier == finding["tracking_id"]
        roi = group.roi
        assert roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        x1, y1, x2, y2 = finding["box_px"]
        expected = [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]  # closed rectangle, (column, row)
        np.testing.assert_allclose(roi.value, expected, atol=1e-4)
        reference = roi.ContentSequence[0]
        assert reference.referenced_sop_instance_uid == source.SOPInstanceUID
        assert reference.referenced_sop_class_uid == source.SOPClassUID
        assert group.finding_type == class_code(finding["label"])
        (certainty,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert certainty.value == pytest.approx(finding["score"], abs=1e-4)


def test_sr_codes_are_standard_or_declared(studies):
    sr = hd.sr.srread(studies["ct"][1].folder / "sr.dcm")
    report = sr.content
    groups = report.get_planar_roi_measurement_groups()
    assert [g.finding_type for g in groups] == [codes.SCT.Nodule, class_code("spiculated")]
    for group in groups:
        assert group.finding_category == codes.SCT.MorphologicallyAbnormalStructure
        (certainty,) = group.get_measurements(name=codes.DCM.CertaintyOfFinding)
        assert certainty.unit == codes.UCUM.NoUnits
    assert class_code("spiculated").scheme_designator == PRIVATE_SCHEME
    assert class_code("Mass") == codes.SCT.Mass
    # the private scheme is named in the document, as DICOM asks of schemes it does not define
    raw = pydicom.dcmread(studies["ct"][1].folder / "sr.dcm")
    assert [s.CodingSchemeDesignator for s in raw.CodingSchemeIdentificationSequence] == [PRIVATE_SCHEME]
    (summary,) = report.get_image_measurement_groups()
    (evaluation,) = summary.get_qualitative_evaluations(name=codes.DCM.CADProcessingAndFindingsSummary)
    assert evaluation.value == codes.DCM.AllAlgorithmsSucceededWithFindings
    # the model is named with its checkpoint hash and threshold
    text = raw.to_json()
    assert MODEL.checkpoint_sha256 in text and "score threshold 0.35" in text


def test_outputs_copy_only_the_identifiers_referencing_needs(studies):
    source_path, writer = studies["cr"]
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    assert source.PatientBirthDate and source.OtherPatientIDs and source.ReferringPhysicianName  # the test needs them
    for name in ("sr.dcm", "gsps.dcm"):
        out = pydicom.dcmread(writer.folder / name)
        assert (out.PatientName, out.PatientID) == (source.PatientName, source.PatientID)
        for keyword in ("AccessionNumber", "StudyID", "StudyDate", "StudyTime"):
            assert out[keyword].value == source[keyword].value, keyword
        for keyword in EMPTY_KEYWORDS:
            assert out.get(keyword) in ("", None), keyword
        for keyword in ("OtherPatientIDs", "StudyDescription", "InstitutionName", "PatientAge", "PatientWeight"):
            assert keyword not in out, keyword
    findings_text = (writer.folder / "findings.json").read_text()
    assert str(source.PatientName) not in findings_text and source.PatientID not in findings_text


@pytest.mark.parametrize("name, shape", [("ct", "IDENTITY"), ("cr", "INVERSE")])
def test_gsps_draws_each_box_on_its_source_image(studies, name, shape):
    source_path, writer = studies[name]
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    document = json.loads((writer.folder / "findings.json").read_text())
    assert document["dicom"]["gsps"] == ["gsps.dcm"]
    (entry,) = document["images"]
    gsps = pydicom.dcmread(writer.folder / "gsps.dcm")
    assert gsps.SOPClassUID == GrayscaleSoftcopyPresentationStateStorage and gsps.Modality == "PR"
    assert gsps.StudyInstanceUID == source.StudyInstanceUID
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    assert [i.ReferencedSOPInstanceUID for i in series.ReferencedImageSequence] == [source.SOPInstanceUID]
    # MONOCHROME1 must be shown inverted, or bone would turn dark in the viewer
    assert source.PhotometricInterpretation == ("MONOCHROME1" if shape == "INVERSE" else "MONOCHROME2")
    assert gsps.PresentationLUTShape == shape
    if "WindowCenter" in source:  # the source's own window is kept
        voi = gsps.SoftcopyVOILUTSequence[0]
        assert float(voi.WindowCenter) == pytest.approx(float(np.ravel(source.WindowCenter)[0]))

    layers = {layer.GraphicLayer: layer.GraphicLayerDescription for layer in gsps.GraphicLayerSequence}
    drawn = {}
    for annotation in gsps.GraphicAnnotationSequence:
        (ref,) = annotation.ReferencedImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        label = layers[annotation.GraphicLayer]
        for graphic, text in zip(annotation.GraphicObjectSequence, annotation.TextObjectSequence):
            assert hd.pr.GraphicTypeValues(graphic.GraphicType) == hd.pr.GraphicTypeValues.POLYLINE
            assert hd.pr.AnnotationUnitsValues(graphic.GraphicAnnotationUnits) == hd.pr.AnnotationUnitsValues.PIXEL
            assert graphic.TrackingUID == text.TrackingUID
            drawn[graphic.TrackingUID] = (label, np.reshape(graphic.GraphicData, (-1, 2)), text.UnformattedTextValue)
    assert set(drawn) == {f["tracking_uid"] for f in entry["findings"]}
    for finding in entry["findings"]:
        label, points, text = drawn[finding["tracking_uid"]]
        x1, y1, x2, y2 = finding["box_px"]
        np.testing.assert_allclose(points, [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], atol=1e-4)
        assert label == finding["label"] and text == f"{finding['label']} {finding['score']:.2f}"


def test_study_without_findings_gets_an_sr_saying_so_and_no_gsps(tmp_path):
    ct = _testdata("CT_small.dcm")
    writer = _write_study(tmp_path / "none", [_analysed(ct, [])], skipped=[("gone.dcm", "truncated")])
    document = json.loads((writer.folder / "findings.json").read_text())
    assert document["dicom"]["gsps"] == [] and any("no GSPS" in n for n in document["dicom"]["notes"])
    assert document["skipped"] == [{"source": "gone.dcm", "reason": "truncated"}]
    sr = hd.sr.srread(writer.folder / "sr.dcm")
    assert sr.content.get_planar_roi_measurement_groups() == []
    (summary,) = sr.content.get_image_measurement_groups()
    (evaluation,) = summary.get_qualitative_evaluations(name=codes.DCM.CADProcessingAndFindingsSummary)
    assert evaluation.value == codes.DCM.NotAllAlgorithmsSucceededWithoutFindings  # one file was unreadable
    assert not list(writer.folder.glob("gsps*.dcm"))


def test_colour_and_multi_frame_images_are_in_the_sr_but_not_in_a_gsps(tmp_path):
    colour = _analysed(_testdata("US1_UNCR.dcm"), [Finding("nodule", 0.6, [10.0, 10.0, 50.0, 60.0])])
    mr = _testdata("emri_small.dcm")  # enhanced MR, 10 frames
    frames = [_analysed(mr, [Finding("mass", 0.5, [1.0, 2.0, 30.0, 40.0])], frame=k) for k in (0, 3)]
    sr_doc = _reread(build_measurement_report([colour], MODEL), tmp_path)
    assert len(sr_doc.content.get_planar_roi_measurement_groups()) == 1
    states, notes = build_presentation_states([colour] + frames, MODEL)
    assert states == []
    assert notes == [
        "US1_UNCR.dcm: colour image, its findings are in the SR and overlays only (no GSPS)",
        "emri_small.dcm: multi-frame image, its findings are in the SR and overlays only (no GSPS)",
    ]
    report = _reread(build_measurement_report(frames, MODEL), tmp_path)
    groups = report.content.get_planar_roi_measurement_groups()
    refs = [g.roi.ContentSequence[0].ReferencedSOPSequence[0] for g in groups]
    assert [int(r.ReferencedFrameNumber) for r in refs] == [1, 4]  # DICOM counts frames from 1


def test_gsps_groups_images_that_share_display_settings(tmp_path):
    write_synthetic_dataset(tmp_path / "syn", n_images=8, image_size=64, seed=11)
    paths = sorted((tmp_path / "syn" / "images").glob("*.dcm"))
    by_study: dict[str, list[Path]] = {}
    for path in paths:
        by_study.setdefault(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID, []).append(path)
    study = max(by_study.values(), key=len)
    assert len(study) > 1
    analysed = [_analysed(p, [Finding("nodule", 0.8, [5.0, 5.0, 20.0, 20.0])]) for p in study]
    keys = {
        (h.PhotometricInterpretation, str(h.RescaleSlope), str(h.RescaleIntercept)) for h, _ in analysed
    }
    states, notes = build_presentation_states(analysed, MODEL)
    assert notes == [] and len(states) == len(keys)
    def referenced(state) -> set[str]:
        return {i.ReferencedSOPInstanceUID for s in state.ReferencedSeriesSequence for i in s.ReferencedImageSequence}

    assert sorted(uid for state in states for uid in referenced(state)) == sorted(h.SOPInstanceUID for h, _ in analysed)
    for state in states:  # each state shows its images as their photometry asks
        photometric = {h.PhotometricInterpretation for h, _ in analysed if h.SOPInstanceUID in referenced(state)}
        assert state.PresentationLUTShape == ("INVERSE" if photometric == {"MONOCHROME1"} else "IDENTITY")


def test_uids_are_valid_and_reproducible(studies):
    header, image = _analysed(_testdata("CT_small.dcm"), [Finding("nodule", 0.9, [1.0, 1.0, 9.0, 9.0])])
    first = build_measurement_report([(header, image)], MODEL)
    image.findings[0].tracking_uid = image.findings[0].tracking_id = None
    again = build_measurement_report([(header, image)], MODEL)
    assert first.SOPInstanceUID == again.SOPInstanceUID and first.SeriesInstanceUID == again.SeriesInstanceUID
    other = ModelInfo(**{**MODEL.__dict__, "score_threshold": 0.6})
    assert build_measurement_report([(header, image)], other).SOPInstanceUID != first.SOPInstanceUID
    for uid in (first.SOPInstanceUID, derived_uid("x"), image.findings[0].tracking_uid):
        assert UID.match(uid) and len(uid) <= 64


def test_layer_names_are_valid_code_strings():
    names = layer_names(["nodule", "ground-glass opacity", "GGO", "2nd kind", "nodule!", ""])
    assert names[:3] == ["NODULE", "GROUND_GLASS OPA", "GGO"]
    assert len(set(names)) == len(names)
    for name in names:
        assert re.fullmatch(r"[A-Z][A-Z0-9 _]{0,15}", name) and not name.endswith((" ", "_"))


def test_existing_outputs_are_found_and_stale_ones_removed_on_rewrite(tmp_path):
    ct, mr = _testdata("CT_small.dcm"), _testdata("MR_small.dcm")
    folder = tmp_path / "study"
    assert existing_outputs(folder, ["CT_small.png"]) == []
    first = [_analysed(ct, [Finding("nodule", 0.9, [1.0, 1.0, 9.0, 9.0])]), _analysed(mr, [])]
    for _, image in first:  # pretend both are of one study, as a rewrite of a changed study would be
        image.uids["StudyInstanceUID"] = str(first[0][0].StudyInstanceUID)
    first[1][0].StudyInstanceUID = first[0][0].StudyInstanceUID
    _write_study(folder, first)
    assert {p.name for p in existing_outputs(folder, [])} == {"findings.json", "sr.dcm", "gsps.dcm"}
    assert (folder / "MR_small.png").exists()
    _write_study(folder, first[:1])  # the MR image is gone from the input
    assert not (folder / "MR_small.png").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["CT_small.png", "findings.json", "gsps.dcm", "sr.dcm"]


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools' dciodvfy is not installed")
def test_dciodvfy_finds_no_errors(studies, tmp_path):
    writers = [writer for _, writer in studies.values()]
    write_synthetic_dataset(tmp_path / "syn", n_images=3, image_size=64, seed=2)
    first = sorted((tmp_path / "syn" / "images").glob("*.dcm"))[0]
    synthetic = _analysed(first, [Finding("spiculated", 0.5, [3.0, 4.0, 30.0, 40.0])])  # private class code
    writers.append(_write_study(tmp_path / "syn-out", [synthetic]))
    files = [p for w in writers for p in sorted(w.folder.glob("*.dcm"))]
    assert {p.name for p in files} >= {"sr.dcm", "gsps.dcm"}
    for path in files:
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}:\n{output}"


def test_sr_attached_as_built_is_the_document_highdicom_builds_from_the_whole_tree(tmp_path):
    """`attach_content` skips highdicom's copy and re-parse of the content tree (issue #23, predict
    speed); the file written must not change: same bytes, timestamps aside."""
    write_synthetic_dataset(tmp_path / "syn", n_images=8, image_size=64, seed=11)
    by_study: dict[str, list[Path]] = {}
    for path in sorted((tmp_path / "syn" / "images").glob("*.dcm")):
        by_study.setdefault(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID, []).append(path)
    study = max(by_study.values(), key=len)
    findings = [Finding("nodule", 0.8, [5.0, 5.0, 20.0, 20.0]), Finding("odd class", 0.3, [1.0, 2.0, 9.5, 30.0])]
    analysed = [_analysed(p, [Finding(f.label, f.score, list(f.box_px)) for f in findings]) for p in study]
    analysed.append(_analysed(_testdata("emri_small.dcm"), [Finding("mass", 0.5, [1.0, 2.0, 30.0, 40.0])], frame=3))
    analysed[-1][0].StudyInstanceUID = analysed[0][0].StudyInstanceUID  # one study, frames included

    attached = build_measurement_report(analysed, MODEL)
    constructed = build_measurement_report(analysed, MODEL, whole_tree_to_constructor=True)
    for keyword in ("ContentDate", "ContentTime", "InstanceCreationDate", "InstanceCreationTime"):
        if keyword in constructed:
            setattr(attached, keyword, constructed.data_element(keyword).value)
    for mine, theirs in zip(attached.ContributingEquipmentSequence, constructed.ContributingEquipmentSequence):
        mine.ContributionDateTime = theirs.ContributionDateTime
    first = write_dicom(tmp_path / "attached.dcm", attached).read_bytes()
    assert first == write_dicom(tmp_path / "constructed.dcm", constructed).read_bytes()
    assert attached.content[0].ContentSequence == constructed.content[0].ContentSequence
    read_back = hd.sr.srread(tmp_path / "attached.dcm").content.get_planar_roi_measurement_groups()
    assert len(read_back) == 2 * len(study) + 1
