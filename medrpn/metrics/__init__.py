"""Evaluation metrics: FROC / CPM under two hit rules, COCO mAP, proposal recall by lesion size,
bootstrap intervals, the operating point, and the DetectionMetrics wrapper for training.

Pure functions live in ``froc``, ``coco``, ``proposals``, ``bootstrap`` and ``operating_point``;
``report`` turns gathered arrays into every figure; ``detection`` is the torchmetrics wrapper
that gathers them across batches and DDP ranks.
"""

from medrpn.metrics.bootstrap import FrocIntervals, bootstrap_froc
from medrpn.metrics.coco import CocoResult, coco_average_precision, faster_coco_eval_average_precision
from medrpn.metrics.detection import DetectionMetrics, patient_hash
from medrpn.metrics.froc import (
    FP_RATES,
    HIT_RULES,
    cpm,
    froc_curve,
    froc_points,
    hit_matrix,
    match_image,
)
from medrpn.metrics.operating_point import OperatingPoint, pick_operating_point, rates_at_threshold
from medrpn.metrics.proposals import PROPOSAL_TOP_KS, best_proposal_iou, proposal_hits, proposal_recall
from medrpn.metrics.report import DetectionRecords, EvaluationReport, evaluate_records, froc_key

__all__ = [
    "FP_RATES",
    "HIT_RULES",
    "PROPOSAL_TOP_KS",
    "CocoResult",
    "DetectionMetrics",
    "DetectionRecords",
    "EvaluationReport",
    "FrocIntervals",
    "OperatingPoint",
    "best_proposal_iou",
    "bootstrap_froc",
    "coco_average_precision",
    "cpm",
    "evaluate_records",
    "faster_coco_eval_average_precision",
    "froc_curve",
    "froc_key",
    "froc_points",
    "hit_matrix",
    "match_image",
    "patient_hash",
    "pick_operating_point",
    "proposal_hits",
    "proposal_recall",
    "rates_at_threshold",
]
