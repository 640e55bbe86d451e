"""FROC per scan on volumes, worked by hand: 3D IoU and LUNA16's centre rule, one lesion per
prediction, false positives counted per scan (the scan without lesions included)."""

from __future__ import annotations

import math

import pytest
import torch

from medrpn.metrics.froc import cpm, froc_points, hit_quality, match_image


def _scans():
    lesions_a = torch.tensor([[0, 0, 0, 10, 10, 10], [20, 20, 20, 30, 30, 30]], dtype=torch.float32)
    predictions_a = torch.tensor(
        [
            [1, 1, 1, 11, 11, 11],  # 0.9: IoU with the first 729 / 1271 = 0.574
            [50, 50, 50, 60, 60, 60],  # 0.8: nothing there
            [20, 20, 20, 30, 30, 36],  # 0.6: IoU with the second 1000 / 1600 = 0.625
        ],
        dtype=torch.float32,
    )
    predictions_b = torch.tensor([[5, 5, 5, 9, 9, 9]], dtype=torch.float32)  # 0.7, on a scan without lesions
    return (predictions_a, torch.tensor([0.9, 0.8, 0.6]), lesions_a), (predictions_b, torch.tensor([0.7]), torch.zeros(0, 6))


def test_3d_iou_is_the_volume_overlap():
    quality = hit_quality(torch.tensor([[1.0, 1, 1, 11, 11, 11]]), torch.tensor([[0.0, 0, 0, 10, 10, 10]]))
    assert quality.item() == pytest.approx(729 / 1271)


def test_froc_per_scan_worked_by_hand():
    found, false_positives = [], []
    for predictions, scores, lesions in _scans():
        best, fp = match_image(predictions, scores, lesions, iou_threshold=0.5)
        found.append(best)
        false_positives.append(fp)
    best, fp = torch.cat(found), torch.cat(false_positives)
    assert best.tolist() == pytest.approx([0.9, 0.6]) and sorted(fp.tolist()) == pytest.approx([0.7, 0.8])
    # thresholds 0.9 / 0.8 / 0.7 / 0.6 over 2 scans: (0 FP/scan, 1/2), (0.5, 1/2), (1, 1/2), (1, 1)
    points = froc_points(best, fp, n_images=2)
    assert [points[r] for r in (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)] == [0.5, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0]
    assert cpm(points) == pytest.approx(5.5 / 7)


def test_one_box_over_two_lesions_finds_one_and_the_centre_rule_in_3d():
    lesions = torch.tensor([[0, 0, 0, 4, 4, 4], [4, 0, 0, 8, 4, 4]], dtype=torch.float32)
    over_both = torch.tensor([[0, 0, 0, 8, 4, 4]], dtype=torch.float32)  # IoU 0.5 with each
    best, fp = match_image(over_both, torch.tensor([0.9]), lesions, iou_threshold=0.5)
    assert sorted(best.tolist()) == [-math.inf, pytest.approx(0.9)] and len(fp) == 0
    near = torch.tensor([[1, 1, 2.9, 3, 3, 4.9]], dtype=torch.float32)  # centre 1.9 from the first's (radius 2)
    best, _ = match_image(near, torch.tensor([0.5]), lesions, rule="center")
    assert best.tolist()[0] == pytest.approx(0.5)
    far = torch.tensor([[1, 1, 3, 3, 3, 5]], dtype=torch.float32)  # centre exactly 2.0 away: not strictly inside
    best, fp = match_image(far, torch.tensor([0.5]), lesions, rule="center")
    assert best.tolist() == [-math.inf, -math.inf] and fp.tolist() == [0.5]


def test_2d_and_3d_boxes_are_not_mixed():
    with pytest.raises(ValueError, match="must both be 2D or both 3D boxes"):
        match_image(torch.zeros(1, 4), torch.ones(1), torch.tensor([[0.0, 0, 0, 1, 1, 1]]))


def test_detection_metrics_count_volumes_per_scan_worked_by_hand():
    """The epoch metric of training and evaluation on volumes: FROC per scan, 3D mAP, proposal
    recall and lesion sizes in mm from anisotropic spacings, each worked out by hand."""
    from medrpn.metrics import DetectionMetrics

    metrics = DetectionMetrics(class_names=["a", "b"], spatial_dims=3)
    t = torch.tensor
    preds = [
        # scan 1: lesion a found exactly (0.9); one false positive (0.8)
        {"boxes": t([[10, 10, 10, 20, 20, 14], [40, 40, 0, 50, 50, 4.0]]), "scores": t([0.9, 0.8]), "labels": t([0, 0])},
        # scan 2: lesion b found with 3D IoU 64 / 128 = 0.5 (0.7)
        {"boxes": t([[0, 0, 0, 8, 8, 1.0]]), "scores": t([0.7]), "labels": t([1])},
    ]
    targets = [{"boxes": t([[10, 10, 10, 20, 20, 14.0]]), "labels": t([0])}, {"boxes": t([[0, 0, 0, 8, 8, 2.0]]), "labels": t([1])}]
    proposals = [t([[40, 40, 0, 50, 50, 4.0], [10, 10, 10, 20, 20, 14]]), torch.zeros(0, 6)]
    meta = [{"spacing": (1.0, 1.0, 3.0), "patient_id": "p1"}, {"spacing": (0.5, 0.5, 2.0), "patient_id": "p2"}]
    metrics.update(preds, targets, proposals, meta)
    s = metrics.report(n_bootstrap=0).scalars
    # 2 scans: 0 FPs above 0.8 finds a (1/2); at 0.7, 1 FP (0.5 per scan) finds both
    assert s["froc_0.125fp"] == s["froc_0.25fp"] == 0.5
    assert all(s[f"froc_{r}fp"] == 1.0 for r in ("0.5", "1", "2", "4", "8"))
    assert s["cpm"] == pytest.approx(6 / 7)
    assert s["cpm_iou50"] == pytest.approx(6 / 7)  # IoU exactly 0.5 counts, as in COCO
    # mAP in 3D: class a AP 1 at every IoU; class b AP 1 at 0.5 only, so 1/10 over 0.5:0.95
    assert s["map50"] == 1.0 and s["b/map50_95"] == pytest.approx(0.1) and s["map50_95"] == pytest.approx(0.55)
    # proposal recall: a is proposed, b is not; a is 10 x 10 x 12 mm (medium), b 4 x 4 x 4 mm (small)
    assert s["rpn_recall100"] == 0.5 and s["rpn_recall100_medium"] == 1.0 and s["rpn_recall100_small"] == 0.0
    records = metrics.records()
    assert records.gt_size_mm.tolist() == pytest.approx([1200 ** (1 / 3), 4.0])
    assert records.gt_box.shape == (2, 6)


def test_detection_metrics_refuse_a_spatial_dims_other_than_2_or_3():
    from medrpn.metrics import DetectionMetrics

    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        DetectionMetrics(spatial_dims=4)
