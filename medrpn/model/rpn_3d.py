"""The Region Proposal Network for volumes: the 2D design of `medrpn.model.rpn` with six box
offsets (dx, dy, dz, dw, dh, dd) per anchor.

Composed from MONAI's 3D parts as MONAI's RetinaNet is (its classification and regression heads
with `spatial_dims=3`, its anchor generator, box coder, IoU and NMS) and torchvision's
dimension-free ones (the IoU `Matcher` and the balanced sampler); what is medrpn's is the RPN
around them: matching anchors to lesions, the sampled or focal objectness loss, and proposals (best
`pre_nms_top_n` per level, NMS, `post_nms_top_n`) with their objectness probabilities, as in 2D.
It takes `medrpn.model.rpn.RPNConfig` (samplers "balanced" and "focal"; the others are 2D only so far).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from monai.apps.detection.networks.retinanet_network import (
    RetinaNetClassificationHead,
    RetinaNetRegressionHead,
)
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.data.box_utils import box_iou, clip_boxes_to_image
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import sigmoid_focal_loss

from medrpn.errors import ConfigError
from medrpn.model.nms_3d import batched_nms_3d
from medrpn.model.rpn import RPNConfig

SAMPLERS_3D = ("balanced", "focal")
SMOOTH_L1_BETA = 1.0 / 9  # torchvision's RPN box loss
MIN_SIZE = 1e-3


def flatten_levels(maps: list[Tensor], per_anchor: int) -> Tensor:
    """Head outputs (B, A * K, X, Y, Z) per level -> (B, sum XYZA, K), in the anchor generator's
    order (positions x, y, z, then the anchors of a position)."""
    flat = []
    for m in maps:
        b, _, x, y, z = m.shape
        flat.append(m.view(b, -1, per_anchor, x, y, z).permute(0, 3, 4, 5, 1, 2).reshape(b, -1, per_anchor))
    return torch.cat(flat, dim=1)


def match_anchors(matcher: Matcher, gt_boxes: Tensor, anchors: Tensor) -> Tensor:
    """For each anchor the index of its lesion, or Matcher.BELOW_LOW_THRESHOLD (-1) /
    BETWEEN_THRESHOLDS (-2); all -1 for a volume without lesions."""
    if len(gt_boxes) == 0:
        return torch.full((len(anchors),), Matcher.BELOW_LOW_THRESHOLD, dtype=torch.int64, device=anchors.device)
    return matcher(box_iou(gt_boxes, anchors))


class RPN3D(nn.Module):
    """Anchors, a shared head per level, the loss and the proposals, for (B, C, X, Y, Z) volumes.

    Args:
        anchor_generator: MONAI `AnchorGenerator` (3D sizes and aspect ratios per level).
        in_channels: channels of every pyramid level.
        config: `RPNConfig` (thresholds, sampling, top-n, NMS).
    """

    def __init__(self, anchor_generator: nn.Module, in_channels: int, config: RPNConfig) -> None:
        super().__init__()
        if config.sampler not in SAMPLERS_3D:
            raise ConfigError(f"model.rpn.sampler {config.sampler!r} is not available for volumes; choose one of {', '.join(SAMPLERS_3D)}")
        self.config = config
        self.anchor_generator = anchor_generator
        num_anchors = anchor_generator.num_anchors_per_location()[0]
        self.cls_head = RetinaNetClassificationHead(in_channels, num_anchors, 1, spatial_dims=3)
        self.reg_head = RetinaNetRegressionHead(in_channels, num_anchors, spatial_dims=3)
        self.box_coder = BoxCoder(weights=(1.0,) * 6)
        self.matcher = Matcher(config.fg_iou_thresh, config.bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedPositiveNegativeSampler(config.batch_size_per_image, config.positive_fraction)
        self.nms_thresh = config.nms_thresh

    def post_nms_top_n(self) -> int:
        return self.config.post_nms_top_n_train if self.training else self.config.post_nms_top_n_test

    def forward(self, image_list, features: OrderedDict, targets: list[dict[str, Tensor]] | None = None):
        """(proposals, their objectness probabilities, losses) for a batch; losses only with targets in training."""
        maps = list(features.values())
        logits = flatten_levels(self.cls_head(maps), 1)[..., 0]  # (B, N)
        deltas = flatten_levels(self.reg_head(maps), 6)  # (B, N, 6)
        anchors = self.anchor_generator(image_list.tensors, maps)  # per volume (N, 6)
        per_level = [m.shape[2] * m.shape[3] * m.shape[4] * self.anchor_generator.num_anchors_per_location()[i] for i, m in enumerate(maps)]
        size = list(image_list.tensors.shape[2:])
        proposals, scores = [], []
        for b in range(len(anchors)):
            boxes = self.box_coder.decode_single(deltas[b].detach(), anchors[b])
            kept, kept_scores = self._select(boxes, logits[b].detach(), per_level, size)
            proposals.append(kept)
            scores.append(kept_scores)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            losses = self._losses(anchors, logits, deltas, targets)
        return proposals, scores, losses

    def _select(self, boxes: Tensor, logits: Tensor, per_level: list[int], size: list[int]) -> tuple[Tensor, Tensor]:
        top_n = self.config.pre_nms_top_n_train if self.training else self.config.pre_nms_top_n_test
        picked, levels = [], []
        start = 0
        for level, count in enumerate(per_level):
            idx = logits[start : start + count].topk(min(top_n, count)).indices + start
            picked.append(idx)
            levels.append(torch.full_like(idx, level))
            start += count
        idx, levels = torch.cat(picked), torch.cat(levels)
        boxes, probs = boxes[idx], torch.sigmoid(logits[idx])
        boxes, keep = clip_boxes_to_image(boxes, size, remove_empty=True)
        boxes, probs, levels = boxes, probs[keep], levels[keep]
        large = ((boxes[:, 3:] - boxes[:, :3]) >= MIN_SIZE).all(dim=1) & (probs >= self.config.score_thresh)
        boxes, probs, levels = boxes[large], probs[large], levels[large]
        keep = batched_nms_3d(boxes, probs, levels, self.config.nms_thresh_for(self.training))
        keep = keep[probs[keep].argsort(descending=True)][: self.post_nms_top_n()]
        return boxes[keep], probs[keep]

    def _losses(self, anchors: list[Tensor], logits: Tensor, deltas: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        labels, regression = [], []
        for anchor, target in zip(anchors, targets):
            matched = match_anchors(self.matcher, target["boxes"], anchor)
            label = (matched >= 0).to(torch.float32)
            label[matched == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(label)
            gt = target["boxes"][matched.clamp(min=0)] if len(target["boxes"]) else anchor  # no lesion: zero offsets, never used
            regression.append(self.box_coder.encode_single(gt, anchor))
        if self.config.sampler == "focal":
            valid = torch.stack(labels) >= 0
            positive = torch.stack(labels) == 1
            target = torch.stack(labels).clamp(min=0)
            loss_objectness = sigmoid_focal_loss(
                logits[valid], target[valid], alpha=self.config.focal_alpha, gamma=self.config.focal_gamma, reduction="sum"
            ) / positive.sum().clamp(min=1)
            box = F.smooth_l1_loss(deltas[positive], torch.stack(regression)[positive], beta=SMOOTH_L1_BETA, reduction="sum")
            return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": box / positive.sum().clamp(min=1)}
        positive_masks, negative_masks = self.sampler([label.to(torch.int64) for label in labels])
        positive = torch.stack(positive_masks).bool()
        sampled = positive | torch.stack(negative_masks).bool()
        loss_objectness = F.binary_cross_entropy_with_logits(logits[sampled], torch.stack(labels)[sampled])
        box = F.smooth_l1_loss(deltas[positive], torch.stack(regression)[positive], beta=SMOOTH_L1_BETA, reduction="sum")
        return {"loss_objectness": loss_objectness, "loss_rpn_box_reg": box / sampled.sum().clamp(min=1)}
