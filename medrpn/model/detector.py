"""The two-stage lesion detector, assembled from its parts; a plain `nn.Module`.

    images -> backbone + FPN -> RPN (proposals: "something is here")
           -> RoI heads (class + refined box: "it is this lesion, exactly here")

With `rpn_only` the second stage is not built at all: the detector is a candidate generator (the
first step of LUNA16-style pipelines, whose users bring their own second stage), trained with the
RPN losses alone, and its detections are its proposals, class-agnostic.

Conventions at this boundary (the batch contract of `medrpn.data.batch`):
- images: float tensor (B, C, H, W), intensities already windowed to [0, 1] by the data code;
  the detector standardises them with its own `pixel_mean`/`pixel_std` (kept in the checkpoint)
  and never resizes them.
- targets: per image {"boxes": (N, 4) float absolute pixel xyxy, "labels": (N,) int64 lesion
  class index, 0-based}. N may be 0 (an image without lesions).
- detections: per image {"boxes", "scores", "labels"} with the same conventions. RPN-only: the
  proposals themselves, label 0 for all, score = objectness probability.
- proposals: per image (P, 4) boxes, best objectness first, with their objectness probabilities
  (`proposal_scores`, per image (P,)).
Internally torchvision reserves label 0 for background, so labels are shifted by one on the way in
and out; nothing outside this file sees that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms

from medrpn.errors import ConfigError
from medrpn.model.anchors import AnchorConfig, build_anchor_generator
from medrpn.model.backbone import BackboneConfig, build_backbone
from medrpn.model.box_ops import suppress_contained
from medrpn.model.flip_proposals import VOLUME_FLIP_DIMS, flip_images, merge_proposals, unflip_boxes
from medrpn.model.roi_heads import RoIConfig, build_roi_heads
from medrpn.model.rpn import RPNConfig, build_rpn


@dataclass
class DetectorConfig:
    """Everything needed to rebuild a detector (stored in checkpoints).

    Attributes:
        num_classes: lesion classes, background not counted.
        backbone, anchors, rpn, roi: settings of each part.
        pixel_mean / pixel_std: standardisation applied to the [0, 1] input.
        cross_class_nms_thresh: after per-class NMS, detections of *different* classes that
            overlap more than this are suppressed too, so one lesion gets one box (1.0 disables).
        containment_thresh: then a detection (any class) nested in a better-scoring one, or
            holding one, goes when this share of the smaller box lies inside the other
            (`box_ops.suppress_contained`; NMS keeps a small box inside a large one, whose IoU is
            only their area ratio). None disables.
        rpn_only: build no second stage (`roi` and `cross_class_nms_thresh` are then unused):
            train the RPN alone and return its proposals as class-agnostic detections.
    """

    num_classes: int
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    roi: RoIConfig = field(default_factory=RoIConfig)
    pixel_mean: float = 0.5
    pixel_std: float = 0.25
    cross_class_nms_thresh: float = 0.5
    containment_thresh: float | None = None
    rpn_only: bool = False


@dataclass
class DetectorOutput:
    """What one forward pass gives: losses when training, detections and proposals (with their
    objectness probabilities) otherwise."""

    losses: dict[str, Tensor] = field(default_factory=dict)
    detections: list[dict[str, Tensor]] = field(default_factory=list)
    proposals: list[Tensor] = field(default_factory=list)
    proposal_scores: list[Tensor] = field(default_factory=list)


class LesionDetector(nn.Module):
    """Backbone + RPN + RoI heads (or backbone + RPN alone), composed from ready modules.

    Args:
        backbone: module mapping images to an ordered dict of pyramid features, with an
            `out_channels` attribute.
        rpn: `medrpn.model.rpn.LesionRPN` (torchvision's RPN that also returns proposal scores),
            or `medrpn.model.rpn_3d.RPN3D` for volumes.
        roi_heads: torchvision `RoIHeads` (or compatible: `medrpn.model.roi_heads_3d.RoIHeads3D`
            for volumes); None for an RPN-only detector, whose
            detections are its proposals (label 0, score = objectness probability).
        pixel_mean, pixel_std: input standardisation.
        cross_class_nms_thresh, containment_thresh: see `DetectorConfig`.
        test_flips: in eval mode, also propose on these mirrored copies of the images and merge
            (`RPNConfig.test_flips`; the RoI heads then score the merged proposals on the
            original image's features).
    """

    def __init__(
        self,
        backbone: nn.Module,
        rpn: nn.Module,
        roi_heads: nn.Module | None,
        pixel_mean: float = 0.5,
        pixel_std: float = 0.25,
        cross_class_nms_thresh: float = 0.5,
        test_flips: Sequence[str] = (),
        containment_thresh: float | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.rpn = rpn
        self.roi_heads = roi_heads
        self.pixel_mean = pixel_mean
        self.pixel_std = pixel_std
        self.cross_class_nms_thresh = cross_class_nms_thresh
        self.containment_thresh = containment_thresh
        self.test_flips = list(test_flips)

    @property
    def rpn_only(self) -> bool:
        """Whether this detector has no second stage."""
        return self.roi_heads is None

    def forward(self, images: Tensor, targets: list[dict[str, Tensor]] | None = None) -> DetectorOutput:
        """Runs the detector on a batch of equally sized images (B, C, H, W), or volumes (B, C, X, Y, Z)
        with boxes xyzxyz (`medrpn.model.detector_3d`).

        In training mode `targets` are required and only losses are returned (keys
        `loss_objectness`, `loss_rpn_box_reg`, and without `rpn_only` also `loss_classifier`,
        `loss_box_reg`); in eval mode detections and proposals are returned.
        """
        if images.dim() not in (4, 5):
            raise ValueError(f"images must be (B, C, H, W), or (B, C, X, Y, Z) volumes, got shape {tuple(images.shape)}")
        if self.training and targets is None:
            raise ValueError("targets are required in training mode")
        size = tuple(int(n) for n in images.shape[2:])
        image_list = ImageList((images - self.pixel_mean) / self.pixel_std, [size] * images.shape[0])
        internal_targets = None
        if targets is not None:
            internal_targets = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        features = self.backbone(image_list.tensors)
        proposals, proposal_scores, rpn_losses = self.rpn(image_list, features, internal_targets)
        if not self.training and self.test_flips:
            proposals, proposal_scores = self._with_flipped_proposals(image_list, proposals, proposal_scores)
        if self.roi_heads is None:
            if self.training:
                return DetectorOutput(losses=rpn_losses)
            detections = [
                {"boxes": b, "scores": s, "labels": torch.zeros(len(b), dtype=torch.int64, device=b.device)}
                for b, s in zip(proposals, proposal_scores)
            ]
            return DetectorOutput(detections=detections, proposals=proposals, proposal_scores=proposal_scores)
        detections, roi_losses = self.roi_heads(features, proposals, image_list.image_sizes, internal_targets)
        if self.training:
            return DetectorOutput(losses={**rpn_losses, **roi_losses})
        return DetectorOutput(
            detections=[self._finish(d) for d in detections], proposals=proposals, proposal_scores=proposal_scores
        )

    def _with_flipped_proposals(
        self, image_list: ImageList, proposals: list[Tensor], scores: list[Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The proposals of the image and of each of its `test_flips`, merged per image."""
        size = tuple(image_list.tensors.shape[2:])
        views = [list(zip(proposals, scores))]
        for flip in self.test_flips:
            flipped = ImageList(flip_images(image_list.tensors, flip), image_list.image_sizes)
            boxes, flipped_scores, _ = self.rpn(flipped, self.backbone(flipped.tensors))
            views.append([(unflip_boxes(b, flip, size), s) for b, s in zip(boxes, flipped_scores)])
        top_n = self.rpn.post_nms_top_n()
        merged = [merge_proposals(per_image, self.rpn.nms_thresh, top_n) for per_image in zip(*views)]
        return [b for b, _ in merged], [s for _, s in merged]

    def _finish(self, detection: dict[str, Tensor]) -> dict[str, Tensor]:
        boxes, scores, labels = detection["boxes"], detection["scores"], detection["labels"] - 1
        # No test of the number of boxes on the 2D path: a graph traced for ONNX export would keep
        # the branch its example input took (torchvision's NMS takes 0 or 1 box as it is)
        if self.cross_class_nms_thresh < 1.0 and (boxes.shape[1] == 4 or len(boxes) > 1):
            if boxes.shape[1] == 4:
                keep = batched_nms(boxes, scores, torch.zeros_like(labels), self.cross_class_nms_thresh)
            else:  # volumes: MONAI's 3D NMS (`medrpn.model.nms_3d`), imported only here (MONAI's import costs seconds)
                from medrpn.model.nms_3d import batched_nms_3d

                keep = batched_nms_3d(boxes, scores, torch.zeros_like(labels), self.cross_class_nms_thresh)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.containment_thresh is not None and len(boxes) > 1:
            keep = suppress_contained(boxes, scores, self.containment_thresh)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        return {"boxes": boxes, "scores": scores, "labels": labels}


def build_detector(config: DetectorConfig) -> LesionDetector:
    """Builds a detector from its config (without RoI heads when `config.rpn_only`)."""
    volume_flips = [f for f in config.rpn.test_flips if f in VOLUME_FLIP_DIMS]
    if volume_flips:
        raise ConfigError(f"model.rpn.test_flips: {', '.join(volume_flips)} flips volumes; images flip horizontal or vertical")
    backbone = build_backbone(config.backbone)
    num_levels = len(config.backbone.returned_stages) + 1
    anchor_generator = build_anchor_generator(config.anchors, num_levels)
    rpn = build_rpn(config.rpn, anchor_generator, backbone.out_channels)
    roi_heads = None
    if not config.rpn_only:
        feature_names = [str(i) for i in range(len(config.backbone.returned_stages))]
        roi_heads = build_roi_heads(config.roi, feature_names, backbone.out_channels, config.num_classes)
    return LesionDetector(
        backbone,
        rpn,
        roi_heads,
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
        cross_class_nms_thresh=config.cross_class_nms_thresh,
        test_flips=config.rpn.test_flips,
        containment_thresh=config.containment_thresh,
    )
