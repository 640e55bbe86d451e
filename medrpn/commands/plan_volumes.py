"""`medrpn plan` for volumes: 3D anchors planned from the training split's boxes
(`medrpn.model.anchor_planning_3d`), on the pyramid levels of the config's `model.volume.backbone`.

Like the 2D plan it reads only the training split (the split `medrpn fit` will use) and prints the
coverage (share of boxes with an anchor at 3D IoU >= 0.5) and mean best IoU of the config's
anchors and of the plan, overall and per class; `--output NEW.yaml` writes `model.volume.anchors`
as a config to give after yours. No voxels are read: boxes and headers are enough (with
`data.target_spacing`, each scan's header gives the grid its boxes move to, as in training).
`plan_volume_anchors` is also what `model.volume.anchors: auto` runs when a `medrpn` run starts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medrpn.data.datamodule import LesionDataModule
from medrpn.data.records import Record
from medrpn.data.resampling import grid_zoom, record_on_grid
from medrpn.data.volume_files import read_volume_geometry
from medrpn.errors import ConfigError, DataError
from medrpn.model.anchor_planning import COVERAGE_IOU
from medrpn.model.anchor_planning_3d import Anchor3DPlan, Anchor3DScore, best_iou_3d, level_strides, plan_anchors_3d
from medrpn.model.detector_3d import VolumeModelConfig


def _volume_settings(config: dict[str, Any]) -> VolumeModelConfig:
    model = config.get("model") or {}
    model = model.get("init_args", model) if "class_path" in model else model
    return VolumeModelConfig(**(model.get("volume") or {}))


def _on_training_grid(record: Record, target_spacing: tuple[float, float, float] | None) -> Record:
    """The record's boxes in the voxels the model trains on: resampled to `target_spacing` (from
    the scan's header alone) when one is set. An unreadable header keeps the scan's own voxels:
    that scan leaves training when it is read, and `medrpn check-data` names it."""
    if target_spacing is None:
        return record
    try:
        geometry = read_volume_geometry(record.image_path)
    except DataError:
        return record
    return record_on_grid(record, grid_zoom(geometry.shape, geometry.spacing, target_spacing))


def plan_volume_anchors(config: dict[str, Any], budget: int, source: str) -> tuple[Anchor3DPlan, np.ndarray, np.ndarray, list[str]]:
    """The plan for a parsed training config on volumes, with the training boxes, labels and classes."""
    data = dict(config["data"])
    data.pop("on_error", None)
    quiet = logging.getLogger("medrpn.data")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # problems are `medrpn check-data`'s report
    try:
        dm = LesionDataModule(**data, on_error="skip")
    finally:
        quiet.setLevel(level)
    if dm.spatial_dims != 3:
        raise ConfigError(f"{source}: model.volume.anchors: auto plans 3D anchors, but the annotations are 2D boxes")
    train = [_on_training_grid(r, dm.target_spacing) for r in dm.splits["train"]]
    boxes = np.concatenate([r.boxes for r in train]).astype(np.float64) if train else np.zeros((0, 6))
    labels = np.concatenate([r.labels for r in train]) if train else np.zeros(0, np.int64)
    if len(boxes) == 0:
        raise DataError(data.get("annotations", source), "no box in the training split: nothing to plan anchors from")
    settings = _volume_settings(config)
    baseline = None if settings.anchors == "auto" else settings.anchors
    plan = plan_anchors_3d(boxes, level_strides(settings.backbone), budget, baseline)
    return plan, boxes, labels, list(dm.class_names)


def _line(name: str, score: Anchor3DScore, boxes: np.ndarray, labels: np.ndarray, classes: list[str], strides) -> str:
    covered = best_iou_3d(boxes, score.anchors, strides) >= COVERAGE_IOU
    per_class = ", ".join(f"{c} {covered[labels == i].mean():.1%}" for i, c in enumerate(classes) if np.any(labels == i))
    sizes = "[" + ", ".join("[" + ", ".join(f"{s:g}" for s in level) + "]" for level in score.anchors.sizes) + "]"
    ratios = [[float(f"{v:g}") for v in pair] for pair in score.anchors.aspect_ratios[0]]
    return (f"{name:<13} coverage {score.coverage:.1%}, mean IoU {score.mean_iou:.3f} (sizes {sizes}; "
            f"(h/w, d/w) ratios {ratios}); per class: {per_class}")


def run(config: dict[str, Any], budget: int, source: str, output: Path | None) -> None:
    """What `medrpn plan` prints (and writes with `--output`) for a config on volumes."""
    plan, boxes, labels, classes = plan_volume_anchors(config, budget, source)
    print(f"medrpn plan: {source}")
    print(f"boxes         {len(boxes)} in the training split (voxels); levels of stride "
          f"{', '.join('x'.join(map(str, s)) for s in plan.strides)}; coverage = share of boxes with an anchor at 3D IoU >= {COVERAGE_IOU}")
    if plan.before is not None:
        print(_line("before", plan.before, boxes, labels, classes, plan.strides))
    print(_line(f"planned (<={budget})", plan.planned, boxes, labels, classes, plan.strides))
    anchors = asdict(plan.anchors)
    print("plan          model.volume.anchors: " + yaml.safe_dump(anchors, default_flow_style=True, width=1_000_000).strip())
    if output is not None:
        text = (f"# 3D anchors planned by `medrpn plan` from the training boxes of {source}\n"
                + yaml.safe_dump({"model": {"volume": {"anchors": anchors}}}, sort_keys=False, default_flow_style=None))
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{output}: cannot write the planned config ({e.strerror})") from None
        print(f"wrote         {output}: train with it given after your config, e.g. medrpn fit --config {source.split(', ')[-1]} --config {output}")
