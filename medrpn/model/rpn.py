"""The Region Proposal Network: "something is here", with no idea yet of what.

At every position of every pyramid level a shared head (a 3x3 convolution followed by two
sibling 1x1 convolutions) predicts, for each anchor, an objectness score and four box-regression
offsets (dx, dy, dw, dh). Proposals are the anchors moved by those offsets, clipped to the image,
reduced to the best `pre_nms_top_n` per level, de-duplicated by non-maximum suppression and cut
to `post_nms_top_n`, best first. For the loss, anchors are matched to ground-truth boxes by IoU
(positive above `fg_iou_thresh`, negative below `bg_iou_thresh`, plus the best anchor of every
box) and a balanced random sample of `batch_size_per_image` anchors, `positive_fraction` of them
positive where possible, is scored.

The machinery (head, box coder, matcher, sampler, NMS) is torchvision's; this module only says
which settings suit lesions and keeps them in one small config.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

from medrpn.errors import ConfigError


@dataclass
class RPNConfig:
    """Settings of the Region Proposal Network.

    Attributes:
        fg_iou_thresh: anchors with IoU >= this with a ground-truth box are positives.
        bg_iou_thresh: anchors with IoU < this with every ground-truth box are negatives.
        batch_size_per_image: anchors sampled per image for the loss.
        positive_fraction: wanted fraction of positives in that sample.
        pre_nms_top_n_train / pre_nms_top_n_test: best proposals kept per level before NMS.
        post_nms_top_n_train / post_nms_top_n_test: proposals kept per image after NMS.
        nms_thresh: IoU above which the lower-scoring of two proposals is suppressed.
        score_thresh: proposals with a lower objectness probability are dropped.
        conv_depth: 3x3 convolutions in the shared head.
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
    score_thresh: float = 0.0
    conv_depth: int = 1


def build_rpn(config: RPNConfig, anchor_generator: AnchorGenerator, in_channels: int) -> RegionProposalNetwork:
    """Builds the RPN over pyramid features of `in_channels` channels."""
    if not 0 < config.positive_fraction <= 1:
        raise ConfigError(f"rpn.positive_fraction must be in (0, 1], got {config.positive_fraction}")
    if config.bg_iou_thresh > config.fg_iou_thresh:
        raise ConfigError("rpn.bg_iou_thresh must not exceed rpn.fg_iou_thresh")
    anchors_per_position = anchor_generator.num_anchors_per_location()
    if len(set(anchors_per_position)) != 1:
        raise ConfigError("anchors: every level must have the same number of anchors per position (the head is shared)")
    head = RPNHead(in_channels, anchors_per_position[0], conv_depth=config.conv_depth)
    return RegionProposalNetwork(
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
