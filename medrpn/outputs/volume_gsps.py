"""Presentation states of a DICOM series' findings: each finding drawn on every slice it spans,
as `medrpn.outputs.gsps` draws findings on images (a box and a "<label> <score>" text per slice,
one graphic layer per class, the SR's tracking id and UID on each), so viewers without SR support
show them on the series itself.

The volume's findings are turned into findings per slice (`slice_findings`: the box in that
slice's own pixels, `medrpn.outputs.volume_sr.slice_boxes`) and handed to the image builder,
which groups slices by display settings as DICOM requires.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from medrpn.data.volume import VolumeGeometry
from medrpn.outputs.findings import Finding, ImageFindings, ModelInfo
from medrpn.outputs.gsps import build_presentation_states
from medrpn.outputs.volume_findings import VolumeFinding
from medrpn.outputs.volume_sr import assign_volume_tracking, slice_boxes


def slice_findings(
    slices: Sequence[Dataset], findings: Sequence[VolumeFinding], geometry: VolumeGeometry
) -> list[tuple[Dataset, ImageFindings]]:
    """Every slice of the series that a finding spans, with that finding's box in its pixels
    (tracking id and UID kept), in slice order."""
    per_slice: dict[int, list[Finding]] = {}
    for finding in findings:
        for k, box in slice_boxes(finding, geometry, len(slices)):
            per_slice.setdefault(k, []).append(
                Finding(finding.label, finding.score, box, tracking_id=finding.tracking_id, tracking_uid=finding.tracking_uid)
            )
    return [
        (
            slices[k],
            ImageFindings(
                source=f"slice {k}", height=int(slices[k].Rows), width=int(slices[k].Columns), spacing=None,
                findings=sorted(per_slice[k], key=lambda f: -f.score),
                uids={"SOPInstanceUID": str(slices[k].SOPInstanceUID)},
            ),
        )
        for k in sorted(per_slice)
    ]


def build_volume_presentation_states(
    slices: Sequence[Dataset], findings: Sequence[VolumeFinding], geometry: VolumeGeometry, model: ModelInfo
) -> tuple[list[hd.pr.GrayscaleSoftcopyPresentationState], list[str]]:
    """The presentation states of a series' findings (none without findings), and notes on
    slices no state can show (`medrpn.outputs.gsps.build_presentation_states`)."""
    if not slices:
        raise ValueError("presentation states need the series' slices")
    assign_volume_tracking(findings, model, str(slices[0].SeriesInstanceUID))
    return build_presentation_states(slice_findings(slices, findings, geometry), model)
