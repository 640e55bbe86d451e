"""The DICOM SR and GSPS of a scan's findings when the scan is a DICOM series: each finding's box
drawn on every slice it spans, in that slice's own pixel coordinates, referencing that slice's SOP
instance. Checked against the annotation CSV (boxes in the series' own column, row, slice
indices) and against the slice order worked out here from each file's position, independently of
medrpn's reader; and by dciodvfy where dicom3tools is installed."""

from __future__ import annotations

import csv
import shutil
import subprocess

import highdicom as hd
import numpy as np
import pydicom
import pytest

from medrpn.data.annotations import read_annotations
from medrpn.data.synth_volumes import write_synthetic_volumes
from medrpn.data.volume_files import read_volume
from medrpn.outputs.findings import ModelInfo
from medrpn.outputs.references import reference_header
from medrpn.outputs.sr import write_dicom
from medrpn.outputs.volume_findings import make_volume_findings
from medrpn.outputs.volume_sr import build_volume_report

MODEL = ModelInfo(checkpoint=None, checkpoint_sha256="0" * 64, class_names=["enhancing", "ring"], score_threshold=0.5, version="test")


def _series_with_lesions(tmp_path):
    write_synthetic_volumes(tmp_path, n_volumes=6, shape=(48, 48, 16), seed=7)
    with open(tmp_path / "annotations.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["x1"] and not r["image"].endswith(".nii.gz")]
    assert rows, "the phantoms hold a DICOM series with a lesion"
    image = rows[0]["image"]
    return tmp_path / image, [r for r in rows if r["image"] == image]


def test_each_finding_is_drawn_on_every_slice_it_spans_of_the_right_instance(tmp_path):
    folder, rows = _series_with_lesions(tmp_path)
    volume = read_volume(folder)
    records, classes = read_annotations(tmp_path / "annotations.csv")
    record = next(r for r in records if r.image_path == folder)
    findings = make_volume_findings(record.boxes, np.linspace(0.9, 0.6, len(record.boxes)), record.labels, classes, volume.geometry, 0.5)
    # slice order along the normal, from the files' own positions
    files = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    normal = np.cross(*np.asarray(files[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    files.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))
    headers = [reference_header(ds) for ds in files]
    sr = build_volume_report(headers, findings, volume.geometry, MODEL)
    path = write_dicom(tmp_path / "sr.dcm", sr)

    report = hd.sr.srread(path)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(rows)
    by_uid = {g.tracking_uid: g for g in groups}
    for finding in findings:
        group = by_uid[finding.tracking_uid]
        # the annotation row of this box, in the series' own indices
        row = next(r for r in rows if [float(r[k]) for k in ("x1", "y1", "z1", "x2", "y2", "z2")]
                   == pytest.approx(list(volume.geometry.file_index_boxes(finding.box_voxels)[0])))
        x1, y1, z1, x2, y2, z2 = (float(row[k]) for k in ("x1", "y1", "z1", "x2", "y2", "z2"))
        regions = group.roi
        assert len(regions) == int(z2 - z1)
        referenced = [region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID for region in regions]
        assert referenced == [str(files[k].SOPInstanceUID) for k in range(int(z1), int(z2))]
        for region in regions:
            assert region.value.tolist() == [[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]]
    evidence = {item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence}
    assert evidence == {str(ds.SOPInstanceUID) for ds in files}
    if shutil.which("dciodvfy"):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


def test_boxes_go_back_to_the_files_own_axes():
    from medrpn.data.volume import VolumeGeometry

    # a file stored right-to-left and with its slice axis first (RAS-like), turned to LPS and back
    affine = np.array([[0, 0, -1.0, 0], [0, 1.0, 0, 0], [2.0, 0, 0, 0], [0, 0, 0, 1]])
    geometry = VolumeGeometry.from_file_affine((10, 20, 30), affine)
    boxes = np.array([[1, 2, 3, 4, 5, 6], [0, 0, 0, 10, 20, 30]], dtype=float)
    lps = geometry.boxes_from_file_index(boxes)
    assert not np.allclose(lps, boxes)
    assert geometry.file_index_boxes(lps) == pytest.approx(boxes)


def test_the_presentation_state_draws_each_finding_on_the_slices_it_spans(tmp_path):
    from medrpn.outputs.volume_gsps import build_volume_presentation_states

    folder, rows = _series_with_lesions(tmp_path)
    volume = read_volume(folder)
    records, classes = read_annotations(tmp_path / "annotations.csv")
    record = next(r for r in records if r.image_path == folder)
    findings = make_volume_findings(record.boxes, np.full(len(record.boxes), 0.8), record.labels, classes, volume.geometry, 0.5)
    files = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.iterdir())]
    normal = np.cross(*np.asarray(files[0].ImageOrientationPatient, dtype=float).reshape(2, 3))
    files.sort(key=lambda ds: float(np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float))))
    states, notes = build_volume_presentation_states([reference_header(ds) for ds in files], findings, volume.geometry, MODEL)
    assert len(states) == 1 and notes == []
    path = write_dicom(tmp_path / "gsps.dcm", states[0])
    drawn: dict[str, list[tuple[str, list[float]]]] = {}
    for annotation in pydicom.dcmread(path).GraphicAnnotationSequence:
        uid = annotation.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        for graphic in annotation.GraphicObjectSequence:
            drawn.setdefault(uid, []).append((graphic.TrackingUID, [float(v) for v in graphic.GraphicData]))
    expected: dict[str, list[tuple[str, list[float]]]] = {}
    for finding in findings:
        x1, y1, z1, x2, y2, z2 = volume.geometry.file_index_boxes(finding.box_voxels)[0]
        for k in range(int(round(z1)), int(round(z2))):
            expected.setdefault(str(files[k].SOPInstanceUID), []).append(
                (finding.tracking_uid, [round(float(v), 2) for v in (x1, y1, x2, y1, x2, y2, x1, y2, x1, y1)])
            )
    assert {uid: sorted(v) for uid, v in drawn.items()} == {uid: sorted(v) for uid, v in expected.items()}
    if shutil.which("dciodvfy"):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors


def test_an_enhanced_multi_frame_scan_gets_regions_on_its_frames(tmp_path):
    """pydicom's enhanced CT (one instance, two frames placed by their functional groups): each
    region references the instance and the frame of its slice, in the frames' order along the
    normal worked out here from the per-frame positions."""
    from pydicom.data import get_testdata_file

    from medrpn.data.dicom_series import read_dicom_series

    source = get_testdata_file("eCT_Supplemental.dcm")
    shutil.copy(source, tmp_path / "ect.dcm")
    volume = read_dicom_series(tmp_path)
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    orientation = np.asarray(ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = [np.asarray(g.PlanePositionSequence[0].ImagePositionPatient, dtype=float) for g in ds.PerFrameFunctionalGroupsSequence]
    order = sorted(range(len(positions)), key=lambda f: float(np.dot(normal, positions[f])))
    assert volume.meta["SliceFrames"] == [f + 1 for f in order]
    assert volume.meta["SOPInstanceUIDs"] == [str(ds.SOPInstanceUID)] * 2

    file_box = np.array([[100.0, 200.0, 0.0, 150.0, 260.0, 2.0]])  # columns, rows, slices of the file
    lps = volume.geometry.boxes_from_file_index(file_box)
    findings = make_volume_findings(lps, np.array([0.9]), np.array([0]), ["enhancing", "ring"], volume.geometry, 0.5)
    header = reference_header(ds)
    sr = build_volume_report([header, header], findings, volume.geometry, MODEL, frames=volume.meta["SliceFrames"])
    path = write_dicom(tmp_path / "sr.dcm", sr)
    (group,) = hd.sr.srread(path).content.get_volumetric_roi_measurement_groups()
    references = [region.ContentSequence[0].ReferencedSOPSequence[0] for region in group.roi]
    assert [r.ReferencedSOPInstanceUID for r in references] == [str(ds.SOPInstanceUID)] * 2
    assert [int(r.ReferencedFrameNumber) for r in references] == volume.meta["SliceFrames"]
    for region in group.roi:
        assert region.value.tolist() == [[100.0, 200.0], [150.0, 200.0], [150.0, 260.0], [100.0, 260.0], [100.0, 200.0]]
    evidence = [item.ReferencedSOPInstanceUID for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for item in series.ReferencedSOPSequence]
    assert evidence == [str(ds.SOPInstanceUID)]  # the file once, not once per frame
    if shutil.which("dciodvfy"):
        result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors
