"""COCO-style average precision from flat arrays, equal to faster-coco-eval's, in a fraction of its time.

``coco_average_precision`` follows the COCO evaluation step for step, as faster-coco-eval's C++
core does it (bounding boxes, one area range "all", at most ``max_detections`` per image and
class, no crowd or ignored boxes):
- per image and class, detections sorted by score (stable: ties keep their input order) and
  cut to the best ``max_detections``;
- greedy matching in that order: a detection takes the still unmatched lesion of its class with
  the highest IoU >= the threshold (on equal IoU the later lesion), separately per IoU threshold;
- per class, all images' detections sorted by score (ties: image order, then rank), cumulative
  precision/recall, precision made non-increasing, read at the 101 recall points 0, 0.01 ... 1;
- a class without lesions is left out of the mean (precision -1, as COCO marks it).

It runs on whole arrays (the greedy matching in rounds, one detection per image and class per
round, over the detections that can match anything), which is what makes 5,000 images with 100
detections each take well under a second instead of faster-coco-eval's ~10 s of Python set-up.
``faster_coco_eval_average_precision`` runs the library itself on the same arrays, for the tests
and the benchmark to check that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Exactly COCO's arrays (np.linspace gives e.g. 0.7000000000000001, which the comparisons use).
COCO_IOU_THRESHOLDS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
RECALL_THRESHOLDS = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
# nnDetection also reports AP at IoU 0.1: medical lesions are small and their boxes loose.
IOU_THRESHOLDS = np.concatenate([[0.1], COCO_IOU_THRESHOLDS])


@dataclass
class CocoResult:
    """COCO accumulation output.

    Attributes:
        iou_thresholds: (T,) IoU thresholds.
        precision: (T, 101, K) interpolated precision at the recall points; -1 for a class
            without lesions.
        recall: (T, K) final recall; -1 for a class without lesions.
    """

    iou_thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray

    def average_precision(self, iou: float | None = None, cls: int | None = None) -> float:
        """Mean precision over recall points, classes (or one ``cls``) and IoU thresholds.

        ``iou=None`` averages over COCO's 0.5:0.95 (the "mAP" of COCO); a number selects that
        threshold. nan when no class has lesions.
        """
        if iou is None:
            rows = np.isin(self.iou_thresholds, COCO_IOU_THRESHOLDS)
        else:
            rows = np.isclose(self.iou_thresholds, iou, rtol=0, atol=1e-12)
            if not rows.any():
                raise ValueError(f"IoU {iou} was not evaluated; thresholds are {self.iou_thresholds.tolist()}")
        values = self.precision[rows]
        if cls is not None:
            values = values[..., cls]
        values = values[values > -1]
        return float(values.mean()) if values.size else float("nan")


def _xywh(boxes: np.ndarray, width: int) -> np.ndarray:
    """Corner-and-size boxes (x, y, w, h, or x, y, z, w, h, d for volumes) from corner pairs."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, width)
    half = width // 2
    return np.concatenate([boxes[:, :half], boxes[:, half:] - boxes[:, :half]], axis=1)


def _iou_xywh(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """IoU of matching rows of d (..., 2k) and g (..., 2k), corner and size, computed as COCO's C
    code does for k = 2 (no overlap unless every side overlaps), and the same way in 3D."""
    k = d.shape[-1] // 2
    sides = np.minimum(d[..., :k] + d[..., k:], g[..., :k] + g[..., k:]) - np.maximum(d[..., :k], g[..., :k])
    overlap = (sides > 0).all(axis=-1)
    inter = np.where(overlap, np.prod(np.where(sides > 0, sides, 0.0), axis=-1), 0.0)
    union = np.prod(d[..., k:], axis=-1) + np.prod(g[..., k:], axis=-1) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(overlap, inter / np.where(overlap, union, 1.0), 0.0)


def _box_width(*arrays: np.ndarray) -> int:
    """4 (xyxy) or 6 (xyzxyz volumes) from boxes given as (N, 4) / (N, 6) arrays; 4 when all are flat."""
    widths = {np.asarray(a).shape[-1] for a in arrays if np.asarray(a).ndim == 2}
    if len(widths) > 1:
        raise ValueError(f"predictions and lesions must both be 2D or both 3D boxes, got widths {sorted(widths)}")
    width = widths.pop() if widths else 4
    if width not in (4, 6):
        raise ValueError(f"boxes need 4 (xyxy) or 6 (xyzxyz) coordinates, got {width}")
    return width


def _group_starts(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For sorted ``keys``: each element's rank within its run of equal keys, and the run ids."""
    n = keys.shape[0]
    new = np.ones(n, dtype=bool)
    new[1:] = keys[1:] != keys[:-1]
    run = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    return np.arange(n) - starts[run], run


def coco_average_precision(
    pred_image: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    pred_labels: np.ndarray,
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    n_classes: int,
    iou_thresholds: np.ndarray = IOU_THRESHOLDS,
    max_detections: int = 100,
) -> CocoResult:
    """COCO bounding-box AP of flat predictions against flat ground truth.

    Args:
        pred_image: (N,) image index of each prediction (images are ordered by this index).
        pred_boxes: (N, 4) xyxy, or (N, 6) xyzxyz for volumes (3D IoU). pred_scores: (N,). pred_labels: (N,) 0-based classes
            (labels outside ``0 .. n_classes - 1`` are ignored, as COCO ignores unknown categories).
        gt_image, gt_boxes, gt_labels: the same for the lesions.
        n_classes: number of classes K.
        iou_thresholds: IoU thresholds T to evaluate.
        max_detections: detections kept per image and class (COCO's maxDets, 100).
    """
    thresholds = np.asarray(iou_thresholds, dtype=np.float64)
    n_thr, n_rec = len(thresholds), len(RECALL_THRESHOLDS)
    precision = -np.ones((n_thr, n_rec, n_classes))
    recall = -np.ones((n_thr, n_classes))
    p_img = np.asarray(pred_image, dtype=np.int64).reshape(-1)
    p_lab = np.asarray(pred_labels, dtype=np.int64).reshape(-1)
    p_score = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    box_width = _box_width(pred_boxes, gt_boxes)
    p_box = _xywh(pred_boxes, box_width)
    g_img = np.asarray(gt_image, dtype=np.int64).reshape(-1)
    g_lab = np.asarray(gt_labels, dtype=np.int64).reshape(-1)
    g_box = _xywh(gt_boxes, box_width)

    # Detections: by (image, class), best score first, ties in input order; keep max_detections.
    valid = (p_lab >= 0) & (p_lab < n_classes)
    idx = np.flatnonzero(valid)
    idx = idx[np.lexsort((idx, -p_score[idx], p_lab[idx], p_img[idx]))]
    key = p_img[idx] * n_classes + p_lab[idx]
    rank, _ = _group_starts(key)
    keep = rank < max_detections
    idx, key, rank = idx[keep], key[keep], rank[keep]

    # Lesions grouped by (image, class), input order inside a group, padded to the largest group.
    g_valid = np.flatnonzero((g_lab >= 0) & (g_lab < n_classes))
    g_order = g_valid[np.lexsort((g_valid, g_lab[g_valid], g_img[g_valid]))]
    g_key = g_img[g_order] * n_classes + g_lab[g_order]
    g_slot, g_group = _group_starts(g_key)
    group_keys = np.unique(g_key)
    n_groups = len(group_keys)
    width = int(g_slot.max()) + 1 if len(g_slot) else 1
    padded = np.zeros((n_groups, width, box_width))
    present = np.zeros((n_groups, width), dtype=bool)
    padded[g_group, g_slot] = g_box[g_order]
    present[g_group, g_slot] = True

    # Greedy matching, all thresholds at once, over detections that overlap some lesion enough.
    matched_det = np.zeros((n_thr, len(idx)), dtype=bool)
    pos = np.searchsorted(group_keys, key)
    has_group = np.zeros(len(key), dtype=bool)
    if n_groups:
        has_group = (pos < n_groups) & (group_keys[np.minimum(pos, n_groups - 1)] == key)
    cand = np.flatnonzero(has_group)
    if cand.size:
        grp = pos[cand]
        iou = _iou_xywh(p_box[idx[cand]][:, None, :], padded[grp])  # (C, width)
        iou = np.where(present[grp], iou, -1.0)
        effective = np.minimum(thresholds, 1 - 1e-10)
        can_match = (iou >= effective.min()).any(axis=1)
        cand, grp, iou = cand[can_match], grp[can_match], iou[can_match]
        # cand is in (image, class, rank) order, so its rank within a group is its round.
        round_of, _ = _group_starts(grp)
        taken = np.zeros((n_thr, n_groups, width), dtype=bool)
        for r in range(int(round_of.max()) + 1 if round_of.size else 0):
            sel = np.flatnonzero(round_of == r)
            g = grp[sel]
            ok = (iou[sel][None] >= effective[:, None, None]) & ~taken[:, g, :]  # (T, S, width)
            score = np.where(ok, iou[sel][None], -np.inf)
            best = width - 1 - np.argmax(score[..., ::-1], axis=-1)  # last of equal IoUs, as COCO
            hit = ok.any(axis=-1)
            t_i, s_i = np.nonzero(hit)
            taken[t_i, g[s_i], best[t_i, s_i]] = True
            matched_det[:, cand[sel]] = hit

    # Accumulation per class.
    d_lab = p_lab[idx]
    n_gt = np.bincount(g_lab[g_valid], minlength=n_classes)
    for k in range(n_classes):
        if n_gt[k] == 0:
            continue
        sel = np.flatnonzero(d_lab == k)
        order = sel[np.lexsort((rank[sel], p_img[idx[sel]], -p_score[idx[sel]]))]
        if order.size == 0:
            precision[:, :, k] = 0.0
            recall[:, k] = 0.0
            continue
        tp = np.cumsum(matched_det[:, order], axis=1, dtype=np.int64)
        fp = np.cumsum(~matched_det[:, order], axis=1, dtype=np.int64)
        rc = tp / n_gt[k]
        pr = tp / (tp + fp)
        pr = np.maximum.accumulate(pr[:, ::-1], axis=1)[:, ::-1]
        recall[:, k] = rc[:, -1]
        for t in range(n_thr):
            at = np.searchsorted(rc[t], RECALL_THRESHOLDS, side="left")
            inside = at < order.size
            precision[t, :, k] = np.where(inside, pr[t, np.minimum(at, order.size - 1)], 0.0)
    return CocoResult(iou_thresholds=thresholds, precision=precision, recall=recall)


def faster_coco_eval_average_precision(
    pred_image: np.ndarray,
    pred_boxes: np.ndarray,
    pred_scores: np.ndarray,
    pred_labels: np.ndarray,
    gt_image: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    n_classes: int,
    n_images: int,
) -> dict[str, float]:
    """faster-coco-eval's own ``map10``, ``map50`` and ``map50_95`` for the same arrays (slow; for checks).

    Runs the library's standard evaluation (its default IoU thresholds, area ranges and maxDets
    1/10/100) for AP@[.5:.95] and AP@.5, and once more with the single IoU threshold 0.1.
    faster-coco-eval comes with the `dev` extra (tests and bench), not with medrpn itself.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    categories = [{"id": k + 1, "name": str(k)} for k in range(n_classes)]
    images = [{"id": i + 1, "height": 1, "width": 1} for i in range(n_images)]
    g = _xywh(gt_boxes, 4).tolist()
    annotations = [
        {"id": j + 1, "image_id": int(i) + 1, "category_id": int(c) + 1, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
        for j, (i, c, b) in enumerate(zip(np.asarray(gt_image).tolist(), np.asarray(gt_labels).tolist(), g))
    ]
    d = _xywh(pred_boxes, 4).tolist()
    detections = [
        {"image_id": int(i) + 1, "category_id": int(c) + 1, "bbox": b, "score": float(s)}
        for i, c, b, s in zip(
            np.asarray(pred_image).tolist(), np.asarray(pred_labels).tolist(), d, np.asarray(pred_scores, np.float64).tolist()
        )
        if 0 <= int(c) < n_classes
    ]
    out = {}
    for name, thresholds in (("coco", None), ("map10", np.array([0.1]))):
        gt = COCO()
        gt.dataset = {"images": images, "annotations": [dict(a) for a in annotations], "categories": categories}
        gt.createIndex()
        dt = gt.loadRes([dict(x) for x in detections]) if detections else COCO()
        if not detections:
            dt.dataset = {"images": images, "annotations": [], "categories": categories}
            dt.createIndex()
        evaluator = COCOeval_faster(gt, dt, "bbox", print_function=lambda *args: None)
        if thresholds is not None:
            evaluator.params.iouThrs = thresholds
        evaluator.evaluate()
        evaluator.accumulate()
        if thresholds is None:
            evaluator.summarize()
            out["map50_95"], out["map50"] = float(evaluator.stats[0]), float(evaluator.stats[1])
        else:
            p = evaluator.eval["precision"][0, :, :, 0, -1]  # all areas, maxDets 100
            out["map10"] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
    return {k: (float("nan") if v < 0 else v) for k, v in out.items()}
