"""Tests of medrpn.metrics: FROC on hand-worked fixtures (both hit rules, LUNA16 interpolation,
per class), proposal recall by size, mAP against faster-coco-eval and MONAI, bootstrap intervals
against a plain re-implementation, and the DetectionMetrics wrapper (keys, batch-split and
two-process DDP invariance)."""

from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medrpn.metrics import (
    FP_RATES,
    DetectionMetrics,
    bootstrap_froc,
    coco_average_precision,
    cpm,
    faster_coco_eval_average_precision,
    froc_curve,
    froc_points,
    hit_matrix,
    match_image,
    proposal_hits,
)


def _t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def fixture() -> tuple[list[dict], list[dict]]:
    """Four images, FROC IoU threshold 0.3.

    image 0: lesion A [10,10,50,50]; preds 0.9 on A (exact), 0.6 on A again (duplicate,
             IoU 0.6 -> ignored: neither hit nor FP), 0.4 far away (FP).
    image 1: lesions B [100,100,140,140] and C [200,200,240,240]; preds 0.8 far away (FP),
             0.5 on B (hit), 0.2 far away (FP); C is never found.
    image 2: no lesion; pred 0.7 (FP; the image still counts).
    image 3: lesion D [30,30,70,70]; pred 0.3 on D (IoU 0.6, hit), pred 0.35 barely touching D
             (IoU 100/3100 < 0.3 -> FP).

    Lesion best scores: A 0.9, B 0.5, C -inf, D 0.3 (4 lesions); FP scores: 0.8, 0.7, 0.4,
    0.35, 0.2; 4 images. The curve from the origin, one point per threshold (FP/image, sensitivity):
      origin (0, 0)     0.7 (0.50, .25)     0.35 (1.00, .50)
      0.9 (0.00, .25)   0.5 (0.50, .50)     0.3  (1.00, .75)
      0.8 (0.25, .25)   0.4 (0.75, .50)     0.2  (1.25, .75)
    Read linearly (LUNA16): 1/8 lies on (0,.25)-(.25,.25) -> .25; 1/4 -> .25; at 1/2 the curve
    steps up, the upper value counts -> .50; at 1 it steps up -> .75; past 1.25 flat -> .75.
    CPM = (.25 + .25 + .5 + 4 * .75) / 7 = 4/7.
    """
    preds = [
        dict(boxes=_t([[10, 10, 50, 50], [15, 10, 55, 50], [300, 300, 340, 340]]), scores=torch.tensor([0.9, 0.6, 0.4])),
        dict(boxes=_t([[400, 10, 440, 50], [105, 100, 145, 140], [10, 400, 50, 440]]), scores=torch.tensor([0.8, 0.5, 0.2])),
        dict(boxes=_t([[60, 60, 90, 90]]), scores=torch.tensor([0.7])),
        dict(boxes=_t([[40, 30, 80, 70], [60, 60, 100, 100]]), scores=torch.tensor([0.3, 0.35])),
    ]
    targets = [
        dict(boxes=_t([[10, 10, 50, 50]]), labels=torch.tensor([0])),
        dict(boxes=_t([[100, 100, 140, 140], [200, 200, 240, 240]]), labels=torch.tensor([1, 0])),
        dict(boxes=_t([]), labels=torch.zeros(0, dtype=torch.long)),
        dict(boxes=_t([[30, 30, 70, 70]]), labels=torch.tensor([0])),
    ]
    for pred in preds:  # every prediction claims class 0
        pred["labels"] = torch.zeros(len(pred["scores"]), dtype=torch.long)
    return preds, targets


EXPECTED = {0.125: 0.25, 0.25: 0.25, 0.5: 0.5, 1.0: 0.75, 2.0: 0.75, 4.0: 0.75, 8.0: 0.75}
FROC_KEYS = ["froc_0.125fp", "froc_0.25fp", "froc_0.5fp", "froc_1fp", "froc_2fp", "froc_4fp", "froc_8fp"]


def _gathered(preds=None, targets=None, rule="iou") -> tuple[torch.Tensor, torch.Tensor, int]:
    if preds is None:
        preds, targets = fixture()
    matched = [match_image(p["boxes"], p["scores"], t["boxes"], 0.3, rule) for p, t in zip(preds, targets)]
    return torch.cat([m[0] for m in matched]), torch.cat([m[1] for m in matched]), len(targets)


def test_fixture_matching_counts_each_lesion_once():
    gt_best, fps, _ = _gathered()
    assert gt_best.tolist() == pytest.approx([0.9, 0.5, -math.inf, 0.3])
    assert sorted(fps.tolist()) == pytest.approx([0.2, 0.35, 0.4, 0.7, 0.8])  # duplicate 0.6 absent


def test_fixture_froc_points_and_cpm():
    gt_best, fps, n = _gathered()
    points = froc_points(gt_best, fps, n)
    assert list(points) == list(FP_RATES)
    assert points == pytest.approx(EXPECTED)
    assert cpm(points) == pytest.approx(4 / 7)


def test_fixture_froc_curve_starts_at_the_origin():
    gt_best, fps, n = _gathered()
    fp_per_image, sensitivity = froc_curve(gt_best, fps, n)
    assert fp_per_image.tolist() == pytest.approx([0, 0, 0.25, 0.5, 0.5, 0.75, 1, 1, 1.25])
    assert sensitivity.tolist() == pytest.approx([0, 0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75])


def sloped_fixture() -> tuple[list[dict], list[dict]]:
    """Two images where the LUNA16 interpolation reads between thresholds (IoU rule, 0.3).

    image 0: lesion A; preds 0.9 far away (FP), 0.8 on A.
    image 1: lesions B, C; preds 0.7 on B, then three at 0.6: on C, and two far away (FPs).
    3 lesions, 2 images. Curve: origin (0, 0); 0.9 -> (0.5, 0); 0.8 -> (0.5, 1/3);
    0.7 -> (0.5, 2/3); 0.6 -> (1.5, 1): the tie at 0.6 adds 2 FPs and 1 hit at once.
    1/8, 1/4 lie on (0,0)-(0.5,0) -> 0; at 1/2 the step's top -> 2/3; 1 lies halfway along
    (0.5, 2/3)-(1.5, 1) -> 5/6 (a step reading would say 2/3); 2, 4, 8 -> 1.
    CPM = (0 + 0 + 2/3 + 5/6 + 3) / 7 = 9/14.
    """
    preds = [
        dict(boxes=_t([[300, 300, 340, 340], [10, 10, 50, 50]]), scores=torch.tensor([0.9, 0.8])),
        dict(
            boxes=_t([[100, 100, 140, 140], [200, 200, 240, 240], [0, 300, 40, 340], [300, 0, 340, 40]]),
            scores=torch.tensor([0.7, 0.6, 0.6, 0.6]),
        ),
    ]
    targets = [
        dict(boxes=_t([[10, 10, 50, 50]]), labels=torch.tensor([0])),
        dict(boxes=_t([[100, 100, 140, 140], [200, 200, 240, 240]]), labels=torch.tensor([0, 0])),
    ]
    for pred in preds:
        pred["labels"] = torch.zeros(len(pred["scores"]), dtype=torch.long)
    return preds, targets


def test_froc_points_interpolate_like_luna16():
    gt_best, fps, n = _gathered(*sloped_fixture())
    points = froc_points(gt_best, fps, n)
    expected = {0.125: 0, 0.25: 0, 0.5: 2 / 3, 1.0: 5 / 6, 2.0: 1, 4.0: 1, 8.0: 1}
    assert points == pytest.approx(expected)
    assert cpm(points) == pytest.approx(9 / 14)
    # LUNA16's evaluation script: numpy.interp on the curve
    x, y = froc_curve(gt_best, fps, n)
    assert list(points.values()) == pytest.approx(np.interp(FP_RATES, x.numpy(), y.numpy()).tolist())


def test_froc_points_below_the_first_threshold_read_from_the_origin():
    # One image: FP at 0.9, lesion hit at 0.5. The curve goes (0,0) -> (1,0) -> (1,1).
    points = froc_points(torch.tensor([0.5]), torch.tensor([0.9]), n_images=1)
    assert points[0.5] == 0.0 and points[1.0] == 1.0


def test_froc_points_without_lesions_is_nan():
    points = froc_points(torch.empty(0), torch.tensor([0.9, 0.1]), n_images=3)
    assert all(math.isnan(v) for v in points.values())
    assert math.isnan(cpm(points))


def test_match_image_no_predictions():
    gt_best, fps = match_image(_t([]), torch.empty(0), _t([[0, 0, 10, 10], [20, 20, 30, 30]]))
    assert gt_best.tolist() == [-math.inf, -math.inf]
    assert fps.numel() == 0


def test_match_image_no_ground_truth():
    gt_best, fps = match_image(_t([[0, 0, 10, 10], [5, 5, 9, 9]]), torch.tensor([0.7, 0.2]), _t([]))
    assert gt_best.numel() == 0
    assert fps.tolist() == pytest.approx([0.7, 0.2])


def test_match_image_rejects_mismatched_scores():
    with pytest.raises(ValueError, match="pred_scores"):
        match_image(_t([[0, 0, 10, 10]]), torch.tensor([0.7, 0.2]), _t([]))


def test_center_rule_is_distance_to_the_lesion_radius():
    lesion = _t([[0, 0, 20, 10]])  # centre (10, 5), longer side 20 -> radius 10
    preds = _t([
        [14, 3, 22, 7],  # centre (18, 5): 8 from the centre, IoU only 32/232 -> hit by distance only
        [17, 0, 25, 10],  # centre (21, 5): 11 > 10 -> miss
        [0, 0, 20, 10],  # the lesion itself
    ])
    assert hit_matrix(preds, lesion, "center")[:, 0].tolist() == [True, False, True]
    assert hit_matrix(preds, lesion, "iou", 0.3)[:, 0].tolist() == [False, False, True]
    with pytest.raises(ValueError, match="hit rule"):
        hit_matrix(preds, lesion, "dice")


def test_center_rule_measures_in_millimetres_with_the_spacing():
    # Pixels 2 mm tall, 1 mm wide: lesion [0,0,20,10] px is 20 x 20 mm, radius 10 mm, centre (10, 10) mm.
    # A prediction centred at (10, 10.5) px is 5.5 px away (a hit in pixels) but at (10, 21) mm,
    # 11 mm away: a miss. One centred at (10, 9.5) px is 9 mm away: a hit.
    target = dict(boxes=_t([[0, 0, 20, 10]]), labels=torch.tensor([0]))
    pred = dict(boxes=_t([[9, 9.5, 11, 11.5], [9, 8.5, 11, 10.5]]), scores=torch.tensor([0.9, 0.8]), labels=torch.tensor([0, 0]))
    in_px = DetectionMetrics(froc_hit_rule="center")
    in_px.update([pred], [target], meta=[{"scale": 1.0, "spacing": None}])
    in_mm = DetectionMetrics(froc_hit_rule="center")
    in_mm.update([pred], [target], meta=[{"scale": 1.0, "spacing": (2.0, 1.0)}])
    assert in_px.records().pred_fp_any.tolist() == [False, False]
    assert in_mm.records().pred_fp_any.tolist() == [True, False]
    assert in_mm.records().gt_best_any.tolist() == pytest.approx([0.8])


def test_per_class_froc_needs_the_right_class_but_class_agnostic_does_not():
    preds, targets = fixture()
    metric = DetectionMetrics(class_names=["nodule", "mass"])
    metric.update(preds, targets)
    out = metric.report().scalars
    # class-agnostic: as the hand-worked fixture
    assert [out[k] for k in FROC_KEYS] == pytest.approx(list(EXPECTED.values()))
    # "mass" has only lesion B, and every prediction says "nodule": never found
    assert out["mass/cpm"] == 0.0
    # "nodule": A, C, D; the 0.5 box on B is now a nodule false positive. Thresholds (FP/image,
    # found): 0.9 (0, 1) 0.8 (.25, 1) 0.7 (.5, 1) 0.5 (.75, 1) 0.4 (1, 1) 0.35 (1.25, 1) 0.3 (1.25, 2)
    # 0.2 (1.5, 2): 1/8..1 -> 1/3, 2, 4, 8 -> 2/3.
    assert [out[f"nodule/{k}"] for k in FROC_KEYS] == pytest.approx([1 / 3] * 4 + [2 / 3] * 3)


def test_proposal_hits_top_k_cuts_off_a_hit():
    gts = _t([[0, 0, 10, 10], [50, 50, 60, 60]])
    proposals = _t([[0, 0, 10, 11], [200, 200, 210, 210], [50, 50, 60, 60]])  # best first
    assert proposal_hits(proposals, gts, top_k=2) == 1
    assert proposal_hits(proposals, gts, top_k=3) == 2
    assert proposal_hits(proposals, gts, top_k=3, iou_threshold=0.95) == 1  # 100/110 < 0.95
    assert proposal_hits(_t([]), gts) == 0 and proposal_hits(proposals, _t([])) == 0


def test_proposal_recall_by_top_k_and_size_in_millimetres():
    # 0.5 mm pixels, network input = original (scale 1). Lesions: 10x10 px = 5 mm (small),
    # 40x40 px = 20 mm (medium), 80x80 px = 40 mm (large).
    targets = [dict(boxes=_t([[0, 0, 10, 10], [100, 100, 140, 140], [200, 200, 280, 280]]), labels=torch.zeros(3, dtype=torch.long))]
    far = _t([[500, 500, 510, 510]] * 10)
    # rank 0: the small lesion exactly; rank 10: the medium one shifted (IoU 36*40/(2*1600-1440) = 0.818);
    # the large one is never covered.
    proposals = [torch.cat([_t([[0, 0, 10, 10]]), far[:9], _t([[104, 100, 144, 140]])])]
    preds = [dict(boxes=_t([]), scores=torch.empty(0), labels=torch.zeros(0, dtype=torch.long))]
    metric = DetectionMetrics()
    metric.update(preds, targets, proposals, meta=[{"scale": 1.0, "spacing": (0.5, 0.5)}])
    report = metric.report()
    s = report.scalars
    assert report.settings["size_unit"] == "mm"
    assert s["rpn_recall10"] == pytest.approx(1 / 3) and s["rpn_recall50"] == pytest.approx(2 / 3)
    assert s["rpn_recall1000"] == pytest.approx(2 / 3)  # fewer proposals than 1000: all of them
    assert s["rpn_recall10_small"] == 1.0 and s["rpn_recall10_medium"] == 0.0 and s["rpn_recall50_medium"] == 1.0
    assert s["rpn_recall100_large"] == 0.0
    # AR@100: small 1 at every IoU; medium 0.818 passes 0.5 .. 0.8 (7 of 10); large 0
    assert s["rpn_ar100_small"] == 1.0 and s["rpn_ar100_medium"] == pytest.approx(0.7)
    assert s["rpn_ar100"] == pytest.approx((1 + 0.7 + 0) / 3)
    assert report.proposal_curves["all"] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    # without spacing the bins are COCO's, in pixels of the original image (here scale 0.5: x2)
    metric = DetectionMetrics()
    metric.update(preds, targets, proposals, meta=[{"scale": 0.5, "spacing": None}])
    report = metric.report()
    assert report.settings["size_unit"] == "px"
    # 20 px small, 80 px medium, 160 px large
    assert report.scalars["rpn_recall10_small"] == 1.0 and report.scalars["rpn_recall50_medium"] == 1.0


def _random_detections(seed: int, n_images: int = 120, max_preds: int = 40, n_classes: int = 3, ties: bool = False):
    """Flat arrays: lesions, and predictions half near a lesion (jittered, mostly the right class)."""
    rng = np.random.default_rng(seed)
    gi, gb, gl = [], [], []
    for i in range(n_images):
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 200, 2)
            w, h = rng.uniform(5, 60, 2)
            gi.append(i), gb.append([x, y, x + w, y + h]), gl.append(rng.integers(0, n_classes))
    gb = np.array(gb, np.float32).reshape(-1, 4)
    gi, gl = np.array(gi), np.array(gl)
    pi, pb, pl, ps = [], [], [], []
    for i in range(n_images):
        mine = np.flatnonzero(gi == i)
        for _ in range(rng.integers(0, max_preds)):
            if len(mine) and rng.random() < 0.5:
                j = rng.choice(mine)
                box = gb[j] + rng.normal(0, 6, 4)
                label = gl[j] if rng.random() < 0.8 else rng.integers(0, n_classes)
            else:
                x, y = rng.uniform(0, 200, 2)
                w, h = rng.uniform(5, 60, 2)
                box, label = [x, y, x + w, y + h], rng.integers(0, n_classes)
            pi.append(i), pb.append(box), pl.append(label)
            ps.append(np.round(rng.random(), 1) if ties else rng.random())
    pb = np.array(pb, np.float32).reshape(-1, 4)
    pb[:, 2:] = np.maximum(pb[:, 2:], pb[:, :2] + 1)
    return np.array(pi), pb, np.array(ps, np.float32), np.array(pl), gi, gb, gl


@pytest.mark.parametrize("seed,ties,max_preds", [(0, False, 40), (1, True, 40), (2, False, 160)])
def test_map_equals_faster_coco_eval(seed, ties, max_preds):
    # ties: scores rounded to 0.1 (order of equal scores matters); 160: more than COCO's 100 per image
    pi, pb, ps, pl, gi, gb, gl = _random_detections(seed, ties=ties, max_preds=max_preds)
    ours = coco_average_precision(pi, pb, ps, pl, gi, gb, gl, n_classes=3)
    library = faster_coco_eval_average_precision(pi, pb, ps, pl, gi, gb, gl, n_classes=3, n_images=120)
    assert ours.average_precision(0.1) == pytest.approx(library["map10"], abs=1e-12)
    assert ours.average_precision(0.5) == pytest.approx(library["map50"], abs=1e-12)
    assert ours.average_precision() == pytest.approx(library["map50_95"], abs=1e-12)
    assert 0.02 < ours.average_precision(0.5) < 0.9  # a real, non-degenerate case


def test_map_agrees_with_monai_coco_metric():
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch
    from monai.data.box_utils import box_iou

    pi, pb, ps, pl, gi, gb, gl = _random_detections(3, n_images=60)
    assert set(gl.tolist()) == {0, 1, 2}  # MONAI averages absent classes in as -1
    ours = coco_average_precision(pi, pb, ps, pl, gi, gb, gl, n_classes=3)
    monai_metric = COCOMetric(classes=["a", "b", "c"], iou_list=(0.1, 0.5), iou_range=(0.5, 0.95, 0.05), max_detection=(100,), verbose=False)
    images = range(60)
    matches = matching_batch(
        iou_fn=box_iou,
        iou_thresholds=monai_metric.iou_thresholds,
        pred_boxes=[pb[pi == i].astype(np.float64) for i in images],
        pred_classes=[pl[pi == i] for i in images],
        pred_scores=[ps[pi == i].astype(np.float64) for i in images],
        gt_boxes=[gb[gi == i].astype(np.float64) for i in images],
        gt_classes=[gl[gi == i] for i in images],
        max_detections=100,
    )
    theirs, _ = monai_metric(matches)
    # MONAI accumulates true positives in float32, so a recall like 21/30 can land on the other
    # side of one of the 101 recall points than in float64 (COCO, faster-coco-eval, medrpn):
    # at most 1/101 of one class's AP. Every figure agrees to that.
    tolerance = 1 / 101 / 3
    assert ours.average_precision(0.1) == pytest.approx(theirs["AP_IoU_0.10_MaxDet_100"], abs=tolerance)
    assert ours.average_precision(0.5) == pytest.approx(theirs["AP_IoU_0.50_MaxDet_100"], abs=tolerance)
    assert ours.average_precision() == pytest.approx(theirs["mAP_IoU_0.50_0.95_0.05_MaxDet_100"], abs=tolerance)
    for k, name in enumerate("abc"):
        assert ours.average_precision(0.5, cls=k) == pytest.approx(theirs[f"{name}_AP_IoU_0.50_MaxDet_100"], abs=1 / 101)


def _naive_bootstrap(gt_best, gt_group, fps, fp_group, image_group, n_resamples, seed):
    """Resample patients, rebuild each resample's data and read froc_points: the plain way."""
    n_groups = image_group.max() + 1
    weights = np.random.default_rng(seed).multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=n_resamples)
    rows = []
    for w in weights:
        gt = np.concatenate([gt_best[gt_group == g] for g in range(n_groups) for _ in range(w[g])] or [np.zeros(0)])
        fp = np.concatenate([fps[fp_group == g] for g in range(n_groups) for _ in range(w[g])] or [np.zeros(0)])
        n = int(sum(w[g] * (image_group == g).sum() for g in range(n_groups)))
        rows.append(list(froc_points(torch.from_numpy(gt), torch.from_numpy(fp), n).values()))
    rows = np.array(rows)
    return np.nanquantile(rows, [0.025, 0.975], axis=0), np.nanquantile(np.nanmean(rows, axis=1), [0.025, 0.975])


def test_bootstrap_equals_the_plain_resampling():
    rng = np.random.default_rng(7)
    n_images, n_patients = 40, 15
    image_group = np.sort(rng.integers(0, n_patients, n_images))
    image_group = np.unique(image_group, return_inverse=True)[1]
    gt_image = rng.integers(0, n_images, 30)
    gt_best = np.where(rng.random(30) < 0.8, rng.random(30), -np.inf)
    # 40 FP/image, most of the high-scoring ones on patient 0's images: the shortcut works on the
    # highest-scoring FPs only, and must redo the resamples without patient 0 on all of them.
    fp_image = np.concatenate([rng.choice(np.flatnonzero(image_group == 0), 1400), rng.integers(0, n_images, 200)])
    fps = np.round(np.concatenate([rng.uniform(0.5, 1, 1400), rng.uniform(0, 0.6, 200)]), 3)  # with ties
    args = (gt_best, image_group[gt_image], fps, image_group[fp_image], image_group)
    iv = bootstrap_froc(*args, n_resamples=100, seed=3, chunk=100)
    (low, high), (cpm_low, cpm_high) = _naive_bootstrap(*args, 100, 3)
    assert iv.low == pytest.approx(low, abs=1e-12) and iv.high == pytest.approx(high, abs=1e-12)
    assert (iv.cpm_low, iv.cpm_high) == pytest.approx((cpm_low, cpm_high), abs=1e-12)
    point = list(froc_points(torch.from_numpy(gt_best), torch.from_numpy(fps), n_images).values())
    assert np.all(iv.low <= np.array(point) + 1e-12) and np.all(np.array(point) <= iv.high + 1e-12)
    assert np.all(iv.band_low <= iv.band_high)


def test_bootstrap_over_one_patient_has_no_spread():
    # Every image belongs to one patient: every resample is the whole data set.
    gt_best, fps, n = _gathered()
    groups = np.zeros(n, dtype=np.int64)
    iv = bootstrap_froc(gt_best.numpy(), np.zeros(4, np.int64), fps.numpy(), np.zeros(5, np.int64), groups, n_resamples=50)
    assert iv.low == pytest.approx(list(EXPECTED.values())) and iv.high == pytest.approx(list(EXPECTED.values()))
    assert iv.cpm_low == pytest.approx(4 / 7) and iv.cpm_high == pytest.approx(4 / 7)


def _proposals() -> list[torch.Tensor]:
    # image 0 covers A; image 1 covers C only at rank 101 (cut off at 100); image 3 covers D.
    far = _t([[500, 500, 510, 510]] * 100)
    return [
        _t([[10, 10, 50, 50]]),
        torch.cat([far, _t([[200, 200, 240, 240]])]),
        _t([[0, 0, 5, 5]]),
        _t([[30, 30, 70, 70]]),
    ]


def _meta() -> list[dict]:
    # images 0 and 1 from one patient, 2 and 3 from others; 0.5 mm pixels at half resolution
    return [{"scale": 0.5, "spacing": (0.5, 0.5), "patient_id": p} for p in ("P1", "P1", "P2", "P3")]


def test_detection_metrics_keys_and_values():
    preds, targets = fixture()
    metric = DetectionMetrics(class_names=["nodule", "mass"])
    metric.update(preds, targets, _proposals(), _meta())
    out = metric.compute()
    overall = FROC_KEYS + ["cpm", "map10", "map50", "map50_95"]
    per_class = [f"{name}/{key}" for name in ("nodule", "mass") for key in overall]
    rpn = [f"rpn_recall{k}" for k in (10, 50, 100, 300, 1000)] + ["rpn_ar100"]
    sized = [f"{name}_{size}" for size in ("small", "medium", "large") for name in rpn]
    assert list(out) == overall[:8] + ["cpm_iou50"] + overall[8:] + per_class + rpn + sized
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-./ ") for k in out)
    assert [float(out[k]) for k in FROC_KEYS] == pytest.approx(list(EXPECTED.values()))
    assert float(out["cpm"]) == pytest.approx(4 / 7)
    assert float(out["rpn_recall100"]) == pytest.approx(2 / 4)  # A and D of A, B, C, D
    assert float(out["rpn_recall300"]) == pytest.approx(3 / 4)  # C at rank 101
    assert 0.0 < float(out["map50"]) < 1.0
    metric.reset()
    metric.update(preds[2:3], targets[2:3])  # only the empty image, no proposals
    out = metric.compute()
    assert math.isnan(float(out["cpm"])) and math.isnan(float(out["rpn_recall100"]))
    assert math.isnan(float(out["map50"]))


def test_detection_metrics_map_agrees_with_faster_coco_eval_through_update():
    preds, targets = fixture()
    metric = DetectionMetrics(class_names=["nodule", "mass"])
    metric.update(preds, targets)
    r = metric.records()
    library = faster_coco_eval_average_precision(
        r.pred_image, r.pred_box, r.pred_score, r.pred_label, r.gt_image, r.gt_box, r.gt_label, 2, r.n_images
    )
    out = metric.report().scalars
    for key in ("map10", "map50", "map50_95"):
        assert out[key] == pytest.approx(library[key], abs=1e-12)


def test_map50_perfect_then_wrong_class():
    _, targets = fixture()
    perfect = [
        dict(boxes=t["boxes"].clone(), scores=torch.full((len(t["labels"]),), 0.9), labels=t["labels"].clone())
        for t in targets
    ]
    metric = DetectionMetrics()
    metric.update(perfect, targets)
    out = metric.compute()
    assert float(out["map50"]) == pytest.approx(1.0) and float(out["map50_95"]) == pytest.approx(1.0)
    assert float(out["froc_0.125fp"]) == 1.0
    wrong = [dict(p) for p in perfect]
    wrong[1] = dict(perfect[1], labels=torch.tensor([0, 0]))  # lesion B (class 1) called class 0
    metric = DetectionMetrics()
    metric.update(wrong, targets)
    out = metric.compute()
    assert float(out["map50"]) < 1.0
    assert float(out["froc_0.125fp"]) == 1.0  # FROC is class-agnostic


def _values(metric: DetectionMetrics, n_bootstrap: int = 0) -> dict[str, float]:
    return metric.report(n_bootstrap=n_bootstrap, target_fp_per_image=1.0).scalars


def test_detection_metrics_same_in_two_halves():
    preds, targets = fixture()
    proposals, meta = _proposals(), _meta()
    whole = DetectionMetrics()
    whole.update(preds, targets, proposals, meta)
    halves = DetectionMetrics()
    halves.update(preds[:2], targets[:2], proposals[:2], meta[:2])
    halves.update([], [], [], [])  # an empty batch (every file unreadable) changes nothing
    halves.update(preds[2:], targets[2:], proposals[2:], meta[2:])
    assert _values(halves, 100) == _values(whole, 100)


def _ddp_worker(rank: int, init_file: str, queue) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (hangs)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    preds, targets = fixture()
    proposals, meta = _proposals(), _meta()
    # Unequal shards (the states are flat, so no rank has to match another's image count);
    # rank 1 holds the empty image, and patient P1 is on rank 0 only.
    part = slice(0, 1) if rank == 0 else slice(1, 4)
    metric = DetectionMetrics()
    metric.update(preds[part], targets[part], proposals[part], meta[part])
    values = _values(metric, 100)
    if rank == 0:
        queue.put(values)
    dist.destroy_process_group()


def test_detection_metrics_same_under_ddp():
    preds, targets = fixture()
    single = DetectionMetrics()
    single.update(preds, targets, _proposals(), _meta())
    with tempfile.TemporaryDirectory() as tmp:
        # fork, so the ranks reuse this process's imports (spawn re-imports torch: 10+ s).
        queue = mp.get_context("fork").SimpleQueue()
        ranks = mp.start_processes(
            _ddp_worker, args=(os.path.join(tmp, "init"), queue), nprocs=2, join=False, start_method="fork"
        )
        deadline = time.monotonic() + 60
        while not ranks.join(timeout=1):
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                pytest.fail("DDP ranks did not finish within 60 s")
        ddp = queue.get()
    expected = _values(single, 100)
    assert "cpm_ci_low" in expected and "op_score_threshold" in expected
    assert ddp.keys() == expected.keys()
    assert all(ddp[k] == expected[k] or (math.isnan(ddp[k]) and math.isnan(expected[k])) for k in expected)


def test_one_box_over_two_adjacent_lesions_finds_one_of_them():
    # Lesions A [0,0,40,40] and B [40,0,80,40] side by side. The 0.9 box [0,0,70,40] overlaps
    # A at IoU 1600/2800 = 0.571 and B at 1200/3200 = 0.375: both >= 0.3, but it credits one
    # lesion, the one it fits best (A). The 0.6 box is A exactly: A is taken, so it is a
    # duplicate (neither hit nor FP). B is never found: sensitivity 1/2, not 2/2.
    lesions = _t([[0, 0, 40, 40], [40, 0, 80, 40]])
    preds = _t([[0, 0, 70, 40], [0, 0, 40, 40]])
    gt_best, fps = match_image(preds, torch.tensor([0.9, 0.6]), lesions, 0.3)
    assert gt_best.tolist() == pytest.approx([0.9, -math.inf])
    assert fps.numel() == 0
    # A third box (0.5) hitting both A (taken) and B takes B, the lesion still free.
    preds = torch.cat([preds, _t([[10, 0, 80, 40]])])  # IoU with A 1200/3200, with B 1600/2800
    assert hit_matrix(preds[2:], lesions, "iou", 0.3).tolist() == [[True, True]]
    gt_best, fps = match_image(preds, torch.tensor([0.9, 0.6, 0.5]), lesions, 0.3)
    assert gt_best.tolist() == pytest.approx([0.9, 0.5])
    assert fps.numel() == 0


def test_detection_metrics_credit_one_lesion_per_box():
    # The same two lesions on one image, the single 0.9 box over both: CPM 1/2 (it was 1).
    target = dict(boxes=_t([[0, 0, 40, 40], [40, 0, 80, 40]]), labels=torch.tensor([0, 0]))
    pred = dict(boxes=_t([[0, 0, 80, 40]]), scores=torch.tensor([0.9]), labels=torch.tensor([0]))
    metric = DetectionMetrics(class_names=["a"])
    metric.update([pred], [target])
    records = metric.records()
    assert sorted(records.gt_best_any.tolist()) == pytest.approx([-math.inf, 0.9])
    assert records.pred_fp_any.tolist() == [False]
    assert float(metric.compute()["cpm"]) == pytest.approx(0.5)


def test_center_rule_is_strict_like_luna16():
    lesion = _t([[0, 0, 20, 10]])  # centre (10, 5), radius 10
    on_the_edge = _t([[18, 3, 22, 7]])  # centre (20, 5): exactly 10 away
    assert hit_matrix(on_the_edge, lesion, "center").tolist() == [[False]]


def test_cpm_at_iou_05_is_reported_beside_the_chosen_rule():
    # Lesion [0,0,40,40]; the only prediction [0,0,40,100] overlaps it at IoU 1600/4000 = 0.4:
    # a hit at IoU 0.3 (CPM 1: found at 0 FP), a false positive at IoU 0.5 (CPM 0).
    target = dict(boxes=_t([[0, 0, 40, 40]]), labels=torch.tensor([0]))
    pred = dict(boxes=_t([[0, 0, 40, 100]]), scores=torch.tensor([0.9]), labels=torch.tensor([0]))
    for rule in ("iou", "center"):  # centre (20, 50) is 30 from (20, 20), radius 20: a miss
        metric = DetectionMetrics(froc_hit_rule=rule, froc_iou_threshold=0.3)
        metric.update([pred], [target])
        scalars = metric.compute()
        assert float(scalars["cpm"]) == pytest.approx(1.0 if rule == "iou" else 0.0)
        assert float(scalars["cpm_iou50"]) == pytest.approx(0.0)
    pred["boxes"] = _t([[0, 0, 40, 60]])  # IoU 1600/2400 = 0.67: a hit under both
    metric = DetectionMetrics()
    metric.update([pred], [target])
    assert float(metric.compute()["cpm_iou50"]) == pytest.approx(1.0)
    assert "CPM at IoU >= 0.5" in metric.report().to_table()
