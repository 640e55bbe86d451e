"""A DICOM Structured Report of one scan's findings when the scan was a DICOM series: TID 1500,
built with highdicom, as for images (`medrpn.outputs.sr`), with one volumetric measurement group
per finding.

    Imaging Measurement Report (TID 1500)
      Measurement Group (TID 1501): study summary (algorithm, checkpoint SHA-256, threshold;
        CAD Processing and Findings Summary)
      Measurement Group (TID 1411, Volumetric ROI), one per finding:
        Tracking identifier "<label> <n>" and tracking UID (as in findings.json)
        Finding category / Finding (the class, `medrpn.outputs.sr.class_code`)
        Image Region, one per slice the finding spans: a closed POLYLINE around the box in that
          slice's own pixel coordinates, SELECTED FROM that slice's SOP instance
        Certainty of Finding = the detector score

SCOORD on each slice, rather than one SCOORD3D shape, is what PACS viewers draw on the images. The
box goes from medrpn's LPS-oriented voxels back to the series' own (column, row, slice) axes
(`VolumeGeometry.file_index_boxes`), slices in the order along their normal (the order the series
was read in). Every slice of the series is listed as evidence. For an enhanced multi-frame file
(one instance, a frame per slice) each region references its slice's frame number.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from medrpn.data.volume import VolumeGeometry
from medrpn.outputs.findings import ModelInfo
from medrpn.outputs.references import derived_uid
from medrpn.outputs.sr import (
    CERTAINTY,
    NO_UNITS,
    _algorithm,
    box_polyline,
    class_code,
    name_private_scheme,
    report_document,
)
from medrpn.outputs.volume_findings import VolumeFinding


def assign_volume_tracking(findings: Sequence[VolumeFinding], model: ModelInfo, series_uid: str) -> None:
    """Name every finding of a scan, in place: "<label> <n>" and a UID derived from the model, the
    series and the finding, so that findings.json and the SR name each finding the same way."""
    for number, finding in enumerate(findings, start=1):
        if finding.tracking_id is None:
            label = re.sub(r"[\\\r\n]", " ", finding.label)
            finding.tracking_id = f"{label} {number}"[:64]
        if finding.tracking_uid is None:
            finding.tracking_uid = derived_uid("volume finding", model.checkpoint_sha256, model.score_threshold, series_uid, number)


def slice_boxes(finding: VolumeFinding, geometry: VolumeGeometry, n_slices: int) -> list[tuple[int, list[float]]]:
    """The finding's box on every slice of the series it spans: (slice index along the normal,
    [column1, row1, column2, row2] in that slice's pixels, rounded as in every output).

    The box goes from the volume's LPS-oriented voxels back to the series' own axes (the file
    axes of a DICOM series are its columns, rows and slices)."""
    c1, r1, s1, c2, r2, s2 = geometry.file_index_boxes(finding.box_voxels)[0]
    first = max(0, math.floor(s1))
    last = min(n_slices - 1, max(first, math.ceil(s2) - 1))
    box = [round(float(v), 2) for v in (c1, r1, c2, r2)]
    return [(k, box) for k in range(first, last + 1)]


def slice_regions(
    finding: VolumeFinding, geometry: VolumeGeometry, slices: Sequence[Dataset], frames: Sequence[int] | None = None
) -> list[hd.sr.ImageRegion]:
    """The finding's box as a closed polyline on every slice of the series it spans.

    Args:
        finding: with `box_voxels` in the volume's LPS-oriented voxels.
        geometry: the volume's (its file axes are the series' columns, rows and slices).
        slices: reference headers of the series' slices, in the order along the normal (for an
            enhanced multi-frame file, its header once per slice).
        frames: for a multi-frame file, the DICOM frame number (from 1) of each slice, which the
            region then references; None for single-frame files.
    """
    return [
        hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=box_polyline(box),
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=slices[k].SOPClassUID,
                referenced_sop_instance_uid=slices[k].SOPInstanceUID,
                referenced_frame_numbers=None if frames is None else [int(frames[k])],
            ),
        )
        for k, box in slice_boxes(finding, geometry, len(slices))
    ]


def build_volume_report(
    slices: Sequence[Dataset],
    findings: Sequence[VolumeFinding],
    geometry: VolumeGeometry,
    model: ModelInfo,
    frames: Sequence[int] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The SR document of one DICOM series' findings (content in the module docstring).

    Args:
        slices: reference headers (`medrpn.outputs.references.reference_header`) of the series'
            slices in the order along the normal, as the volume was read; for an enhanced
            multi-frame file its header once per slice, with `frames`.
        findings: the scan's findings (tracking assigned here when missing).
        geometry: the volume's geometry. model: the model and threshold (also the UIDs' source).
        frames: the frame number (from 1) of each slice in its multi-frame file, or None.
    """
    if not slices:
        raise ValueError("a measurement report needs the series' slices")
    study_uid, series_uid = str(slices[0].StudyInstanceUID), str(slices[0].SeriesInstanceUID)
    assign_volume_tracking(findings, model, series_uid)
    summary_value = codes.DCM.AllAlgorithmsSucceededWithFindings if findings else codes.DCM.AllAlgorithmsSucceededWithoutFindings
    groups: list = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("summary", model.checkpoint_sha256, model.score_threshold, series_uid),
                identifier="medrpn scan summary",
            ),
            algorithm_id=_algorithm(model),
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=codes.DCM.CADProcessingAndFindingsSummary, value=summary_value)
            ],
        )
    ]
    for finding in findings:
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=finding.tracking_uid, identifier=finding.tracking_id),
                referenced_regions=slice_regions(finding, geometry, slices, frames),
                finding_type=class_code(finding.label),
                finding_category=codes.SCT.MorphologicallyAbnormalStructure,
                algorithm_id=_algorithm(model, parameters=False),
                measurements=[hd.sr.Measurement(name=CERTAINTY, value=round(finding.score, 4), unit=NO_UNITS)],
            )
        )
    evidence = list({str(ds.SOPInstanceUID): ds for ds in slices}.values())  # a multi-frame file once
    document = report_document(
        evidence,
        groups,
        model,
        series_instance_uid=derived_uid("sr series", model.checkpoint_sha256, model.score_threshold, study_uid),
        sop_instance_uid=derived_uid("volume sr", model.checkpoint_sha256, model.score_threshold, model.version, series_uid),
    )
    name_private_scheme(document, [f.label for f in findings])
    return document
