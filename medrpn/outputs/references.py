"""The few attributes of a source DICOM image that outputs referencing it need, and nothing else.

A structured report or presentation state about an image must be filed with the same patient and
study, and must name the image it is about. highdicom copies every Patient and Study attribute of
the image it is given (age, weight, other ids, study description, ...); to keep outputs from
carrying more patient data than referencing needs, it is given this reduced copy instead.

Kept from the source:

* to file the output with the patient and study: ``PatientName``, ``PatientID``,
  ``StudyInstanceUID``, ``StudyID``, ``AccessionNumber``, ``StudyDate``, ``StudyTime``
  (Patient and General Study attributes of Type 1/2; ``SpecificCharacterSet`` to decode them);
* to name the image: ``SOPClassUID``, ``SOPInstanceUID``, ``SeriesInstanceUID``, ``Modality``;
* to show it as the source does (presentation state): its size, photometry, pixel spacing,
  modality LUT and VOI (window or LUT).

The other Type 2 attributes that every DICOM object must carry (``PatientBirthDate``,
``PatientSex``, ``ReferringPhysicianName``) are written empty: they identify the patient (or a
doctor) beyond what filing and referencing need.
"""

from __future__ import annotations

import uuid

from pydicom.dataset import Dataset

# Patient/study identifiers: copied when present, written empty when absent (Type 2 in DICOM).
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "StudyInstanceUID",
    "StudyID",
    "AccessionNumber",
    "StudyDate",
    "StudyTime",
)

# Type 2 attributes that are written empty, never copied.
EMPTY_KEYWORDS: tuple[str, ...] = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName")

# What identifies the image and how it is displayed: no patient data among them.
IMAGE_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Laterality",
    "ImageLaterality",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
)

# Needed to name an image in an SR or presentation state.
REQUIRED_UIDS: tuple[str, ...] = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def reference_header(source: Dataset) -> Dataset:
    """A new dataset with only the attributes listed in this module's docstring, copied from ``source``.

    ``source`` may be read with ``stop_before_pixels=True``: pixel data is never needed.
    """
    header = Dataset()
    for keyword in IMAGE_KEYWORDS + PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            header[keyword] = source[keyword]
    for keyword in PATIENT_STUDY_KEYWORDS + EMPTY_KEYWORDS:
        if keyword not in header:
            setattr(header, keyword, "")
    return header


def missing_uids(header: Dataset) -> list[str]:
    """The UIDs among ``REQUIRED_UIDS`` that ``header`` lacks (an SR/GSPS cannot reference it then)."""
    return [k for k in REQUIRED_UIDS if not str(header.get(k) or "").strip()]


def derived_uid(*parts: object) -> str:
    """A UID (``2.25.<integer>``) that is a hash of ``parts``: the same inputs give the same UID.

    Outputs are named this way (SR, GSPS, their series, each finding's tracking UID) so that running
    the same checkpoint, threshold and software on the same images reproduces the same UIDs: a
    re-sent report replaces its earlier copy in a PACS instead of standing beside it.
    """
    name = "\x1f".join(["medrpn", *(str(p) for p in parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"
