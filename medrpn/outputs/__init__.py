"""What a reader gets from `medrpn predict`, per study: findings JSON, DICOM SR and GSPS, overlay PNGs.

This is the edge where pixel boxes also get millimetres and DICOM image coordinates (see
`medrpn.outputs.findings` for the schema and coordinate conventions). One concept per module:

* `findings`: `Finding`, `ImageFindings`, `ModelInfo`, the findings JSON (versioned schema);
* `overlay`: the overlay PNG;
* `references`: the reduced copy of a source DICOM header that outputs reference (no more
  patient data than filing needs) and deterministic output UIDs;
* `sr`: the TID 1500 measurement report (highdicom);
* `gsps`: grayscale softcopy presentation states (highdicom);
* `study`: writes one study's outputs, never replacing existing ones unasked.
"""

from medrpn.outputs.findings import (
    FINDINGS_SCHEMA_VERSION,
    Finding,
    ImageFindings,
    ModelInfo,
    make_findings,
    write_findings_json,
)
from medrpn.outputs.overlay import write_overlay_png

__all__ = [
    "FINDINGS_SCHEMA_VERSION",
    "Finding",
    "ImageFindings",
    "ModelInfo",
    "make_findings",
    "write_findings_json",
    "write_overlay_png",
]
