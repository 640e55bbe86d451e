"""Tests of medrpn.metrics: FROC on a hand-worked fixture, matching edge cases, proposal recall,
and the DetectionMetrics wrapper (keys, mAP, batch-split and two-process DDP invariance)."""

from __future__ import annotations

import math
import os
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from medrpn.metrics import (
    FP_RATES,
    DetectionMetrics,
    cpm,
    froc_curve,
    froc_points,
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
    0.35, 0.2; 4 images. Thresholds from the top (TP, FP -> FP/image, sensitivity):
      0.9 (1,0) -> 0.00, .25     0.4  (2,3) -> 0.75, .50
      0.8 (1,1) -> 0.25, .25     0.35 (2,4) -> 1.00, .50
      0.7 (1,2) -> 0.50, .25     0.3  (3,4) -> 1.00, .75
      0.5 (2,2) -> 0.50, .50     0.2  (3,5) -> 1.25, .75
    Best sensitivity with FP/image <= rate: 1/8 -> .25, 1/4 -> .25, 1/2 -> .50, 1 -> .75,
    2, 4, 8 -> .75. CPM = (.25 + .25 + .5 + 4 * .75) / 7 = 4/7.
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


def _gathered() -> tuple[torch.Tensor, torch.Tensor, int]:
    preds, targets = fixture()
    matched = [match_image(p["boxes"], p["scores"], t["boxes"], 0.3) for p, t in zip(preds, targets)]
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


def test_fixture_froc_curve():
    gt_best, fps, n = _gathered()
    fp_per_image, sensitivity = froc_curve(gt_best, fps, n)
    assert fp_per_image.tolist() == pytest.approx([0, 0.25, 0.5, 0.5, 0.75, 1, 1, 1.25])
    assert sensitivity.tolist() == pytest.approx([0.25, 0.25, 0.25, 0.5, 0.5, 0.5, 0.75, 0.75])


def test_froc_points_is_conservative_step():
    # One image: FP at 0.9, lesion hit at 0.5. No threshold reaches <= 0.5 FP/image while
    # finding the lesion, and keeping nothing gives 0, so low rates read 0 (not interpolated).
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


def test_proposal_hits_top_k_cuts_off_a_hit():
    gts = _t([[0, 0, 10, 10], [50, 50, 60, 60]])
    proposals = _t([[0, 0, 10, 11], [200, 200, 210, 210], [50, 50, 60, 60]])  # best first
    assert proposal_hits(proposals, gts, top_k=2) == 1
    assert proposal_hits(proposals, gts, top_k=3) == 2
    assert proposal_hits(proposals, gts, top_k=3, iou_threshold=0.95) == 1  # 100/110 < 0.95
    assert proposal_hits(_t([]), gts) == 0 and proposal_hits(proposals, _t([])) == 0


def _proposals() -> list[torch.Tensor]:
    # image 0 covers A; image 1 covers C only at rank 101 (cut off); image 3 covers D.
    far = _t([[500, 500, 510, 510]] * 100)
    return [
        _t([[10, 10, 50, 50]]),
        torch.cat([far, _t([[200, 200, 240, 240]])]),
        _t([[0, 0, 5, 5]]),
        _t([[30, 30, 70, 70]]),
    ]


def test_detection_metrics_keys_and_values():
    preds, targets = fixture()
    metric = DetectionMetrics()
    metric.update(preds, targets, _proposals())
    out = metric.compute()
    froc_keys = ["froc_0.125fp", "froc_0.25fp", "froc_0.5fp", "froc_1fp", "froc_2fp", "froc_4fp", "froc_8fp"]
    assert list(out) == froc_keys + ["cpm", "map50", "rpn_recall100"]
    assert all(set(k) <= set("abcdefghijklmnopqrstuvwxyz0123456789_-./ ") for k in out)
    assert [float(out[k]) for k in froc_keys] == pytest.approx(list(EXPECTED.values()))
    assert float(out["cpm"]) == pytest.approx(4 / 7)
    assert float(out["rpn_recall100"]) == pytest.approx(2 / 4)  # A and D of A, B, C, D
    assert 0.0 < float(out["map50"]) < 1.0
    metric.reset()
    metric.update(preds[2:3], targets[2:3])  # only the empty image, no proposals
    out = metric.compute()
    assert math.isnan(float(out["cpm"])) and math.isnan(float(out["rpn_recall100"]))
    assert math.isnan(float(out["map50"]))


def test_map50_perfect_then_wrong_class():
    _, targets = fixture()
    perfect = [
        dict(boxes=t["boxes"].clone(), scores=torch.full((len(t["labels"]),), 0.9), labels=t["labels"].clone())
        for t in targets
    ]
    metric = DetectionMetrics()
    metric.update(perfect, targets)
    out = metric.compute()
    assert float(out["map50"]) == pytest.approx(1.0)
    assert float(out["froc_0.125fp"]) == 1.0
    wrong = [dict(p) for p in perfect]
    wrong[1] = dict(perfect[1], labels=torch.tensor([0, 0]))  # lesion B (class 1) called class 0
    metric = DetectionMetrics()
    metric.update(wrong, targets)
    out = metric.compute()
    assert float(out["map50"]) < 1.0
    assert float(out["froc_0.125fp"]) == 1.0  # FROC is class-agnostic


def _values(metric: DetectionMetrics) -> dict[str, float]:
    return {k: float(v) for k, v in metric.compute().items()}


def test_detection_metrics_same_in_two_halves():
    preds, targets = fixture()
    proposals = _proposals()
    whole = DetectionMetrics(proposal_top_k=101)
    whole.update(preds, targets, proposals)
    halves = DetectionMetrics(proposal_top_k=101)
    halves.update(preds[:2], targets[:2], proposals[:2])
    halves.update(preds[2:], targets[2:], proposals[2:])
    assert _values(halves) == _values(whole)
    assert _values(whole)["rpn_recall101"] == pytest.approx(3 / 4)


def _ddp_worker(rank: int, init_file: str, queue) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool (hangs)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    preds, targets = fixture()
    proposals = _proposals()
    # Equal shards, as DistributedSampler gives (torchmetrics' mAP gathers per image, so it needs
    # the same number of images on every rank); rank 1 holds the empty image.
    part = slice(0, 2) if rank == 0 else slice(2, 4)
    metric = DetectionMetrics()
    metric.update(preds[part], targets[part], proposals[part])
    values = _values(metric)
    if rank == 0:
        queue.put(values)
    dist.destroy_process_group()


def test_detection_metrics_same_under_ddp():
    preds, targets = fixture()
    single = DetectionMetrics()
    single.update(preds, targets, _proposals())
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
    assert ddp == _values(single)
