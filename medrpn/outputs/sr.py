"""A DICOM Structured Report of one study's findings: TID 1500 Measurement Report, built with highdicom.

A PACS files the report with the study and an SR-aware viewer draws each finding on the image it
came from. The content tree::

    Imaging Measurement Report (TID 1500)
      observer: device "medrpn" (model name and version); procedure reported: Imaging procedure
      Imaging Measurements
        Measurement Group (TID 1501): study summary
          Algorithm identification: name, version, checkpoint SHA-256, score threshold
          CAD Processing and Findings Summary = All algorithms succeeded; with/without findings
            ("Not all algorithms succeeded" when some images of the study could not be read)
        Measurement Group (TID 1410), one per finding:
          Tracking identifier "<label> <n>" and tracking UID (the same as in the findings JSON
            and the GSPS)
          Finding category = Morphologically abnormal structure (SCT 49755003)
          Finding = the class, as a code (see `class_code`)
          Algorithm identification: name and version (the summary group has the parameters;
            repeating them per finding only lengthens the report)
          Image Region: closed POLYLINE (5 points) around the box, in image pixel coordinates,
            SELECTED FROM the exact source image (and frame)
          Certainty of Finding (DCM 111012) = the detector score, unit "no units" (UCUM 1)

Image coordinates follow DICOM: ``(0, 0)`` is the top-left corner of the top-left pixel and
``(Columns, Rows)`` the bottom-right corner of the last pixel, which is medrpn's own box convention,
so the polyline corners are the findings JSON's ``box_px`` values. The report is marked complete,
unverified and preliminary: it is a machine's proposal for a reader to confirm.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from medrpn.outputs.findings import ImageFindings, ModelInfo, write_atomically
from medrpn.outputs.references import derived_uid

PRIVATE_SCHEME = "99MEDRPN"
"""Coding scheme of classes without a standard code ("99" marks a private scheme in DICOM)."""

# Class names with a SNOMED CT concept of the same meaning (lower-case name -> code).
STANDARD_CLASS_CODES: dict[str, Code] = {
    "nodule": codes.SCT.Nodule,  # 27925004
    "mass": codes.SCT.Mass,  # 4147007
    "lesion": codes.SCT.Lesion,  # 52988006
}

SR_SERIES_NUMBER = 900
"""Series number of medrpn's SR series (series numbers need not be unique; this one stands out)."""

CERTAINTY = codes.DCM.CertaintyOfFinding
NO_UNITS = codes.UCUM.NoUnits


def class_code(name: str) -> Code:
    """The code of a class: SNOMED CT for names in `STANDARD_CLASS_CODES`, else a private code.

    A private code has the scheme `PRIVATE_SCHEME`, the class name as value and meaning (so that a
    viewer without the scheme still shows the name).
    """
    standard = STANDARD_CLASS_CODES.get(name.strip().lower())
    if standard is not None:
        return standard
    value = name.replace("\\", "/").strip() or "unnamed"
    return Code(value=value, scheme_designator=PRIVATE_SCHEME, meaning=value[:64])


def box_polyline(box: Sequence[float]) -> np.ndarray:
    """A closed polyline (5 ``(column, row)`` points, first = last) around ``[x1, y1, x2, y2]``."""
    x1, y1, x2, y2 = (float(v) for v in box)
    return np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2], [x1, y1]], dtype=np.float64)


def assign_tracking(images: Sequence[ImageFindings], model: ModelInfo) -> None:
    """Name every finding of a study, in place: ``tracking_id`` "<label> <n>" (n counts the study's
    findings in image order) and a ``tracking_uid`` derived from the model, image and finding, so
    that the findings JSON, the SR and the GSPS name each finding the same way. Values already set
    are kept.
    """
    number = 0
    for image in images:
        sop = image.uids.get("SOPInstanceUID") or image.source
        for index, finding in enumerate(image.findings):
            number += 1
            if finding.tracking_id is None:
                label = re.sub(r"[\\\r\n]", " ", finding.label)
                finding.tracking_id = f"{label} {number}"[:64]
            if finding.tracking_uid is None:
                finding.tracking_uid = derived_uid(
                    "finding", model.checkpoint_sha256, model.score_threshold, sop, image.frame, index
                )


def _algorithm(model: ModelInfo, parameters: bool = True) -> hd.sr.AlgorithmIdentification:
    """Name and version; with ``parameters`` also the checkpoint hash and the score threshold."""
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version or "unknown",
        parameters=[f"checkpoint sha256 {model.checkpoint_sha256}", f"score threshold {model.score_threshold:g}"]
        if parameters
        else None,
    )


def build_measurement_report(
    images: Sequence[tuple[Dataset, ImageFindings]],
    model: ModelInfo,
    *,
    all_succeeded: bool = True,
    whole_tree_to_constructor: bool = False,
) -> hd.sr.Comprehensive3DSR:
    """The SR document of one study (content described in this module's docstring).

    Args:
        images: every analysed image of the study as (reference header, findings); the header is
            `medrpn.outputs.references.reference_header` of the source file. All are recorded as
            evidence, those with findings are referenced by their regions.
        model: the model and threshold; also the source of the SR's deterministic UIDs.
        all_succeeded: False when some images of the study could not be analysed.
        whole_tree_to_constructor: hand the whole content tree to highdicom's document constructor
            instead of attaching it as built (`attach_content`): slower, the same document (a
            test checks that).

    Raises:
        ValueError: no images, or images from more than one study.
    """
    if not images:
        raise ValueError("a measurement report needs at least one image")
    studies = {str(header.StudyInstanceUID) for header, _ in images}
    if len(studies) != 1:
        raise ValueError(f"a measurement report covers one study, got {len(studies)}")
    study_uid = studies.pop()
    algorithm = _algorithm(model)
    finding_algorithm = _algorithm(model, parameters=False)

    any_findings = any(image.findings for _, image in images)
    summary_value = {
        (True, True): codes.DCM.AllAlgorithmsSucceededWithFindings,
        (True, False): codes.DCM.AllAlgorithmsSucceededWithoutFindings,
        (False, True): codes.DCM.NotAllAlgorithmsSucceededWithFindings,
        (False, False): codes.DCM.NotAllAlgorithmsSucceededWithoutFindings,
    }[(all_succeeded, any_findings)]
    groups: list = [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derived_uid("summary", model.checkpoint_sha256, model.score_threshold, study_uid),
                identifier="medrpn study summary",
            ),
            algorithm_id=algorithm,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=codes.DCM.CADProcessingAndFindingsSummary, value=summary_value)
            ],
        )
    ]

    assign_tracking([image for _, image in images], model)
    for header, image in images:
        frames = None if image.frame is None else [image.frame + 1]  # DICOM counts frames from 1
        for finding in image.findings:
            source = hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=header.SOPClassUID,
                referenced_sop_instance_uid=header.SOPInstanceUID,
                referenced_frame_numbers=frames,
            )
            groups.append(
                hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=finding.tracking_uid, identifier=finding.tracking_id
                    ),
                    referenced_region=hd.sr.ImageRegion(
                        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                        graphic_data=box_polyline(finding.rounded_box_px),
                        source_image=source,
                    ),
                    finding_type=class_code(finding.label),
                    finding_category=codes.SCT.MorphologicallyAbnormalStructure,
                    algorithm_id=finding_algorithm,
                    measurements=[
                        hd.sr.Measurement(name=CERTAINTY, value=round(finding.score, 4), unit=NO_UNITS)
                    ],
                )
            )

    sop_uids = sorted(str(header.SOPInstanceUID) for header, _ in images)
    document = report_document(
        [header for header, _ in images],
        groups,
        model,
        whole_tree_to_constructor=whole_tree_to_constructor,
        series_instance_uid=derived_uid("sr series", model.checkpoint_sha256, model.score_threshold, study_uid),
        sop_instance_uid=derived_uid("sr", model.checkpoint_sha256, model.score_threshold, model.version, *sop_uids),
    )
    name_private_scheme(document, [finding.label for _, image in images for finding in image.findings])
    return document


def report_document(
    evidence: Sequence[Dataset],
    groups: list,
    model: ModelInfo,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    whole_tree_to_constructor: bool = False,
) -> hd.sr.Comprehensive3DSR:
    """The SR document around measurement ``groups`` (the study summary first): a TID 1500 report
    observed by the device ``model``, recording ``evidence`` (reference headers) as the images it
    was made from; complete, unverified, preliminary.

    The content tree is attached as built (`attach_content`); with ``whole_tree_to_constructor``
    it goes through highdicom's constructor instead: slower, the same document (a test checks it).
    """
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", model.name, model.version),
            name=model.name,
            manufacturer_name=model.name,
            model_name=model.name,
        ),
    )

    def measurement_report(measurement_groups: list) -> hd.sr.MeasurementReport:
        return hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=device),
            procedure_reported=codes.SCT.ImagingProcedure,
            imaging_measurements=measurement_groups,
        )

    document = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=measurement_report(groups if whole_tree_to_constructor else groups[:1])[0],
        series_instance_uid=series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=model.name,
        is_complete=True,
        series_description="medrpn findings (SR)",
    )
    if not whole_tree_to_constructor:
        attach_content(document, measurement_report(groups)[0])
    return document


def attach_content(document: hd.sr.Comprehensive3DSR, root: hd.sr.ContentItem) -> None:
    """Make ``root`` (a TID 1500 root container built for this document alone) the content of
    ``document``, as highdicom's constructor does, without its deep copy and re-parse of the tree.

    highdicom's SR constructor deep-copies the content it is given (the caller may keep using
    it), parses the copy back into content items and searches it for the images it references
    (to check they are among the evidence). For a study with many findings that costs more than
    building the findings (about 0.2 s of 0.3 s per report of 10 findings, issue #23), and none of
    it is needed here: the tree is new and only ours, its items are highdicom's own, and every
    image it references is in the evidence by construction (`build_measurement_report` makes both
    from the same images, `medrpn.outputs.volume_sr.build_volume_report` from the same slices). So
    the document is built with the summary group alone, and the root's
    attributes are then set to the full tree's, exactly what the constructor does after copying.
    """
    for element in root:  # the root item's attributes: concept name, template, ContentSequence...
        document[element.tag] = element
    document._content = hd.sr.ContentSequence([root], is_root=True)  # what `document.content` returns


def name_private_scheme(document: Dataset, labels: Sequence[str]) -> None:
    """Names medrpn's private coding scheme in `document` when a class among `labels` is coded in
    it: a coding scheme that is not DICOM's own is named in the document (PS3.3 C.12.1.1.2)."""
    if any(class_code(label).scheme_designator == PRIVATE_SCHEME for label in labels):
        scheme = Dataset()
        scheme.CodingSchemeDesignator = PRIVATE_SCHEME
        scheme.CodingSchemeName = "medrpn class names"
        scheme.CodingSchemeResponsibleOrganization = "medrpn"
        document.CodingSchemeIdentificationSequence = [scheme]


def write_dicom(path: str | Path, dataset: Dataset) -> Path:
    """Write a DICOM file (with its file meta information) atomically: no reader sees half a file."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return write_atomically(path, buffer.getvalue())
