"""What a reader gets from `medrpn predict`, per image: findings as JSON and an overlay PNG.

This is the edge where pixel boxes also get millimetres (see `medrpn.outputs.findings` for the
schema and coordinate conventions). Pure numpy/PIL: callers convert tensors to numpy first.
DICOM outputs (SR/GSPS) will live beside these modules, built from the same `Finding`s.
"""

from medrpn.outputs.findings import FINDINGS_SCHEMA_VERSION, Finding, make_findings, write_findings_json
from medrpn.outputs.overlay import write_overlay_png

__all__ = ["FINDINGS_SCHEMA_VERSION", "Finding", "make_findings", "write_findings_json", "write_overlay_png"]
