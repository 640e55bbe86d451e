"""FROC (free-response ROC) analysis: lesion sensitivity against false positives per image.

Radiology reports detection quality as the sensitivity reached at a few average numbers of
false positives per image (FP rates 1/8 ... 8), and their mean, the Competition Performance
Metric (CPM) of LUNA16. Here each 2D image is one unit of the FP rate; LUNA16 counts false
positives per CT scan, so a figure called "LUNA16-like" is read the same way, per image.

Hit rules (which prediction finds which lesion), chosen by name:
- ``"iou"``: the IoU of prediction and lesion boxes is at least a threshold (nnDetection reports
  IoU 0.1 and 0.5, DeepLesion's papers 0.5; medrpn's default 0.3 is neither, which is why every
  report also gives the CPM at IoU 0.5).
- ``"center"`` (LUNA16's rule): the prediction's centre lies strictly within the lesion's radius of
  the lesion's centre (distance < radius, as LUNA16's script). A box lesion's radius is half its
  longer side (a LUNA16 nodule of diameter d has a d x d box, so this is its d / 2). Give boxes in
  millimetres when the pixel spacing is known: the distance is then physical even for non-square
  pixels.

Counting (both rules): a prediction credits at most one lesion, as in COCO's and nnDetection's
matching: predictions are taken best score first, and each takes the not-yet-found lesion it
hits with the best fit (highest IoU, or nearest centre relative to the radius); so one large box
over two neighbouring lesions finds one of them, not both. (LUNA16's script lets one mark count
for two nodules and prints a warning when it does.) Each lesion is counted once, at the score of
the prediction that found it, the best-scoring one it could take. A prediction that hits any
lesion is never a false positive, so a second prediction on an already-found lesion is neither a
hit nor a false positive. Predictions hitting no lesion are false positives, including every
prediction on an image without lesions (which still counts in the number of images). Because the
matching runs best score first, the matching among the predictions above any threshold is the
same as matching them alone, so the whole FROC curve comes from one matching.

Interpolation (LUNA16): the FROC curve has one point per distinct score threshold (keep the
predictions scoring at least it) plus the origin (keep nothing: 0 FP, sensitivity 0). LUNA16's
evaluation script reads sensitivities off it with ``numpy.interp``, i.e. linearly between the
neighbouring thresholds; ``froc_points`` does the same, at exactly the wanted rates (LUNA16 takes
the nearest of 10,001 grid points between 1/8 and 8, a difference below 4e-4 FP per image). Where
the curve steps up vertically at a rate, the higher sensitivity counts; beyond the last point the
curve stays flat. Interpolated values need not be reachable by a threshold: use
``medrpn.metrics.operating_point`` to choose one.

The work is split so it can be accumulated across batches and devices as flat tensors:
``hit_matrix`` / ``match_image`` per image, then ``froc_curve`` / ``froc_points`` over everything.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torchvision.ops import box_iou

FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
HIT_RULES: tuple[str, ...] = ("iou", "center")
HitRule = Literal["iou", "center"]


def check_hit_rule(rule: str) -> str:
    """``rule`` if it names a hit rule, else a ValueError listing the choices."""
    if rule not in HIT_RULES:
        raise ValueError(f"unknown FROC hit rule {rule!r}; choose one of {', '.join(HIT_RULES)}")
    return rule


def _check_boxes(name: str, boxes: Tensor) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] not in (4, 6):
        raise ValueError(f"{name} must have shape (N, 4), or (N, 6) for volumes, got {tuple(boxes.shape)}")


def _centre_distance_ratio(pred: Tensor, gt: Tensor) -> Tensor:
    """(N, G) distance between prediction and lesion centres divided by the lesion's radius."""
    d = gt.shape[1] // 2
    pred_centre = (pred[:, :d] + pred[:, d:]) / 2
    gt_centre = (gt[:, :d] + gt[:, d:]) / 2
    radius = (gt[:, d:] - gt[:, :d]).amax(dim=1) / 2
    return torch.cdist(pred_centre, gt_centre) / radius[None, :]


def hit_quality(pred_boxes: Tensor, gt_boxes: Tensor, rule: HitRule = "iou") -> Tensor:
    """How well each prediction fits each lesion under ``rule``, higher is better.

    Returns:
        (N, G) float32: the IoU for ``"iou"``; minus the centre distance over the lesion radius
        for ``"center"`` (a hit is above -1).
    """
    _check_boxes("pred_boxes", pred_boxes)
    _check_boxes("gt_boxes", gt_boxes)
    check_hit_rule(rule)
    if len(pred_boxes) and len(gt_boxes) and pred_boxes.shape[1] != gt_boxes.shape[1]:
        raise ValueError(f"predictions and lesions must both be 2D or both 3D boxes, got {pred_boxes.shape[1]} and {gt_boxes.shape[1]} coordinates")
    pred = pred_boxes.detach().float()
    gt = gt_boxes.detach().float().to(pred.device)
    if pred.shape[0] == 0 or gt.shape[0] == 0:
        return torch.zeros(pred.shape[0], gt.shape[0], device=pred.device)
    if rule == "iou":
        return pairwise_iou(pred, gt)
    return -_centre_distance_ratio(pred, gt)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """(N, M) IoU of boxes a (N, 4) and b (M, 4) xyxy (torchvision's), or of (N, 6) and (M, 6)
    xyzxyz volume boxes (MONAI's)."""
    if a.shape[-1] == 4:
        return box_iou(a, b)
    from monai.data.box_utils import box_iou as volume_box_iou  # 3D; MONAI's import costs seconds, so only here

    return volume_box_iou(a, b).float()


def hits_of_quality(quality: Tensor, rule: HitRule = "iou", iou_threshold: float = 0.3) -> Tensor:
    """The hit matrix of a ``hit_quality`` matrix: IoU >= ``iou_threshold``, or centre distance < radius."""
    if rule == "iou":
        return quality >= iou_threshold
    return quality > -1.0  # nan (a lesion of radius 0) is no hit


def hit_matrix(pred_boxes: Tensor, gt_boxes: Tensor, rule: HitRule = "iou", iou_threshold: float = 0.3) -> Tensor:
    """Which prediction hits which lesion under ``rule``.

    Args:
        pred_boxes: (N, 4) predicted boxes, xyxy (or (N, 6) xyzxyz for volumes; pixels or voxels, or
            millimetres for a physical distance).
        gt_boxes: (G, 4) lesion boxes in the same unit.
        rule: ``"iou"`` (IoU >= ``iou_threshold``) or ``"center"`` (centre distance < lesion radius).
        iou_threshold: used by the ``"iou"`` rule only.

    Returns:
        (N, G) bool tensor, on the device of ``pred_boxes``.
    """
    return hits_of_quality(hit_quality(pred_boxes, gt_boxes, rule), rule, iou_threshold)


def credit_one_lesion_each(hits: Tensor, scores: Tensor, quality: Tensor) -> Tensor:
    """The hits that count: each prediction credits at most one lesion, each lesion one prediction.

    Predictions are taken best score first (ties: the earlier one); each takes, among the lesions
    it hits that no better-scoring prediction has taken, the one it fits best (highest
    ``quality``). A prediction all of whose lesions are taken credits none.

    Args:
        hits: (N, G) bool hit matrix (entries between different images are False).
        scores: (N,) prediction scores.
        quality: (N, G) fit of each prediction to each lesion, higher is better (``hit_quality``).

    Returns:
        (N, G) bool with at most one True per row and per column, on the device of ``hits``.
    """
    credited = np.zeros(tuple(hits.shape), dtype=bool)
    rows = torch.nonzero(hits.any(dim=1)).flatten()
    if len(rows):
        hit_np = hits[rows].cpu().numpy()
        fit = np.where(hit_np, quality[rows].detach().float().cpu().numpy(), -np.inf)
        order = np.argsort(-scores[rows].detach().float().cpu().numpy(), kind="stable")
        taken = np.zeros(hits.shape[1], dtype=bool)
        for k, row in zip(order, rows.cpu().numpy()[order]):
            free = np.where(taken, -np.inf, fit[k])
            g = int(np.argmax(free))
            if free[g] > -np.inf:
                credited[row, g] = taken[g] = True
    return torch.from_numpy(credited).to(hits.device)


def match_image(
    pred_boxes: Tensor,
    pred_scores: Tensor,
    gt_boxes: Tensor,
    iou_threshold: float = 0.3,
    rule: HitRule = "iou",
) -> tuple[Tensor, Tensor]:
    """Match one image's predictions to its ground-truth lesions.

    Args:
        pred_boxes: (N, 4) predicted boxes, absolute xyxy (or (N, 6) xyzxyz on a volume).
        pred_scores: (N,) confidence of each prediction.
        gt_boxes: (G, 4) ground-truth boxes, absolute xyxy.
        iou_threshold: minimum IoU for a prediction to hit a lesion (``"iou"`` rule).
        rule: the hit rule, ``"iou"`` or ``"center"``.

    Returns:
        ``gt_best_score`` (G,): for each lesion the score of the prediction credited with it
        (each prediction credits at most one lesion, see the module's docstring), or ``-inf``
        when none is; ``fp_scores`` (F,): scores of the predictions hitting no lesion. Both
        float32, on the device of ``pred_scores``.
    """
    _check_boxes("pred_boxes", pred_boxes)
    _check_boxes("gt_boxes", gt_boxes)
    if pred_scores.shape != (pred_boxes.shape[0],):
        raise ValueError(
            f"pred_scores must have shape ({pred_boxes.shape[0]},), got {tuple(pred_scores.shape)}"
        )
    scores = pred_scores.detach().float()
    quality = hit_quality(pred_boxes.to(scores.device), gt_boxes, rule)  # (N, G)
    hits = hits_of_quality(quality, rule, iou_threshold)
    credited = credit_one_lesion_each(hits, scores, quality)
    return best_hit_scores(credited, scores), scores[~hits.any(dim=1)]


def best_hit_scores(hits: Tensor, scores: Tensor) -> Tensor:
    """For each column of ``hits`` (N, G), the best score of the rows hitting it (``-inf`` if none)."""
    if hits.shape[0] == 0 or hits.shape[1] == 0:
        return torch.full((hits.shape[1],), -math.inf, device=scores.device)
    # amax, not max(dim=): far faster on small CPU tensors
    return torch.where(hits, scores[:, None], torch.full_like(scores[:, None], -math.inf)).amax(dim=0)


def froc_counts(gt_best_scores: Tensor, fp_scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thresholds (descending) and the counts of found lesions and false positives at each.

    A threshold t keeps the predictions with score >= t; thresholds run from the highest
    score down, so both counts are non-decreasing.
    """
    gt = gt_best_scores.detach().double().flatten().cpu()
    fp = fp_scores.detach().double().flatten().cpu()
    thresholds = torch.unique(torch.cat([gt[torch.isfinite(gt)], fp])).flip(0)
    gt_sorted = gt.sort().values
    fp_sorted = fp.sort().values
    tp_counts = gt_sorted.numel() - torch.searchsorted(gt_sorted, thresholds, side="left")
    fp_counts = fp_sorted.numel() - torch.searchsorted(fp_sorted, thresholds, side="left")
    return thresholds, fp_counts, tp_counts


def check_n_images(n_images: int) -> int:
    n = int(n_images)
    if n < 1:
        raise ValueError(f"n_images must be at least 1, got {n}")
    return n


def froc_curve(gt_best_scores: Tensor, fp_scores: Tensor, n_images: int) -> tuple[Tensor, Tensor]:
    """The FROC curve: the origin, then one point per distinct score threshold.

    Args:
        gt_best_scores: (G,) best hitting score per lesion (``-inf`` if never hit), all images.
        fp_scores: (F,) false-positive scores, all images.
        n_images: number of images evaluated, including those without lesions.

    Returns:
        ``(fp_per_image, sensitivity)``, float64, FP per image ascending: first (0, 0) for
        "keep nothing", then the highest threshold first. Sensitivity is nan when there are no
        lesions.
    """
    n = check_n_images(n_images)
    _, fp_counts, tp_counts = froc_counts(gt_best_scores, fp_scores)
    zero = torch.zeros(1, dtype=torch.float64)
    fp_per_image = torch.cat([zero, fp_counts.double() / n])
    n_gt = gt_best_scores.numel()
    if n_gt == 0:
        return fp_per_image, torch.full(fp_per_image.shape, math.nan, dtype=torch.float64)
    return fp_per_image, torch.cat([zero, tp_counts.double() / n_gt])


def interpolate_counts(fp_counts: Tensor, tp_counts: Tensor, fp_limits: Tensor) -> Tensor:
    """Found-lesion counts linearly interpolated at false-positive counts (the LUNA16 reading).

    Args:
        fp_counts: (..., T) non-decreasing false-positive counts of a curve starting at the origin.
        tp_counts: (..., T) found-lesion counts at the same points.
        fp_limits: (..., R) false-positive counts to read the curve at (rate x number of images).

    Returns:
        (..., R) float64: at a vertical step the upper value; past the last point, the last value.
    """
    fp = fp_counts.double().contiguous()
    tp = tp_counts.double()
    limits = fp_limits.double().contiguous()
    last = fp.shape[-1] - 1
    j = (torch.searchsorted(fp, limits, right=True) - 1).clamp(0, last)
    j_next = (j + 1).clamp(max=last)
    x0, x1 = fp.gather(-1, j), fp.gather(-1, j_next)
    y0, y1 = tp.gather(-1, j), tp.gather(-1, j_next)
    span = x1 - x0
    fraction = torch.where(span > 0, (limits - x0) / torch.where(span > 0, span, 1.0), 0.0).clamp(0, 1)
    return y0 + fraction * (y1 - y0)


def froc_points(
    gt_best_scores: Tensor,
    fp_scores: Tensor,
    n_images: int,
    fp_rates: tuple[float, ...] = FP_RATES,
) -> dict[float, float]:
    """Sensitivity at each false-positive rate, interpolated on the FROC curve as LUNA16 does.

    Args:
        gt_best_scores: (G,) best hitting score per lesion (``-inf`` if never hit), all images.
        fp_scores: (F,) false-positive scores, all images.
        n_images: number of images evaluated, including those without lesions.
        fp_rates: average false positives per image to read the curve at.

    Returns:
        ``{rate: sensitivity}``; every value nan when there is no ground-truth lesion.
    """
    n = check_n_images(n_images)
    n_gt = gt_best_scores.numel()
    if n_gt == 0:
        return {float(rate): math.nan for rate in fp_rates}
    _, fp_counts, tp_counts = froc_counts(gt_best_scores, fp_scores)
    origin = torch.zeros(1, dtype=torch.long)
    limits = torch.tensor([rate * n for rate in fp_rates], dtype=torch.float64)
    found = interpolate_counts(torch.cat([origin, fp_counts]), torch.cat([origin, tp_counts]), limits)
    return {float(rate): float(k) / n_gt for rate, k in zip(fp_rates, found.tolist())}


def cpm(points: dict[float, float]) -> float:
    """Competition Performance Metric: the mean sensitivity over the FP rates of ``points``.

    With ``froc_points``' default rates this is the mean of the seven sensitivities at
    1/8, 1/4, 1/2, 1, 2, 4 and 8 FP per image. nan if any sensitivity is nan.
    """
    if not points:
        raise ValueError("cpm needs at least one FROC point")
    return sum(points.values()) / len(points)
