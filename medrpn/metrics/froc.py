"""FROC (free-response ROC) analysis: lesion sensitivity against false positives per image.

Radiology reports detection quality as the sensitivity reached at a few average numbers of
false positives per image (FP rates 1/8 ... 8), and their mean, the Competition Performance
Metric (CPM) of LUNA16 and DeepLesion.

Matching convention (DeepLesion / LUNA16): a prediction *hits* a ground-truth lesion when
their IoU is at least the threshold. Each lesion is counted once, at the best score of the
predictions hitting it. A prediction that hits any lesion is never a false positive, so a
second prediction on an already-found lesion is neither a hit nor a false positive.
Predictions hitting no lesion are false positives, including every prediction on an image
without lesions (which still counts in the number of images).

The work is split so it can be accumulated across batches and devices as flat tensors:
``match_image`` per image, then ``froc_curve`` / ``froc_points`` over everything gathered.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def match_image(
    pred_boxes: Tensor, pred_scores: Tensor, gt_boxes: Tensor, iou_threshold: float = 0.3
) -> tuple[Tensor, Tensor]:
    """Match one image's predictions to its ground-truth lesions.

    Args:
        pred_boxes: (N, 4) predicted boxes, absolute pixel xyxy.
        pred_scores: (N,) confidence of each prediction.
        gt_boxes: (G, 4) ground-truth boxes, absolute pixel xyxy.
        iou_threshold: minimum IoU for a prediction to hit a lesion.

    Returns:
        ``gt_best_score`` (G,): for each lesion the highest score of a prediction hitting it,
        or ``-inf`` when none does; ``fp_scores`` (F,): scores of the predictions hitting no
        lesion. Both float32, on the device of ``pred_scores``.
    """
    if pred_boxes.ndim != 2 or pred_boxes.shape[-1] != 4:
        raise ValueError(f"pred_boxes must have shape (N, 4), got {tuple(pred_boxes.shape)}")
    if gt_boxes.ndim != 2 or gt_boxes.shape[-1] != 4:
        raise ValueError(f"gt_boxes must have shape (G, 4), got {tuple(gt_boxes.shape)}")
    if pred_scores.shape != (pred_boxes.shape[0],):
        raise ValueError(
            f"pred_scores must have shape ({pred_boxes.shape[0]},), got {tuple(pred_scores.shape)}"
        )
    scores = pred_scores.detach().float()
    n_gt = gt_boxes.shape[0]
    if n_gt == 0 or scores.numel() == 0:
        return torch.full((n_gt,), -math.inf, device=scores.device), scores
    iou = box_iou(pred_boxes.detach().float(), gt_boxes.detach().float().to(pred_boxes.device))
    hits = iou >= iou_threshold  # (N, G)
    hit_scores = torch.where(hits, scores[:, None], torch.full_like(iou, -math.inf))
    gt_best_score = hit_scores.amax(dim=0)  # amax, not max(dim=): far faster on small CPU tensors
    fp_scores = scores[~hits.any(dim=1)]
    return gt_best_score, fp_scores


def _froc_counts(gt_best_scores: Tensor, fp_scores: Tensor) -> tuple[Tensor, Tensor]:
    """Counts of found lesions and of false positives at every distinct score threshold.

    A threshold t keeps the predictions with score >= t; thresholds run from the highest
    score down, so both counts are non-decreasing.
    """
    gt = gt_best_scores.detach().double().flatten()
    fp = fp_scores.detach().double().flatten()
    thresholds = torch.unique(torch.cat([gt[torch.isfinite(gt)], fp])).flip(0)
    gt_sorted = gt.sort().values
    fp_sorted = fp.sort().values
    tp_counts = gt_sorted.numel() - torch.searchsorted(gt_sorted, thresholds, side="left")
    fp_counts = fp_sorted.numel() - torch.searchsorted(fp_sorted, thresholds, side="left")
    return fp_counts, tp_counts


def _check_n_images(n_images: int) -> int:
    n = int(n_images)
    if n < 1:
        raise ValueError(f"n_images must be at least 1, got {n}")
    return n


def froc_curve(gt_best_scores: Tensor, fp_scores: Tensor, n_images: int) -> tuple[Tensor, Tensor]:
    """The FROC curve over every distinct score threshold.

    Args:
        gt_best_scores: (G,) best hitting score per lesion (``-inf`` if never hit), all images.
        fp_scores: (F,) false-positive scores, all images.
        n_images: number of images evaluated, including those without lesions.

    Returns:
        ``(fp_per_image, sensitivity)``, float64, sorted by FP per image ascending (one point
        per threshold, highest threshold first). Sensitivity is nan when there are no lesions.
    """
    n = _check_n_images(n_images)
    fp_counts, tp_counts = _froc_counts(gt_best_scores, fp_scores)
    n_gt = gt_best_scores.numel()
    sensitivity = tp_counts.double() / n_gt if n_gt else torch.full(tp_counts.shape, math.nan, dtype=torch.float64)
    return fp_counts.double() / n, sensitivity


def froc_points(
    gt_best_scores: Tensor,
    fp_scores: Tensor,
    n_images: int,
    fp_rates: tuple[float, ...] = FP_RATES,
) -> dict[float, float]:
    """Sensitivity at each false-positive rate.

    The sensitivity at rate r is the highest sensitivity among thresholds whose FP per image
    is <= r: a step function read from the left, with no interpolation between thresholds,
    so it never claims more than some threshold actually achieves (conservative). When even
    the highest threshold exceeds r, the sensitivity is 0 (the "keep nothing" operating point).

    Args:
        gt_best_scores: (G,) best hitting score per lesion (``-inf`` if never hit), all images.
        fp_scores: (F,) false-positive scores, all images.
        n_images: number of images evaluated, including those without lesions.
        fp_rates: average false positives per image to read the curve at.

    Returns:
        ``{rate: sensitivity}``; every value nan when there is no ground-truth lesion.
    """
    n = _check_n_images(n_images)
    n_gt = gt_best_scores.numel()
    if n_gt == 0:
        return {float(rate): math.nan for rate in fp_rates}
    fp_counts, tp_counts = _froc_counts(gt_best_scores, fp_scores)
    # FP/n <= r  <=>  FP <= r*n, compared on counts to avoid rounding in the division.
    limits = torch.tensor([rate * n for rate in fp_rates], dtype=torch.float64, device=fp_counts.device)
    last = torch.searchsorted(fp_counts.double(), limits, side="right") - 1
    padded = torch.cat([tp_counts.new_zeros(1), tp_counts])  # index 0: nothing kept
    found = padded[last + 1]
    return {float(rate): float(k) / n_gt for rate, k in zip(fp_rates, found.tolist())}


def cpm(points: dict[float, float]) -> float:
    """Competition Performance Metric: the mean sensitivity over the FP rates of ``points``.

    With ``froc_points``' default rates this is the mean of the seven sensitivities at
    1/8, 1/4, 1/2, 1, 2, 4 and 8 FP per image. nan if any sensitivity is nan.
    """
    if not points:
        raise ValueError("cpm needs at least one FROC point")
    return sum(points.values()) / len(points)
