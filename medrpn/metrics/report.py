"""Every figure of an evaluation, computed from the flat arrays gathered over a split.

``DetectionRecords`` is what ``DetectionMetrics`` accumulates (per image, per prediction, per
lesion; matching under the FROC hit rule is already done), and ``evaluate_records`` turns it into
an ``EvaluationReport``: the scalars logged to MLflow, the curves behind the plots, the
bootstrap intervals and the operating point. Pure numpy/torch, no Lightning.

Scalar names (all valid MLflow metric names):
- ``froc_0.125fp`` ... ``froc_8fp``, ``cpm``: class-agnostic FROC (a lesion found by a box of
  any class) and, with several classes, ``<class>/froc_1fp``, ``<class>/cpm`` ... per class
  (a class's lesions, its predictions; FPs on every image);
- ``cpm_iou50``: the class-agnostic CPM with a hit at IoU >= 0.5, whatever the chosen hit rule,
  so that figures compare with nnDetection's and DeepLesion's (IoU 0.5);
- ``froc_<r>fp_ci_low`` / ``_ci_high``, ``cpm_ci_low`` / ``_ci_high``: bootstrap interval, when asked;
- ``map10``, ``map50``, ``map50_95``: COCO mAP at IoU 0.1, 0.5 and averaged over 0.5:0.95
  (and ``<class>/map...`` per class);
- ``rpn_recall{10,50,100,300,1000}``, ``rpn_ar100`` and the same with ``_small`` / ``_medium`` /
  ``_large`` (see ``medrpn.metrics.proposals``);
- ``op_score_threshold``, ``op_fp_per_image``, ``op_sensitivity``: the operating point.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from medrpn.metrics.bootstrap import FrocIntervals, bootstrap_froc
from medrpn.metrics.coco import RECALL_THRESHOLDS, coco_average_precision
from medrpn.metrics.froc import FP_RATES, cpm, froc_curve, froc_points
from medrpn.metrics.operating_point import OperatingPoint, pick_operating_point, rates_at_threshold
from medrpn.metrics.proposals import PROPOSAL_TOP_KS, SIZE_BINS_MM, SIZE_BINS_PX, proposal_recall


def froc_key(rate: float) -> str:
    """Metric name of the sensitivity at ``rate`` FP per image, e.g. ``froc_0.125fp``, ``froc_1fp``."""
    return f"froc_{rate:g}fp"


def metric_safe(name: str) -> str:
    """``name`` with the characters MLflow refuses in metric names replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_\-. ]", "_", name) or "_"


@dataclass
class DetectionRecords:
    """Flat numpy arrays describing predictions and lesions of N images.

    Per image: ``image_group`` (N,) patient index 0..P-1 (the bootstrap unit).
    Per prediction: ``pred_image``, ``pred_box`` (M, 4) xyxy, ``pred_score``, ``pred_label``,
    ``pred_fp_any`` (hits no lesion), ``pred_fp_cls`` (hits no lesion of its class),
    ``pred_fp_iou50`` (overlaps no lesion at IoU >= 0.5).
    Per lesion: ``gt_image``, ``gt_box``, ``gt_label``, ``gt_best_any`` / ``gt_best_cls`` /
    ``gt_best_iou50`` (score of the prediction credited with it, of any class / of its class /
    of any class at IoU >= 0.5, ``-inf`` if none), ``gt_size_px``,
    ``gt_size_mm`` (nan if unknown), ``gt_proposal_iou`` (G, len(top_ks)) (nan if no proposals).
    """

    image_group: np.ndarray
    pred_image: np.ndarray
    pred_box: np.ndarray
    pred_score: np.ndarray
    pred_label: np.ndarray
    pred_fp_any: np.ndarray
    pred_fp_cls: np.ndarray
    pred_fp_iou50: np.ndarray
    gt_image: np.ndarray
    gt_box: np.ndarray
    gt_label: np.ndarray
    gt_best_any: np.ndarray
    gt_best_cls: np.ndarray
    gt_best_iou50: np.ndarray
    gt_size_px: np.ndarray
    gt_size_mm: np.ndarray
    gt_proposal_iou: np.ndarray

    @property
    def n_images(self) -> int:
        return len(self.image_group)


@dataclass
class EvaluationReport:
    """The figures of one evaluation (see the module docstring for the scalar names).

    Attributes:
        scalars: name -> value (nan where there is nothing to measure).
        class_names: class names, in label order.
        settings: how it was measured (hit rule, counts, size unit, ...).
        froc: name ("all" or a class) -> (fp_per_image, sensitivity) arrays of the full curve.
        intervals: bootstrap intervals of the class-agnostic FROC, or None.
        precision_recall: class -> precision at ``RECALL_THRESHOLDS`` for IoU 0.5 (None if no lesions).
        proposal_curves: "all" / size -> recall at IoU 0.5 for each of ``proposal_top_ks``.
        proposal_top_ks: the numbers of proposals of ``proposal_curves``.
        operating_point: picked or applied operating point, or None.
    """

    scalars: dict[str, float]
    class_names: list[str]
    settings: dict[str, Any]
    froc: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    intervals: FrocIntervals | None = None
    precision_recall: dict[str, np.ndarray | None] = field(default_factory=dict)
    proposal_curves: dict[str, list[float]] = field(default_factory=dict)
    proposal_top_ks: tuple[int, ...] = PROPOSAL_TOP_KS
    operating_point: OperatingPoint | None = None

    def to_table(self) -> str:
        """A plain-text table of the figures, for the terminal and the run's artifacts."""
        return format_table(self)

    def to_json(self) -> str:
        """Everything as JSON (nan written as null)."""

        def clean(value: Any) -> Any:
            if isinstance(value, dict):
                return {str(k): clean(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [clean(v) for v in value]
            if isinstance(value, np.ndarray):
                return clean(value.tolist())
            if isinstance(value, float) and not math.isfinite(value):
                return None
            if isinstance(value, (np.floating, np.integer)):
                return clean(value.item())
            return value

        data = {
            "scalars": self.scalars,
            "class_names": self.class_names,
            "settings": self.settings,
            "froc": {k: {"fp_per_image": x, "sensitivity": y} for k, (x, y) in self.froc.items()},
            "precision_recall": {"recall": RECALL_THRESHOLDS, "precision_iou50": self.precision_recall},
            "proposal_recall": {"top_k": list(self.proposal_top_ks), "recall_iou50": self.proposal_curves},
            "operating_point": self.operating_point.as_dict() if self.operating_point else None,
        }
        if self.intervals is not None:
            iv = self.intervals
            data["intervals"] = {
                "rates": iv.rates, "low": iv.low, "high": iv.high, "cpm_low": iv.cpm_low, "cpm_high": iv.cpm_high,
                "band_rates": iv.band_rates, "band_low": iv.band_low, "band_high": iv.band_high,
                "n_resamples": iv.n_resamples, "confidence": iv.confidence,
            }
        return json.dumps(clean(data), indent=1)


def _froc_of(gt_best: np.ndarray, fp_scores: np.ndarray, n_images: int) -> tuple[dict[float, float], tuple[np.ndarray, np.ndarray]]:
    gt, fp = torch.from_numpy(gt_best.astype(np.float64)), torch.from_numpy(fp_scores.astype(np.float64))
    x, y = froc_curve(gt, fp, n_images)
    return froc_points(gt, fp, n_images), (x.numpy(), y.numpy())


def evaluate_records(
    records: DetectionRecords,
    class_names: list[str],
    hit_rule: str = "iou",
    iou_threshold: float = 0.3,
    n_bootstrap: int = 0,
    confidence: float = 0.95,
    seed: int = 0,
    target_fp_per_image: float | None = None,
    score_threshold: float | None = None,
    proposal_top_ks: tuple[int, ...] = PROPOSAL_TOP_KS,
) -> EvaluationReport:
    """All figures of ``records``.

    Args:
        records: the gathered arrays.
        class_names: class names in label order (per-class figures appear with two or more).
        hit_rule, iou_threshold: the FROC hit rule used when matching (recorded in the settings).
        n_bootstrap: bootstrap resamples for intervals (0: none).
        confidence, seed: of the bootstrap.
        target_fp_per_image: pick the operating point for this FP budget, or
        score_threshold: apply this given threshold instead (it wins when both are given).
        proposal_top_ks: the numbers of proposals of ``records.gt_proposal_iou``'s columns.
    """
    r = records
    n = r.n_images
    scalars: dict[str, float] = {}
    froc: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    fp_any = r.pred_score[r.pred_fp_any.astype(bool)]
    if n:
        points, froc["all"] = _froc_of(r.gt_best_any, fp_any, n)
    else:
        points = {rate: math.nan for rate in FP_RATES}
    scalars.update({froc_key(rate): v for rate, v in points.items()})
    scalars["cpm"] = cpm(points)
    if n:
        points50, _ = _froc_of(r.gt_best_iou50, r.pred_score[r.pred_fp_iou50.astype(bool)], n)
        scalars["cpm_iou50"] = cpm(points50)
    else:
        scalars["cpm_iou50"] = math.nan

    n_classes = len(class_names)
    coco = coco_average_precision(
        r.pred_image, r.pred_box, r.pred_score, r.pred_label, r.gt_image, r.gt_box, r.gt_label, n_classes
    )
    scalars["map10"] = coco.average_precision(0.1)
    scalars["map50"] = coco.average_precision(0.5)
    scalars["map50_95"] = coco.average_precision()
    iou50 = int(np.flatnonzero(np.isclose(coco.iou_thresholds, 0.5))[0])
    precision_recall: dict[str, np.ndarray | None] = {}
    for k, name in enumerate(class_names):
        p = coco.precision[iou50, :, k]
        precision_recall[name] = None if (p < 0).all() else p
        if n_classes > 1 and n:
            key = metric_safe(name)
            fp_k = r.pred_score[r.pred_fp_cls.astype(bool) & (r.pred_label == k)]
            pts, froc[name] = _froc_of(r.gt_best_cls[r.gt_label == k], fp_k, n)
            scalars.update({f"{key}/{froc_key(rate)}": v for rate, v in pts.items()})
            scalars[f"{key}/cpm"] = cpm(pts)
            scalars[f"{key}/map10"] = coco.average_precision(0.1, k)
            scalars[f"{key}/map50"] = coco.average_precision(0.5, k)
            scalars[f"{key}/map50_95"] = coco.average_precision(None, k)

    rpn, proposal_curves, size_unit = proposal_recall(r.gt_proposal_iou, r.gt_size_px, r.gt_size_mm, proposal_top_ks)
    scalars.update(rpn)

    intervals = None
    if n_bootstrap > 0 and n:
        intervals = bootstrap_froc(
            r.gt_best_any, r.image_group[r.gt_image], fp_any, r.image_group[r.pred_image[r.pred_fp_any.astype(bool)]],
            r.image_group, n_resamples=n_bootstrap, confidence=confidence, seed=seed,
        )
        for rate, lo, hi in zip(intervals.rates, intervals.low, intervals.high):
            scalars[f"{froc_key(rate)}_ci_low"], scalars[f"{froc_key(rate)}_ci_high"] = float(lo), float(hi)
        scalars["cpm_ci_low"], scalars["cpm_ci_high"] = intervals.cpm_low, intervals.cpm_high

    operating_point = None
    if n and (score_threshold is not None or target_fp_per_image is not None):
        gt, fp = torch.from_numpy(r.gt_best_any.astype(np.float64)), torch.from_numpy(fp_any.astype(np.float64))
        if score_threshold is not None:
            fp_rate, sens = rates_at_threshold(gt, fp, n, score_threshold)
            target = math.nan if target_fp_per_image is None else target_fp_per_image
            operating_point = OperatingPoint(float(score_threshold), fp_rate, sens, float(target))
        else:
            operating_point = pick_operating_point(gt, fp, n, float(target_fp_per_image))
        scalars["op_score_threshold"] = operating_point.score_threshold
        scalars["op_fp_per_image"] = operating_point.fp_per_image
        scalars["op_sensitivity"] = operating_point.sensitivity

    settings = {
        "spatial_dims": int(r.gt_box.shape[1] // 2) if r.gt_box.ndim == 2 else 2,  # 3: counted per scan
        "hit_rule": hit_rule,
        "iou_threshold": iou_threshold,
        "n_images": n,
        "n_patients": int(r.image_group.max()) + 1 if n else 0,
        "n_lesions": len(r.gt_label),
        "n_predictions": len(r.pred_label),
        "size_unit": size_unit,
        "size_bins": list(SIZE_BINS_MM if size_unit == "mm" else SIZE_BINS_PX),
        "n_bootstrap": n_bootstrap if intervals is not None else 0,
        "confidence": confidence,
    }
    return EvaluationReport(
        scalars=scalars,
        class_names=list(class_names),
        settings=settings,
        froc=froc,
        intervals=intervals,
        precision_recall=precision_recall,
        proposal_curves=proposal_curves,
        proposal_top_ks=tuple(proposal_top_ks),
        operating_point=operating_point,
    )


def hit_rule_label(hit_rule: str, iou_threshold: float) -> str:
    """What a FROC hit rule is, in words: ``IoU >= 0.3`` or LUNA16's centre rule."""
    return f"IoU >= {iou_threshold:g}" if hit_rule == "iou" else "centre within lesion radius (LUNA16)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def format_table(report: EvaluationReport) -> str:
    """The report as aligned plain text."""
    s, st = report.scalars, report.settings
    rule = hit_rule_label(st["hit_rule"], st["iou_threshold"])
    volumes = st.get("spatial_dims", 2) == 3
    unit = "scan" if volumes else "image"
    lines = [
        f"{st['n_images']} {unit}s ({st['n_patients']} patients), {st['n_lesions']} lesions, "
        f"{st['n_predictions']} predictions; FROC hit rule: {rule}{' (3D)' if volumes else ''}; a prediction "
        f"credits at most one lesion; false positives counted per {'scan' if volumes else '2D image'}",
        "",
    ]
    ci = report.intervals is not None
    header = f"{'FP per ' + unit:<14}" + "".join(f"{r:>8g}" for r in FP_RATES) + f"{'CPM':>8}"
    lines.append("FROC sensitivity" + (f" (bootstrap {int(report.intervals.confidence * 100)}% interval over "
                                        f"{report.intervals.n_resamples} patient resamples)" if ci else ""))
    lines.append(header)
    names = ["all"] + (report.class_names if len(report.class_names) > 1 else [])
    for name in names:
        prefix = "" if name == "all" else f"{metric_safe(name)}/"
        row = [s.get(f"{prefix}{froc_key(r)}", math.nan) for r in FP_RATES] + [s.get(f"{prefix}cpm", math.nan)]
        lines.append(f"{name:<14}" + "".join(f"{_fmt(v):>8}" for v in row))
        if name == "all" and ci:
            lows = [s[f"{froc_key(r)}_ci_low"] for r in FP_RATES] + [s["cpm_ci_low"]]
            highs = [s[f"{froc_key(r)}_ci_high"] for r in FP_RATES] + [s["cpm_ci_high"]]
            lines.append(f"{'  95% low':<14}" + "".join(f"{_fmt(v):>8}" for v in lows))
            lines.append(f"{'  95% high':<14}" + "".join(f"{_fmt(v):>8}" for v in highs))
    lines.append(f"{'CPM at IoU >= 0.5 (all classes)':<40}{_fmt(s.get('cpm_iou50', math.nan)):>8}")
    lines += ["", f"{'mAP':<14}{'IoU 0.1':>10}{'IoU 0.5':>10}{'0.5:0.95':>10}"]
    for name in names:
        prefix = "" if name == "all" else f"{metric_safe(name)}/"
        lines.append(f"{name:<14}" + "".join(f"{_fmt(s.get(f'{prefix}{k}', math.nan)):>10}" for k in ("map10", "map50", "map50_95")))
    ks = report.proposal_top_ks
    lines += _proposal_lines(s, st, ks)
    op = report.operating_point
    if op is not None:
        lines += ["", f"Operating point: score >= {op.score_threshold:.4g} gives {op.fp_per_image:.3f} FP/{unit}, "
                  f"sensitivity {_fmt(op.sensitivity)}"
                  + (f" (target {op.target_fp_per_image:g} FP/{unit})" if math.isfinite(op.target_fp_per_image) else "")]
    return "\n".join(lines)


def _proposal_lines(s: dict[str, float], st: dict, ks: tuple[int, ...]) -> list[str]:
    lines = ["", f"RPN proposal recall at IoU 0.5 (lesion size in {st['size_unit']}: small < {st['size_bins'][0]:g} "
              f"<= medium < {st['size_bins'][1]:g} <= large)",
              f"{'top-k':<14}" + "".join(f"{k:>8}" for k in ks) + f"{'AR@100':>8}"]
    for name in ("all", "small", "medium", "large"):
        suffix = "" if name == "all" else f"_{name}"
        row = [s.get(f"rpn_recall{k}{suffix}", math.nan) for k in ks] + [s.get(f"rpn_ar100{suffix}", math.nan)]
        lines.append(f"{name:<14}" + "".join(f"{_fmt(v):>8}" for v in row))
    return lines
