"""The detector alone and with its second stage, measured on the same images in one pass.

Both go through `DetectionMetrics` (FROC/CPM per class, mAP, proposal recall) exactly as
`medrpn evaluate` measures a detector, so the two rows of `comparison_table` differ only by the
second stage. In ``proposals`` mode this is the comparison of the integrated RoI head with the
crop classifier, both fed by the same RPN.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from medrpn.metrics import DetectionMetrics, EvaluationReport
from medrpn.metrics.froc import FP_RATES
from medrpn.metrics.report import froc_key, metric_safe
from medrpn.second_stage.rescoring import SecondStage


@torch.inference_mode()
def measure_second_stage(
    detector: torch.nn.Module,
    stage: SecondStage,
    batches: Iterable[dict[str, Any]],
    detector_class_names: list[str],
    metric_args: dict[str, Any],
) -> tuple[DetectionMetrics, DetectionMetrics]:
    """The detector alone and followed by ``stage``, accumulated over ``batches`` in one pass of
    the detector, for the caller to report as it needs (`medrpn evaluate` reports the first as
    its main figures, with the checkpoint's operating point and bootstrap intervals).

    Args:
        detector: a `LesionDetector` in eval mode; ``stage`` is moved to its device.
        stage: the second stage (its figures are per class of ``stage.class_names``).
        batches: batches in the format of `medrpn.data.batch` (no augmentation).
        detector_class_names: the classes the detector reports. An RPN-only detector reports one,
            so alone it is measured class-agnostic, as in training (every lesion of that class).
        metric_args: further `DetectionMetrics` settings (froc_hit_rule, froc_iou_threshold).
    """
    device = next(detector.parameters()).device
    stage = stage.to(device).eval()
    alone = DetectionMetrics(class_names=list(detector_class_names), **metric_args)
    with_stage = DetectionMetrics(class_names=stage.class_names, **metric_args)
    one_class = getattr(detector, "rpn_only", False)
    for batch in batches:
        if len(batch["images"]) == 0:
            continue
        images = batch["images"].to(device)
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch["targets"]]
        output = detector(images)
        alone_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets] if one_class else targets
        alone.update(output.detections, alone_targets, output.proposals, batch.get("meta"))
        with_stage.update(stage(images, output), targets, output.proposals, batch.get("meta"))
    return alone, with_stage


def comparison_table(alone: EvaluationReport, with_stage: EvaluationReport) -> str:
    """FROC sensitivity at 1/8 .. 8 FP per image and CPM (and, class-agnostic, the CPM at IoU >= 0.5),
    detector alone above with the second stage, class-agnostic and per class (of the second stage; "n/a" where the detector alone has
    no such class)."""
    def fmt(value: float) -> str:
        return "n/a" if not math.isfinite(value) else f"{value:.3f}"

    lines = [f"{'FROC sensitivity':<34}" + "".join(f"{r:>8g}" for r in FP_RATES) + f"{'CPM':>8}{'IoU0.5':>8}"]
    names = ["all"] + (with_stage.class_names if len(with_stage.class_names) > 1 else [])
    for name in names:
        prefix = "" if name == "all" else f"{metric_safe(name)}/"
        for title, report in ((f"{name}: detector alone", alone), (f"{name}: + second stage", with_stage)):
            s = report.scalars
            row = [s.get(f"{prefix}{froc_key(r)}", math.nan) for r in FP_RATES] + [s.get(f"{prefix}cpm", math.nan)]
            if name == "all":  # the class-agnostic CPM at IoU >= 0.5, comparable across projects
                row.append(s.get("cpm_iou50", math.nan))
            lines.append(f"{title:<34}" + "".join(f"{fmt(v):>8}" for v in row))
    return "\n".join(lines)
