"""The Region Proposal Network: "something is here", with no idea yet of what.

At every position of every pyramid level that carries anchors, a shared head (a 3x3 convolution
followed by two sibling 1x1 convolutions) predicts, for each anchor, an objectness score and four
box-regression offsets (dx, dy, dw, dh). Proposals are the anchors moved by those offsets, clipped
to the image, reduced to the best `pre_nms_top_n` per level, de-duplicated by non-maximum
suppression and cut to `post_nms_top_n`, best first, each with its objectness probability. For the
loss, anchors are matched to ground-truth boxes by IoU (positive above `fg_iou_thresh`, negative
below `bg_iou_thresh`, plus the best anchor of every box); which of them count, and how, is the
`sampler` setting (see `rpn_losses`).

The machinery (head, box coder, matcher, NMS) is torchvision's; `LesionRPN` changes only what the
design choices below need, and with the default settings gives exactly torchvision's proposals.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

from medrpn.errors import ConfigError
from medrpn.model.flip_proposals import FLIP_DIMS, VOLUME_FLIP_DIMS
from medrpn.model.rpn_losses import (
    focal_losses,
    object_logit,
    quality_focal_losses,
    sampled_losses,
)

OBJECTNESS = ("sigmoid", "softmax")
SAMPLERS = ("balanced", "hard_negative", "focal", "quality_focal")
NO_SAMPLING = ("focal", "quality_focal")
FOCAL_PRIOR = 0.01  # RetinaNet: with focal loss, anchors start at this object probability


@dataclass
class RPNConfig:
    """Settings of the Region Proposal Network.

    Attributes:
        fg_iou_thresh: anchors with IoU >= this with a ground-truth box are positives.
        bg_iou_thresh: anchors with IoU < this with every ground-truth box are negatives.
        batch_size_per_image: anchors sampled per image for the loss (balanced, hard_negative).
        positive_fraction: wanted fraction of positives in that sample.
        pre_nms_top_n_train / pre_nms_top_n_test: best proposals kept per level before NMS.
        post_nms_top_n_train / post_nms_top_n_test: proposals kept per image after NMS.
        nms_thresh: IoU above which the lower-scoring of two proposals is suppressed.
        nms_thresh_train: the same while training, where the proposals are what the second stage
            samples its RoIs from; None: `nms_thresh`. A higher value in training (Faster R-CNN's
            0.7) leaves the second stage more lesion RoIs per image, at more IoUs, to learn the
            lesion type and the box from, whatever NMS the proposals get at test time.
        score_thresh: proposals with a lower objectness probability are dropped.
        conv_depth: 3x3 convolutions in the shared head.
        objectness: "sigmoid" (one logit per anchor, torchvision) or "softmax" (background and
            object scores with cross-entropy, the Faster R-CNN paper).
        sampler: "balanced" (random, torchvision), "hard_negative" (highest-scoring negatives,
            MONAI/nnDetection), "focal" (no sampling, focal loss over all anchors, RetinaNet) or
            "quality_focal" (as focal, with a positive's target the IoU its regressed box reaches:
            GFL's quality focal loss; proposals ranked by fit).
        hard_negative_pool: hard_negative only: negatives are drawn at random among the
            `pool x needed` highest-scoring ones (1 = exactly the highest-scoring).
        focal_alpha / focal_gamma: focal only: weight of positives and focusing exponent
            (quality_focal uses focal_gamma as its exponent beta and weighs positives by no alpha).
        test_flips: at test time also propose on these mirrored copies of the image
            ("horizontal", "vertical"; for volumes "x", "y", "z") and merge the proposals by NMS
            (see `flip_proposals`); one more backbone and RPN pass per flip. Empty: the image
            alone (torchvision).
    """

    fg_iou_thresh: float = 0.7
    bg_iou_thresh: float = 0.3
    batch_size_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_top_n_train: int = 1000
    pre_nms_top_n_test: int = 500
    post_nms_top_n_train: int = 500
    post_nms_top_n_test: int = 300
    nms_thresh: float = 0.7
    nms_thresh_train: Optional[float] = None
    score_thresh: float = 0.0
    conv_depth: int = 1
    objectness: str = "sigmoid"
    sampler: str = "balanced"
    hard_negative_pool: float = 10.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    test_flips: list[str] = field(default_factory=list)

    def nms_thresh_for(self, training: bool) -> float:
        """The proposals' NMS threshold in training or at test time."""
        if training and self.nms_thresh_train is not None:
            return self.nms_thresh_train
        return self.nms_thresh


class LesionRPN(RegionProposalNetwork):
    """torchvision's RPN, with objectness and sampling as configured, over the levels with anchors.

    Calling it returns `(boxes, scores, losses)`: per image the proposals (P, 4) best first and
    their objectness probabilities (P,) in [0, 1], and in training the losses `loss_objectness`
    and `loss_rpn_box_reg`.

    Args:
        anchor_generator: anchors for the carrying levels; its `levels` attribute (if any) gives
            which feature maps those are, otherwise every feature map is used.
        head: predicts per anchor `scores_per_anchor` objectness scores and 4 box offsets.
        config: the settings (validated by `build_rpn`).
    """

    def __init__(self, anchor_generator: AnchorGenerator, head: nn.Module, config: RPNConfig) -> None:
        super().__init__(
            anchor_generator,
            head,
            fg_iou_thresh=config.fg_iou_thresh,
            bg_iou_thresh=config.bg_iou_thresh,
            batch_size_per_image=config.batch_size_per_image,
            positive_fraction=config.positive_fraction,
            pre_nms_top_n={"training": config.pre_nms_top_n_train, "testing": config.pre_nms_top_n_test},
            post_nms_top_n={"training": config.post_nms_top_n_train, "testing": config.post_nms_top_n_test},
            nms_thresh=config.nms_thresh,
            score_thresh=config.score_thresh,
        )
        self.nms_thresh_train = config.nms_thresh_for(training=True)
        self.levels: Optional[list[int]] = getattr(anchor_generator, "levels", None)
        self.scores_per_anchor = 2 if config.objectness == "softmax" else 1
        self.sampler = config.sampler
        self.focal_alpha = config.focal_alpha
        self.focal_gamma = config.focal_gamma
        if config.sampler == "hard_negative":
            from medrpn.model.hard_negative_sampler import HardNegativeRPNSampler  # MONAI: only when used

            self.fg_bg_sampler = HardNegativeRPNSampler(
                config.batch_size_per_image, config.positive_fraction, config.hard_negative_pool
            )
        elif config.sampler in NO_SAMPLING:
            self.fg_bg_sampler = None

    def filter_proposals(
        self, proposals: Tensor, objectness: Tensor, image_shapes: list[tuple[int, int]], num_anchors_per_level: list[int]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """torchvision's selection, with the training NMS threshold while training; `nms_thresh`
        stays the test-time value outside this call (flip merging reads it)."""
        if not self.training:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        test_thresh, self.nms_thresh = self.nms_thresh, self.nms_thresh_train
        try:
            return super().filter_proposals(proposals, objectness, image_shapes, num_anchors_per_level)
        finally:
            self.nms_thresh = test_thresh

    def compute_loss(
        self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor], regression_targets: list[Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Objectness and box losses; `objectness` is (R, 1) logits or (R, 2) background/object scores."""
        if self.sampler == "focal":
            return focal_losses(
                objectness, pred_bbox_deltas, labels, regression_targets, self.focal_alpha, self.focal_gamma
            )
        if self.sampler == "quality_focal":
            return quality_focal_losses(
                objectness, pred_bbox_deltas, labels, regression_targets, self.focal_gamma, self.box_coder
            )
        if self.sampler == "hard_negative":
            probabilities = torch.sigmoid(object_logit(objectness.detach()))
            positives, negatives = self.fg_bg_sampler(labels, probabilities)
        else:
            positives, negatives = self.fg_bg_sampler(labels)
        return sampled_losses(objectness, pred_bbox_deltas, labels, regression_targets, positives, negatives)

    def forward(
        self,
        images: ImageList,
        features: dict[str, Tensor],
        targets: Optional[list[dict[str, Tensor]]] = None,
    ) -> tuple[list[Tensor], list[Tensor], dict[str, Tensor]]:
        """Proposals, their objectness probabilities and (in training, `targets` required) the losses."""
        maps = list(features.values())
        if self.levels is not None:
            maps = [maps[i] for i in self.levels]
        objectness, pred_bbox_deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        num_images = len(anchors)
        num_anchors_per_level = [o[0].numel() // self.scores_per_anchor for o in objectness]
        objectness, pred_bbox_deltas = concat_box_prediction_layers(objectness, pred_bbox_deltas)
        # Faster R-CNN does not backpropagate through the proposals' coordinates
        proposals = self.box_coder.decode(pred_bbox_deltas.detach(), anchors).view(num_images, -1, 4)
        boxes, scores = self.filter_proposals(
            proposals, object_logit(objectness), images.image_sizes, num_anchors_per_level
        )
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            labels, matched_gt_boxes = self.assign_targets_to_anchors(anchors, targets)
            regression_targets = self.box_coder.encode(matched_gt_boxes, anchors)
            loss_objectness, loss_rpn_box_reg = self.compute_loss(
                objectness, pred_bbox_deltas, labels, regression_targets
            )
            losses = {"loss_objectness": loss_objectness, "loss_rpn_box_reg": loss_rpn_box_reg}
        return boxes, scores, losses


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"rpn.{name}: {value!r} is not one of {', '.join(repr(a) for a in allowed)}")


def validate(config: RPNConfig) -> None:
    """Raises `ConfigError` naming the first setting that cannot work."""
    _check_choice("objectness", config.objectness, OBJECTNESS)
    _check_choice("sampler", config.sampler, SAMPLERS)
    if not 0 < config.positive_fraction <= 1:
        raise ConfigError(f"rpn.positive_fraction must be in (0, 1], got {config.positive_fraction}")
    if config.bg_iou_thresh > config.fg_iou_thresh:
        raise ConfigError("rpn.bg_iou_thresh must not exceed rpn.fg_iou_thresh")
    for name in ("pre_nms_top_n_train", "post_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_test"):
        if getattr(config, name) < 1:
            raise ConfigError(f"rpn.{name} must be at least 1, got {getattr(config, name)}")
    if not 0 < config.nms_thresh <= 1:
        raise ConfigError(f"rpn.nms_thresh must be an IoU in (0, 1], got {config.nms_thresh}")
    if config.nms_thresh_train is not None and not 0 < config.nms_thresh_train <= 1:
        raise ConfigError(f"rpn.nms_thresh_train must be an IoU in (0, 1] or null, got {config.nms_thresh_train}")
    if not 0 <= config.score_thresh < 1:
        raise ConfigError(f"rpn.score_thresh must be in [0, 1), got {config.score_thresh}")
    if config.hard_negative_pool < 1:
        raise ConfigError(f"rpn.hard_negative_pool must be at least 1, got {config.hard_negative_pool}")
    if not 0 <= config.focal_alpha <= 1:
        raise ConfigError(f"rpn.focal_alpha must be in [0, 1], got {config.focal_alpha}")
    if config.focal_gamma < 0:
        raise ConfigError(f"rpn.focal_gamma must be >= 0, got {config.focal_gamma}")
    for flip in config.test_flips:
        _check_choice("test_flips", flip, (*FLIP_DIMS, *VOLUME_FLIP_DIMS))
    if len(set(config.test_flips)) != len(config.test_flips):
        raise ConfigError(f"rpn.test_flips: each flip once, got {list(config.test_flips)}")


def build_head(config: RPNConfig, in_channels: int, num_anchors: int) -> RPNHead:
    """torchvision's `RPNHead`; with softmax objectness its classifier gives (background, object)
    per anchor; with (quality) focal loss the object score starts at probability `FOCAL_PRIOR`."""
    head = RPNHead(in_channels, num_anchors, conv_depth=config.conv_depth)
    scores = 2 if config.objectness == "softmax" else 1
    if scores == 2:
        head.cls_logits = nn.Conv2d(in_channels, num_anchors * 2, kernel_size=1, stride=1)
        nn.init.normal_(head.cls_logits.weight, std=0.01)
        nn.init.zeros_(head.cls_logits.bias)
    if config.sampler in NO_SAMPLING:
        with torch.no_grad():  # object channel of each anchor: the last of its `scores`
            head.cls_logits.bias[scores - 1 :: scores] = -math.log((1 - FOCAL_PRIOR) / FOCAL_PRIOR)
    return head


def build_rpn(config: RPNConfig, anchor_generator: AnchorGenerator, in_channels: int) -> LesionRPN:
    """Builds the RPN over pyramid features of `in_channels` channels."""
    validate(config)
    anchors_per_position = anchor_generator.num_anchors_per_location()
    if len(set(anchors_per_position)) != 1:
        levels = getattr(anchor_generator, "levels", range(len(anchors_per_position)))
        counts = ", ".join(f"level {level}: {n}" for level, n in zip(levels, anchors_per_position))
        raise ConfigError(
            "anchors: every level with anchors must have the same number of anchors per position "
            f"(sizes x aspect ratios; the head is shared), got {counts}"
        )
    head = build_head(config, in_channels, anchors_per_position[0])
    return LesionRPN(anchor_generator, head, config)
