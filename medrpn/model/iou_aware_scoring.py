"""IoU-aware scoring of the second stage's detections (IoU-Net, Jiang et al. 2018; IoU-aware
RetinaNet, Wu et al. 2020).

A detection's class probability says how sure the head is that a lesion of that type is there,
not how well its box fits the lesion, yet detections are ranked, and NMS keeps one of two
overlapping boxes, by that probability alone. Of two boxes on one lesion the tighter one may lose,
and a loose box may outrank a tight one on another image: both cost CPM at IoU >= 0.5 and mAP.
Here a third output of the head predicts, for each RoI, the IoU its refined box will have with its
lesion, trained with binary cross-entropy against that IoU on every sampled RoI: a lesion RoI's
refined box (detached, so the box regression is not pulled towards easy IoUs) with its lesion, a
background RoI's box with the lesion it overlaps most (below the lesion threshold, often 0). The
background RoIs matter: trained on lesion RoIs alone (IoU-aware RetinaNet's choice), the branch
never sees a box that misses, predicts a good fit for false positives too, and the product below
then lifts them (P = 0.1 with a predicted IoU of 0.8 scores 0.28); on the brain MRI set that
version lost CPM (docs/performance.md). At inference a detection of class k scores

    p(k) * (q / P) ** alpha

with p(k) the class probability, P the probability of any lesion and q the predicted IoU: the
lesion's confidence P ** (1 - alpha) * q ** alpha (IoU-aware RetinaNet's product) shared among the
classes in their ratio. The scores of all classes sum to at most 1, so torchvision's
post-processing (score threshold, per-class NMS, top k) runs on them unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import box_iou


class IoUAwareBoxPredictor(FastRCNNPredictor):
    """torchvision's class scores and per-class box offsets, plus one logit per RoI for the IoU its
    refined box will have with its lesion."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__(in_channels, num_classes)
        self.iou_pred = nn.Linear(in_channels, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        x = x.flatten(start_dim=1)
        return self.cls_score(x), self.bbox_pred(x), self.iou_pred(x).squeeze(1)


def iou_targets(positive: Tensor, predicted: Tensor, lesions: Tensor, overlaps: Tensor) -> Tensor:
    """What the IoU branch learns for each sampled RoI: for lesion RoIs (`positive`, a mask) the IoU
    of the refined box (`predicted`, xyxy, one per lesion RoI) with its lesion; for the others their
    best IoU with any lesion of their image (`overlaps`, one per RoI)."""
    target = overlaps.detach().clone()
    target[positive] = box_iou(predicted.detach(), lesions).diagonal()
    return target


def iou_loss(iou_logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of the predicted IoUs against `targets` (`iou_targets`), averaged over
    the sampled RoIs as the classifier's cross-entropy is: divided by the lesion RoIs instead
    (a box loss's norm), the background RoIs, most of the sample and not down-weighted, made it
    ten times the other losses."""
    return F.binary_cross_entropy_with_logits(iou_logits, targets)


def best_overlaps(rois: list[Tensor], lesions: list[Tensor]) -> Tensor:
    """Each RoI's best IoU with a lesion box of its image (0 in an image without lesions)."""
    best = [box_iou(r, l).amax(dim=1) if len(l) else r.new_zeros(len(r)) for r, l in zip(rois, lesions)]
    return torch.cat(best)


def iou_aware_logits(class_logits: Tensor, iou_logits: Tensor, alpha: float) -> Tensor:
    """Logits whose softmax is the IoU-aware score of each class (background first): for torchvision's
    `postprocess_detections`, which takes logits and applies softmax."""
    probabilities = class_logits.softmax(-1)
    lesion = probabilities[:, 1:]
    any_lesion = lesion.sum(dim=1, keepdim=True).clamp_min(1e-12)
    quality = iou_logits.sigmoid().unsqueeze(1)
    scores = lesion * (quality / any_lesion) ** alpha
    background = (1 - scores.sum(dim=1, keepdim=True)).clamp_min(0)
    return torch.cat([background, scores], dim=1).clamp_min(1e-12).log()
