"""Validation metrics: FROC / CPM, proposal recall, and the DetectionMetrics wrapper for training."""

from medrpn.metrics.detection import DetectionMetrics, froc_key
from medrpn.metrics.froc import FP_RATES, cpm, froc_curve, froc_points, match_image
from medrpn.metrics.proposals import proposal_hits

__all__ = [
    "FP_RATES",
    "DetectionMetrics",
    "cpm",
    "froc_curve",
    "froc_key",
    "froc_points",
    "match_image",
    "proposal_hits",
]
