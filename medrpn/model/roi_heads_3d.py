"""The second stage for volumes: 3D RoI Align on each proposal, then the classifier that names
the lesion type (or background) and refines the box with six class-specific offsets.

The 2D design (`medrpn.model.roi_heads`, torchvision's `RoIHeads`) with 3D parts: proposals and
the lesions themselves are matched to lesions by 3D IoU (torchvision's `Matcher`), a balanced
sample of RoIs (`RoIConfig.batch_size_per_image`, `positive_fraction`) is pooled by
`medrpn.model.roi_align_3d` from the pyramid level whose stride suits the box (its size, the cube
root of its volume in voxels, spans about twice `output_size` feature voxels there, as torchvision's
level mapper does in 2D), a two-layer MLP feeds the class scores and box offsets (cross-entropy, and
smooth L1 on the offsets or GIoU on the decoded boxes, `RoIConfig.box_loss`), and at inference each class's boxes are decoded, clipped, thresholded and
de-duplicated by 3D NMS (MONAI's).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from monai.apps.detection.utils.box_coder import BoxCoder
from monai.data.box_utils import box_iou, box_pair_giou, clip_boxes_to_image
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher

from medrpn.model.nms_3d import batched_nms_3d
from medrpn.model.roi_align_3d import roi_align_3d
from medrpn.model.roi_heads import RoIConfig

BOX_WEIGHTS = (10.0, 10.0, 10.0, 5.0, 5.0, 5.0)  # torchvision's Fast R-CNN weights, one more axis
SMOOTH_L1_BETA = 1.0 / 9


class RoIHeads3D(nn.Module):
    """Pooling, head, losses and detections of the 3D second stage.

    Args:
        config: `RoIConfig` (output_size is the bins along each axis).
        in_channels: channels of the pyramid levels.
        num_classes: classes including background (label 0).
    """

    def __init__(self, config: RoIConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        size = config.output_size
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_channels * size**3, config.representation_size),
            nn.ReLU(inplace=True),
            nn.Linear(config.representation_size, config.representation_size),
            nn.ReLU(inplace=True),
        )
        self.cls_score = nn.Linear(config.representation_size, num_classes)
        self.bbox_pred = nn.Linear(config.representation_size, num_classes * 6)
        self.box_coder = BoxCoder(weights=BOX_WEIGHTS)
        self.matcher = Matcher(config.fg_iou_thresh, config.bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedPositiveNegativeSampler(config.batch_size_per_image, config.positive_fraction)

    def forward(
        self,
        features: OrderedDict,
        proposals: list[Tensor],
        image_sizes: list[tuple[int, int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """(detections per volume with labels 1..C, losses); losses only when training with targets."""
        if self.training:
            if targets is None:
                raise ValueError("targets are required in training mode")
            proposals, labels, regression = self._sample(proposals, targets)
        x = self.head(self.pool(features, proposals, image_sizes[0]))
        class_logits, box_deltas = self.cls_score(x), self.bbox_pred(x)
        if self.training:
            return [], self._losses(class_logits, box_deltas, labels, regression, torch.cat(proposals))
        return self._detections(class_logits, box_deltas, proposals, image_sizes), {}

    def pool(self, features: OrderedDict, boxes: list[Tensor], image_size: tuple[int, int, int]) -> Tensor:
        """(sum K, C, s, s, s) pooled from the level that suits each box."""
        maps = list(features.values())
        strides = [torch.tensor([i / f for i, f in zip(image_size, m.shape[2:])], dtype=torch.float32) for m in maps]
        level_log2 = torch.tensor([float(torch.log2(s).mean()) for s in strides])
        out_size = (self.config.output_size,) * 3
        pooled = torch.zeros(
            (sum(len(b) for b in boxes), maps[0].shape[1], *out_size), dtype=maps[0].dtype, device=maps[0].device
        )
        start = 0
        for n, volume_boxes in enumerate(boxes):
            level = level_of((volume_boxes[:, 3:] - volume_boxes[:, :3]).cpu(), self.config.output_size, level_log2)
            for index, m in enumerate(maps):
                chosen = (level == index).nonzero().flatten()
                if len(chosen):
                    pooled[start + chosen.to(pooled.device)] = roi_align_3d(
                        m[n : n + 1], [volume_boxes[chosen.to(volume_boxes.device)]], out_size,
                        spatial_scale=tuple((1.0 / strides[index]).tolist()), sampling_ratio=self.config.sampling_ratio,
                    )
            start += len(volume_boxes)
        return pooled

    def _sample(self, proposals: list[Tensor], targets: list[dict[str, Tensor]]):
        """The sampled RoIs (the lesions themselves among them) with class labels and box targets."""
        sampled, labels, regression = [], [], []
        for boxes, target in zip(proposals, targets):
            gt, gt_labels = target["boxes"], target["labels"]
            boxes = torch.cat([boxes, gt])
            if len(gt):
                matched = self.matcher(box_iou(gt, boxes))
                label = gt_labels[matched.clamp(min=0)].clone()
                label[matched == Matcher.BELOW_LOW_THRESHOLD] = 0
                label[matched == Matcher.BETWEEN_THRESHOLDS] = -1
                targets_boxes = gt[matched.clamp(min=0)]
            else:
                label = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                targets_boxes = boxes
            positive, negative = self.sampler([label])
            keep = (positive[0] | negative[0]).nonzero().flatten()
            sampled.append(boxes[keep])
            labels.append(label[keep])
            regression.append(self.box_coder.encode_single(targets_boxes[keep], boxes[keep]))
        return sampled, torch.cat(labels), torch.cat(regression)

    def _losses(self, class_logits: Tensor, box_deltas: Tensor, labels: Tensor, regression: Tensor, rois: Tensor) -> dict[str, Tensor]:
        loss_classifier = F.cross_entropy(class_logits, labels)
        positive = (labels > 0).nonzero().flatten()
        deltas = box_deltas.view(len(labels), self.num_classes, 6)[positive, labels[positive]]
        if self.config.box_loss == "giou":
            predicted = self.box_coder.decode_single(deltas, rois[positive])
            lesion = self.box_coder.decode_single(regression[positive], rois[positive])
            box = (1 - box_pair_giou(predicted, lesion)).sum()
        else:
            box = F.smooth_l1_loss(deltas, regression[positive], beta=SMOOTH_L1_BETA, reduction="sum")
        return {"loss_classifier": loss_classifier, "loss_box_reg": self.config.box_weight * box / max(len(labels), 1)}

    def _detections(self, class_logits: Tensor, box_deltas: Tensor, proposals: list[Tensor], image_sizes) -> list[dict[str, Tensor]]:
        probs = F.softmax(class_logits, dim=-1)
        deltas = box_deltas.view(len(class_logits), self.num_classes, 6)
        out, start = [], 0
        for boxes, size in zip(proposals, image_sizes):
            n = len(boxes)
            p, d = probs[start : start + n, 1:], deltas[start : start + n, 1:]
            start += n
            decoded = torch.stack([self.box_coder.decode_single(d[:, c], boxes) for c in range(self.num_classes - 1)], dim=1) if n else boxes.new_zeros((0, self.num_classes - 1, 6))
            labels = torch.arange(1, self.num_classes, device=boxes.device).expand(n, -1)
            flat_boxes, flat_scores, flat_labels = decoded.reshape(-1, 6), p.reshape(-1), labels.reshape(-1)
            flat_boxes, keep = clip_boxes_to_image(flat_boxes, list(size), remove_empty=True)
            flat_scores, flat_labels = flat_scores[keep], flat_labels[keep]
            good = flat_scores > self.config.score_thresh
            flat_boxes, flat_scores, flat_labels = flat_boxes[good], flat_scores[good], flat_labels[good]
            keep = batched_nms_3d(flat_boxes, flat_scores, flat_labels, self.config.nms_thresh)
            keep = keep[flat_scores[keep].argsort(descending=True)][: self.config.detections_per_img]
            out.append({"boxes": flat_boxes[keep], "scores": flat_scores[keep], "labels": flat_labels[keep]})
        return out


def level_of(extent: Tensor, output_size: int, strides_log2: Tensor) -> Tensor:
    """The pyramid level (index into `strides_log2`, each level's mean log2 stride) for boxes of
    `extent` (K, 3) voxels: the one where the box spans about 2 x `output_size` feature voxels."""
    wanted = torch.log2(extent.clamp(min=1e-3).prod(dim=1).pow(1.0 / 3) / (2 * output_size))
    return (wanted[:, None] - strides_log2[None]).abs().argmin(dim=1)
