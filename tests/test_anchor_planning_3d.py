"""3D anchors planned from the boxes: the best-anchor IoU computed from the offset to the nearest
cell centre equals the brute-force maximum over every anchor MONAI's generator places on a real
grid; the plan covers more boxes than a poor start, within its budget, the same on every run;
`medrpn plan` on a volume config writes `model.volume.anchors` that build a detector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medrpn.model.anchor_planning_3d import anchor_shapes, best_iou_3d, level_strides, plan_anchors_3d
from medrpn.model.anchors_3d import CellCentredAnchors
from medrpn.model.detector_3d import Anchor3DConfig, Backbone3DConfig, Detector3DConfig, VolumeModelConfig, build_detector_3d
from tests.trained_run import REPO, medrpn


def _boxes(n: int, shape: tuple[int, int, int], seed: int) -> np.ndarray:
    """Round lesions of 3-30 mm on 0.9 x 0.9 x 3 mm voxels, each side within 20% of its diameter."""
    rng = np.random.default_rng(seed)
    diameters = np.exp(rng.uniform(np.log(3), np.log(30), n))
    sides = diameters[:, None] * rng.uniform(0.8, 1.2, (n, 3)) / np.array([0.9, 0.9, 3.0])
    lo = rng.uniform(0, np.asarray(shape) - sides)
    return np.concatenate([lo, lo + sides], axis=1)


def test_best_iou_equals_the_maximum_over_every_anchor_of_the_grid():
    from monai.data.box_utils import box_iou

    backbone = Backbone3DConfig()
    strides = level_strides(backbone)
    assert strides == [(4, 4, 2), (8, 8, 4), (16, 16, 8), (32, 32, 16)]  # stem (2, 2, 1), then halved four times
    anchors = Anchor3DConfig(sizes=[[5.0, 9.0], [12.0, 17.0], [24.0, 30.0], [40.0, 50.0]], aspect_ratios=[[[1.0, 0.4], [0.7, 0.3]]] * 4)
    shape = (64, 64, 32)
    generator = CellCentredAnchors(
        sizes=[tuple(s) for s in anchors.sizes], aspect_ratios=[[tuple(p) for p in r] for r in anchors.aspect_ratios], indexing="ij"
    )
    features = [torch.zeros(1, 1, *[n // s for n, s in zip(shape, stride)]) for stride in strides]
    every = generator(torch.zeros(1, 1, *shape), features)[0]
    boxes = _boxes(200, shape, seed=0)
    brute = box_iou(torch.as_tensor(boxes, dtype=torch.float32), every).amax(dim=1).numpy()
    assert best_iou_3d(boxes, anchors, strides) == pytest.approx(brute, abs=1e-5)
    assert [len(s) for s in anchor_shapes(anchors)] == [4] * 4


def test_the_plan_covers_more_within_its_budget_and_is_deterministic():
    strides = level_strides(Backbone3DConfig())
    boxes = _boxes(300, (96, 96, 32), seed=1)
    poor = Anchor3DConfig(sizes=[[40.0], [60.0], [80.0], [100.0]], aspect_ratios=[[[1.0, 1.0]]] * 4)
    plan = plan_anchors_3d(boxes, strides, budget=2, baseline=poor)
    default = plan_anchors_3d(boxes, strides, budget=2, baseline=Anchor3DConfig()).before
    assert plan.before.coverage < default.coverage  # the poor start is worse than the default anchors ...
    assert plan.planned.coverage > default.coverage + 0.2  # ... which the plan beats by far (0.04 -> 0.35 here)
    assert plan.planned.mean_iou > plan.before.mean_iou
    per_level = {len(s) * len(r) for s, r in zip(plan.anchors.sizes, plan.anchors.aspect_ratios)}
    assert len(per_level) == 1 and per_level.pop() <= 2  # the 3D RPN head: as many anchors on every level
    assert plan_anchors_3d(boxes, strides, budget=2, baseline=poor).anchors == plan.anchors
    # the config's anchors are a starting point: the plan is never worse than them at their count
    for budget in (1, 2):
        start = plan_anchors_3d(boxes[:40], strides, budget=budget, baseline=Anchor3DConfig())
        assert (start.planned.coverage, start.planned.mean_iou) >= (start.before.coverage, start.before.mean_iou)


def test_medrpn_plan_on_volumes_writes_anchors_that_build_a_detector(tmp_path: Path):
    from medrpn.data.synth_volumes import write_synthetic_volumes

    write_synthetic_volumes(tmp_path / "data", n_volumes=8, shape=(48, 48, 16), seed=2)
    out = tmp_path / "planned.yaml"
    result = medrpn(
        "plan", "--config", str(REPO / "configs" / "synth_volumes.yaml"),
        "--data.annotations", str(tmp_path / "data" / "annotations.csv"), "--output", str(out), cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "before" in output and "planned (<=3)" in output and "3D IoU >= 0.5" in output
    anchors = yaml.safe_load(out.read_text())["model"]["volume"]["anchors"]
    volume = VolumeModelConfig(anchors=anchors)
    detector = build_detector_3d(Detector3DConfig(num_classes=2, backbone=volume.backbone, anchors=volume.anchors)).eval()
    with torch.no_grad():
        found = detector(torch.rand(1, 1, 32, 32, 16)).detections[0]
    assert found["boxes"].shape[1] == 6


def test_fit_with_volume_anchors_auto_plans_them_and_records_the_plan(tmp_path: Path):
    from medrpn.data.synth_volumes import write_synthetic_volumes

    write_synthetic_volumes(tmp_path / "data", n_volumes=6, shape=(40, 40, 16), seed=4)
    result = medrpn(
        "fit", "--config", str(REPO / "configs" / "synth_volumes.yaml"),
        "--data.annotations", str(tmp_path / "data" / "annotations.csv"), "--data.num_workers", "0",
        "--data.val_fraction", "0.34", "--data.test_fraction", "0.0", "--data.patches.size", "[32, 32, 16]",
        "--model.volume.window", "[40, 40, 16]", "--model.volume.anchors", "auto", "--model.anchors_per_position", "2",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1", cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "medrpn: 3D anchors planned from the training boxes" in output
    checkpoint = torch.load(tmp_path / "demo" / "volume_checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    anchors = checkpoint["hyper_parameters"]["volume"]["anchors"]
    assert isinstance(anchors, dict) and len(anchors["sizes"]) == 4
    assert max(len(s) * len(r) for s, r in zip(anchors["sizes"], anchors["aspect_ratios"])) <= 2


def test_the_module_in_python_asks_for_planned_anchors_instead_of_auto():
    from medrpn.errors import ConfigError
    from medrpn.training.lightning_module import LesionDetectionModule

    with pytest.raises(ConfigError, match="plan_volume_anchors"):
        LesionDetectionModule(class_names=["a"], spatial_dims=3, volume=VolumeModelConfig(anchors="auto"))
