"""The operating point: the score threshold a deployed detector uses.

A radiologist tolerates a number of false positives per image; the threshold is picked on the
validation split as the lowest score threshold whose false positives per image do not exceed
that target (so it finds as many lesions as the budget allows), the way nnDetection sweeps
thresholds on validation data. Unlike the interpolated FROC points, this is a threshold that
really exists: applied to the same predictions it gives exactly the reported FP rate and
sensitivity (``rates_at_threshold``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from torch import Tensor

from medrpn.metrics.froc import check_n_images, froc_counts


@dataclass(frozen=True)
class OperatingPoint:
    """A score threshold and what it achieved on the data it was picked on.

    Attributes:
        score_threshold: keep predictions scoring at least this.
        fp_per_image: false positives per image at that threshold.
        sensitivity: fraction of lesions found at that threshold (nan without lesions).
        target_fp_per_image: the budget it was picked for.
    """

    score_threshold: float
    fp_per_image: float
    sensitivity: float
    target_fp_per_image: float

    def as_dict(self) -> dict[str, float]:
        """Plain floats, for a checkpoint that loads with ``torch.load(weights_only=True)``."""
        return {key: float(value) for key, value in asdict(self).items()}


def pick_operating_point(
    gt_best_scores: Tensor, fp_scores: Tensor, n_images: int, target_fp_per_image: float = 1.0
) -> OperatingPoint:
    """The lowest score threshold with at most ``target_fp_per_image`` false positives per image.

    Args:
        gt_best_scores: (G,) best hitting score per lesion (``-inf`` if never hit).
        fp_scores: (F,) false-positive scores.
        n_images: number of images, including those without lesions.
        target_fp_per_image: the false-positive budget (>= 0).

    Returns:
        The operating point. When even the highest score breaks the budget, the threshold lies
        just above it (nothing is kept); with no predictions at all it is 0.
    """
    n = check_n_images(n_images)
    if target_fp_per_image < 0:
        raise ValueError(f"target_fp_per_image must be >= 0, got {target_fp_per_image}")
    thresholds, fp_counts, tp_counts = froc_counts(gt_best_scores, fp_scores)
    n_gt = gt_best_scores.numel()
    within = (fp_counts <= target_fp_per_image * n).nonzero().flatten()
    if within.numel():  # counts grow as the threshold falls: the last one within budget is the lowest
        i = int(within[-1])
        threshold, fps, tps = float(thresholds[i]), int(fp_counts[i]), int(tp_counts[i])
    elif thresholds.numel():
        # just above the top score, in float32: scores are float32 and compare in float32
        threshold, fps, tps = float(np.nextafter(np.float32(thresholds[0]), np.float32(np.inf))), 0, 0
    else:
        threshold, fps, tps = 0.0, 0, 0
    return OperatingPoint(
        score_threshold=threshold,
        fp_per_image=fps / n,
        sensitivity=tps / n_gt if n_gt else math.nan,
        target_fp_per_image=float(target_fp_per_image),
    )


def rates_at_threshold(gt_best_scores: Tensor, fp_scores: Tensor, n_images: int, score_threshold: float) -> tuple[float, float]:
    """``(fp_per_image, sensitivity)`` when keeping predictions scoring at least ``score_threshold``."""
    n = check_n_images(n_images)
    fps = int((fp_scores >= score_threshold).sum())
    n_gt = gt_best_scores.numel()
    tps = int((gt_best_scores >= score_threshold).sum())
    return fps / n, (tps / n_gt if n_gt else math.nan)
