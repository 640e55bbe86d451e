"""Grayscale Softcopy Presentation States: the findings as boxes and labels any DICOM viewer draws.

Viewers without structured-report support still apply presentation states, so each finding is
also a graphic annotation: a closed POLYLINE around its box (in image pixel coordinates, the same
numbers as the findings JSON and the SR) and a text "<label> <score>" just above it, on one graphic
layer per class (named after the class, coloured like the overlay PNG, so a viewer can switch a
class on and off). Each box and text carries the finding's tracking id and UID from the SR.

One presentation state covers the images of a study that have findings, grouped so that each
group can be displayed with one set of display settings (DICOM requires equal size and modality
LUT within a presentation state): same rows, columns, photometric interpretation and rescale.
Each state keeps the source images' own modality LUT and window (copied by highdicom) and, for
MONOCHROME1 images, an INVERSE presentation LUT, so the image looks as it does without it.
Colour images and multi-frame images get no presentation state (GSPS is for single-frame
grayscale images); `build_presentation_states` says so in its notes.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from medrpn.outputs.findings import Finding, ImageFindings, ModelInfo
from medrpn.outputs.overlay import class_colour
from medrpn.outputs.references import derived_uid
from medrpn.outputs.sr import assign_tracking, box_polyline

GSPS_SERIES_NUMBER = 901
"""Series number of medrpn's presentation-state series."""

CONTENT_LABEL = "MEDRPN"


def layer_names(class_names: Sequence[str]) -> list[str]:
    """A graphic layer name per class: the name as a DICOM code string (A-Z, 0-9, space, _; at most
    16 characters, starting with a letter), else ``CLASS <index>``; unique."""
    names: list[str] = []
    for index, name in enumerate(class_names):
        text = re.sub(r"[^A-Z0-9 _]", "_", name.upper())[:16].strip(" _")
        if not re.match(r"[A-Z]", text) or text in names:
            text = f"CLASS {index}"
        names.append(text)
    return names


def _label_box(finding: Finding, rows: int, columns: int, text: str) -> tuple[float, float, float, float]:
    """Where the label text goes: a box just above the finding (inside it at the top edge), in the image."""
    height = float(min(rows, max(12, round(max(rows, columns) / 45))))
    width = float(min(columns, max(1.0, 0.6 * height * len(text))))
    x1, y1, _, _ = finding.rounded_box_px
    top = y1 - height if y1 - height >= 0 else y1
    top = max(0.0, min(top, rows - height))
    left = max(0.0, min(x1, columns - width))
    return (left, top, left + width, top + height)


def _group_key(header: Dataset) -> tuple:
    return (
        int(header.Rows),
        int(header.Columns),
        str(header.get("PhotometricInterpretation", "")),
        str(header.get("RescaleSlope", "")),
        str(header.get("RescaleIntercept", "")),
        str(header.get("RescaleType", "")),
        "ModalityLUTSequence" in header,
    )


def build_presentation_states(
    images: Sequence[tuple[Dataset, ImageFindings]], model: ModelInfo
) -> tuple[list[hd.pr.GrayscaleSoftcopyPresentationState], list[str]]:
    """The presentation states of one study's findings, and notes on images left out.

    Args:
        images: the analysed images of the study as (reference header, findings); images without
            findings are not referenced.
        model: the model and threshold (class names for the layers; the states' deterministic UIDs).

    Returns:
        ``(states, notes)``: states in a stable order (by image order of their first image);
        notes name the images with findings that no state shows, and why.
    """
    assign_tracking([image for _, image in images], model)
    notes: list[str] = []
    groups: dict[tuple, list[tuple[Dataset, ImageFindings]]] = defaultdict(list)
    for header, image in images:
        if not image.findings:
            continue
        why = None
        if int(header.get("SamplesPerPixel", 1)) != 1:
            why = "colour image"
        elif "NumberOfFrames" in header:
            why = "multi-frame image"
        if why is None:
            groups[_group_key(header)].append((header, image))
            continue
        note = f"{image.source}: {why}, its findings are in the SR and overlays only (no GSPS)"
        if note not in notes:  # once per file, not per frame
            notes.append(note)

    names = list(model.class_names)
    layers = [
        hd.pr.GraphicLayer(
            layer_name=layer,
            order=index + 1,
            description=name[:64],
            display_color=hd.color.CIELabColor.from_rgb(*class_colour(index)),
        )
        for index, (layer, name) in enumerate(zip(layer_names(names), names))
    ]
    states = []
    for members in groups.values():
        study_uid = str(members[0][0].StudyInstanceUID)
        sop_uids = sorted(str(header.SOPInstanceUID) for header, _ in members)
        annotations = []
        for header, image in members:
            by_class: dict[int, list[Finding]] = defaultdict(list)
            for finding in image.findings:
                by_class[names.index(finding.label)].append(finding)
            for index in sorted(by_class):
                annotations.append(
                    hd.pr.GraphicAnnotation(
                        referenced_images=[header],
                        graphic_layer=layers[index],
                        graphic_objects=[
                            hd.pr.GraphicObject(
                                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                                graphic_data=box_polyline(f.rounded_box_px),
                                units=hd.pr.AnnotationUnitsValues.PIXEL,
                                tracking_id=f.tracking_id,
                                tracking_uid=f.tracking_uid,
                            )
                            for f in by_class[index]
                        ],
                        text_objects=[
                            hd.pr.TextObject(
                                text_value=f"{f.label} {f.score:.2f}",
                                units=hd.pr.AnnotationUnitsValues.PIXEL,
                                bounding_box=_label_box(
                                    f, int(header.Rows), int(header.Columns), f"{f.label} {f.score:.2f}"
                                ),
                                tracking_id=f.tracking_id,
                                tracking_uid=f.tracking_uid,
                            )
                            for f in by_class[index]
                        ],
                    )
                )
        used_layers = sorted({names.index(f.label) for _, image in members for f in image.findings})
        sides = {str(h.get("Laterality") or h.get("ImageLaterality") or "") for h, _ in members}
        inverse = members[0][0].get("PhotometricInterpretation") == "MONOCHROME1"
        shape = hd.PresentationLUTShapeValues.INVERSE if inverse else hd.PresentationLUTShapeValues.IDENTITY
        states.append(
            hd.pr.GrayscaleSoftcopyPresentationState(
                referenced_images=[header for header, _ in members],
                series_instance_uid=derived_uid(
                    "gsps series", model.checkpoint_sha256, model.score_threshold, study_uid
                ),
                series_number=GSPS_SERIES_NUMBER,
                sop_instance_uid=derived_uid(
                    "gsps", model.checkpoint_sha256, model.score_threshold, model.version, *sop_uids
                ),
                instance_number=len(states) + 1,
                manufacturer=model.name,
                manufacturer_model_name=model.name,
                software_versions=model.version or "unknown",
                device_serial_number="",
                content_label=CONTENT_LABEL,
                content_description="medrpn findings",
                graphic_annotations=annotations,
                graphic_layers=[layers[i] for i in used_layers],
                presentation_lut_transformation=hd.PresentationLUTTransformation(presentation_lut_shape=shape),
                series_description="medrpn findings (GSPS)",
            )
        )
        # General Series needs Laterality (Type 2C): the images' side when they agree on one,
        # else empty (unknown)
        states[-1].Laterality = sides.pop() if len(sides) == 1 and sides <= {"R", "L"} else ""
    return states, notes
