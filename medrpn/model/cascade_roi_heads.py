"""A cascade second stage (Cascade R-CNN, Cai & Vasconcelos 2018): the box refined in steps.

One head trained on proposals matched at IoU 0.5 learns to name the lesion and to move a loose
box towards it, but a box at IoU 0.5 with its lesion is as good as it gets from training on such
boxes. The cascade repeats the second stage: each stage pools the boxes the previous one refined,
is trained on them matched at a stricter IoU (0.5, 0.6, 0.7 by default), and refines them again.
At inference the class probabilities of all stages are averaged (an ensemble of classifiers on
ever better boxes) and the last stage's box is kept.

As in the paper and mmdetection's `CascadeRoIHead`: each stage has its own MLP head; the box is
class-agnostic (one box per RoI, so the next stage has one box to pool); the box coder's weights
grow with the stage (10, 10, 5, 5 times 1, 2, 3), since refined boxes are nearer their lesions;
stage losses are weighted 1, 0.5, 0.25. Each stage is a `LesionRoIHeads` (torchvision's matching,
sampling with the ground-truth boxes added, encoding), so the box loss setting (`smooth_l1` or
`giou`) applies to every stage; the stage losses are summed into the usual `loss_classifier` and
`loss_box_reg`, and detections come out of torchvision's own post-processing (per-class score
threshold and NMS) of the last stage.

One departure, for CPUs: stages after the first pool detached features, so their losses train
their own heads but send no gradient back through RoI Align into the pyramid (the first stage's
and the RPN's do). On 2 CPU cores RoI Align's backward pass is the costliest op of the second
stage; with it for every stage the brain recipe trained at 0.73 of its plain speed, without it
at 0.87 (256 px, batch 8).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import boxes as box_ops

STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)  # Cascade R-CNN's, for its three stages
BASE_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # torchvision's Fast R-CNN box coder weights


def stage_box_weights(stage: int) -> tuple[float, float, float, float]:
    """The box coder weights of stage `stage` (0-based): torchvision's times 1, 2, 3, ..."""
    return tuple(w * (stage + 1) for w in BASE_BOX_WEIGHTS)  # type: ignore[return-value]


def stage_loss_weight(stage: int) -> float:
    """Stage `stage`'s loss weight: 1, 0.5, 0.25, then halving on."""
    return STAGE_LOSS_WEIGHTS[stage] if stage < len(STAGE_LOSS_WEIGHTS) else STAGE_LOSS_WEIGHTS[-1] / 2 ** (stage - 2)


class AgnosticBoxPredictor(nn.Module):
    """Class scores (background included) and one class-agnostic box offset per RoI."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(in_channels, num_classes)
        self.bbox_pred = nn.Linear(in_channels, 4)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x)


class CascadeRoIHeads(nn.Module):
    """Stages of `LesionRoIHeads` (with `AgnosticBoxPredictor`s) sharing one RoI pooler.

    Args:
        box_roi_pool: the pooler every stage uses (`MultiScaleRoIAlign` or `ContextRoIAlign`).
        stages: one `LesionRoIHeads` per stage, built with that stage's IoU thresholds and box
            coder weights; their own `box_roi_pool` is not used.
    """

    def __init__(self, box_roi_pool: nn.Module, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        if not stages:
            raise ValueError("a cascade needs at least one stage")
        self.box_roi_pool = box_roi_pool
        self.stages = nn.ModuleList(stages)

    def forward(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            return [], self._losses(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _run_stage(self, stage: nn.Module, features: dict[str, Tensor], boxes: list[Tensor], image_shapes) -> tuple[Tensor, Tensor]:
        pooled = stage.box_head(self.box_roi_pool(features, boxes, image_shapes))
        return stage.box_predictor(pooled)

    @staticmethod
    def _refine(stage: nn.Module, deltas: Tensor, boxes: list[Tensor], image_shapes) -> list[Tensor]:
        """The stage's refined boxes, per image, clipped to the image and at least 0.01 px wide and
        high (a box pushed off the image would otherwise have no size to encode against)."""
        decoded = stage.box_coder.decode_single(deltas.detach(), torch.cat(boxes)).split([len(b) for b in boxes])
        refined = []
        for per_image, shape in zip(decoded, image_shapes):
            per_image = box_ops.clip_boxes_to_image(per_image, shape)
            low = per_image[:, :2]
            refined.append(torch.cat([low, torch.maximum(per_image[:, 2:], low + 1e-2)], dim=1))
        return refined

    def _losses(self, features, proposals, image_shapes, targets) -> dict[str, Tensor]:
        total: dict[str, Tensor] = {}
        boxes = proposals
        detached = {name: f.detach() for name, f in features.items()}
        for i, stage in enumerate(self.stages):
            rois, _, labels, regression_targets = stage.select_training_samples([b.detach() for b in boxes], targets)
            class_logits, deltas = self._run_stage(stage, features if i == 0 else detached, rois, image_shapes)
            losses = stage.losses(class_logits, deltas, torch.cat(rois), torch.cat(labels), torch.cat(regression_targets))
            for name, value in losses.items():
                total[name] = total.get(name, 0.0) + stage_loss_weight(i) * value
            if i + 1 < len(self.stages):
                boxes = self._refine(stage, deltas, rois, image_shapes)
        return total

    def _detect(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        boxes = proposals
        probabilities = []
        for i, stage in enumerate(self.stages):
            class_logits, deltas = self._run_stage(stage, features, boxes, image_shapes)
            probabilities.append(class_logits.softmax(-1))
            if i + 1 < len(self.stages):
                boxes = self._refine(stage, deltas, boxes, image_shapes)
        last = self.stages[-1]
        mean = torch.stack(probabilities).mean(0)
        # torchvision's post-processing (score threshold, small boxes, per-class NMS, top k) on the
        # averaged probabilities (their log: softmax gives them back) and the last stage's box for
        # every class
        per_class = deltas.repeat(1, mean.shape[1])
        out_boxes, scores, labels = last.postprocess_detections(mean.clamp_min(1e-12).log(), per_class, boxes, image_shapes)
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(out_boxes, scores, labels)]
