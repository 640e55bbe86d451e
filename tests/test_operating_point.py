"""The operating point: picked on validation data for a false-positive budget, stored in the
checkpoint as plain floats, and reproducing its false-positive rate on the data it was picked on."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medrpn.metrics import match_image, pick_operating_point, rates_at_threshold
from trained_run import TrainedRun, trained_run


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).reshape(-1, 4)


def test_hand_worked_pick():
    # The sloped FROC fixture of test_metrics: 2 images, lesions A, B, C. Thresholds (FPs, found):
    # 0.9 (1, 0), 0.8 (1, 1), 0.7 (1, 2), 0.6 (3, 3). A budget of 1 FP/image allows 2 FPs: the
    # lowest threshold within it is 0.7 (1 FP = 0.5 per image, 2 of 3 lesions).
    gt_best = torch.tensor([0.8, 0.7, 0.6])
    fps = torch.tensor([0.9, 0.6, 0.6])
    op = pick_operating_point(gt_best, fps, n_images=2, target_fp_per_image=1.0)
    assert (op.score_threshold, op.fp_per_image, op.sensitivity) == pytest.approx((0.7, 0.5, 2 / 3))
    # 1.5 FP/image allows all 3 FPs: threshold 0.6 finds everything
    op = pick_operating_point(gt_best, fps, n_images=2, target_fp_per_image=1.5)
    assert (op.score_threshold, op.fp_per_image, op.sensitivity) == pytest.approx((0.6, 1.5, 1.0))
    assert op.as_dict() == {"score_threshold": pytest.approx(0.6), "fp_per_image": 1.5, "sensitivity": 1.0, "target_fp_per_image": 1.5}


def test_budget_below_the_top_false_positive_keeps_nothing():
    top = torch.tensor([0.9])  # float32, as detector scores are
    op = pick_operating_point(torch.tensor([0.5]), top, n_images=4, target_fp_per_image=0.0)
    assert op.fp_per_image == 0.0 and op.sensitivity == 0.0
    assert not bool((top >= op.score_threshold).any()) and op.score_threshold > float(top)  # float32 and float64
    empty = pick_operating_point(torch.tensor([-math.inf]), torch.empty(0), n_images=1)
    assert empty.score_threshold == 0.0 and empty.fp_per_image == 0.0 and empty.sensitivity == 0.0


def test_threshold_reproduces_its_rate_when_the_matching_is_redone():
    # Random images; the operating point is re-checked by matching only the kept predictions,
    # image by image, and counting false positives and found lesions from scratch.
    rng = np.random.default_rng(0)
    images = []
    for _ in range(60):
        gts = rng.uniform(0, 200, (rng.integers(0, 4), 2))
        gts = np.concatenate([gts, gts + rng.uniform(10, 50, gts.shape)], axis=1)
        near = gts[rng.integers(0, len(gts), 3)] + rng.normal(0, 5, (3, 4)) if len(gts) else np.zeros((0, 4))
        far = rng.uniform(0, 200, (8, 2))
        boxes = np.concatenate([near, np.concatenate([far, far + 20], axis=1)])
        scores = np.round(rng.random(len(boxes)), 2)  # ties included
        images.append((_t(boxes.tolist()), torch.tensor(scores, dtype=torch.float32), _t(gts.tolist())))
    matched = [match_image(b, s, g, 0.3) for b, s, g in images]
    gt_best, fps = torch.cat([m[0] for m in matched]), torch.cat([m[1] for m in matched])
    for target in (0.25, 1.0, 2.0):
        op = pick_operating_point(gt_best, fps, len(images), target)
        n_fp = n_found = 0
        for boxes, scores, gts in images:
            keep = scores >= op.score_threshold
            best, fp = match_image(boxes[keep], scores[keep], gts, 0.3)
            n_fp += len(fp)
            n_found += int(torch.isfinite(best).sum())
        assert n_fp / len(images) == pytest.approx(op.fp_per_image) and op.fp_per_image <= target
        assert n_found / len(gt_best) == pytest.approx(op.sensitivity)
        # the next lower threshold would break the budget: the pick is the most sensitive one
        lower = fps[fps < op.score_threshold]
        if len(lower):
            assert rates_at_threshold(gt_best, fps, len(images), float(lower.max()))[0] > target


@pytest.fixture(scope="module")
def run(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


def test_checkpoint_operating_point_reproduces_on_the_validation_split(run):
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.training.lightning_module import LesionDetectionModule

    checkpoint = torch.load(run.ckpt, map_location="cpu", weights_only=True)  # plain data only
    op = checkpoint["operating_point"]
    assert set(op) == {"score_threshold", "fp_per_image", "sensitivity", "target_fp_per_image"}
    assert all(type(v) is float for v in op.values()) and op["target_fp_per_image"] == 1.0
    assert op["fp_per_image"] <= 1.0

    # Run the checkpoint over the validation split it was picked on, keep what scores at least
    # the threshold, and count false positives and found lesions with the plain matching function.
    module = LesionDetectionModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    data = {k: v for k, v in checkpoint["datamodule_hyper_parameters"].items() if not k.startswith("_")}
    datamodule = LesionDataModule(**data)
    datamodule.setup("validate")
    n_images = n_fp = n_found = n_lesions = 0
    n_predictions = 0
    with torch.inference_mode():
        for batch in datamodule.val_dataloader():
            if len(batch["images"]) == 0:
                continue
            for det, target in zip(module(batch["images"]).detections, batch["targets"]):
                keep = det["scores"] >= op["score_threshold"]
                best, fp = match_image(det["boxes"][keep], det["scores"][keep], target["boxes"], 0.3)
                n_images += 1
                n_fp += len(fp)
                n_found += int(torch.isfinite(best).sum())
                n_lesions += len(target["boxes"])
                n_predictions += len(det["scores"])
    assert n_images > 0 and n_predictions > 0  # a real case: the model does propose lesions
    assert n_fp / n_images == pytest.approx(op["fp_per_image"])
    if n_lesions:
        assert n_found / n_lesions == pytest.approx(op["sensitivity"])
