"""Which anchors the RPN learns from, and how their objectness and box losses are weighed.

Three ways, chosen by `RPNConfig.sampler`:
- balanced: torchvision's `BalancedPositiveNegativeSampler` draws `batch_size_per_image` anchors
  per image, `positive_fraction` of them positive where possible, at random (Faster R-CNN).
- hard_negative: positives drawn the same way; the negatives are drawn by MONAI's
  `HardNegativeSampler` (from nnDetection) among the `pool x needed` highest-scoring negatives, so the
  loss looks at what the network currently confuses with a lesion. As many anchors as balanced
  (`medrpn.model.hard_negative_sampler`).
- focal: no sampling; every anchor that is not ignored counts, easy ones down-weighted by the focal
  loss (RetinaNet), both losses divided by the number of positive anchors.
- quality_focal: as focal, but a positive anchor's objectness target is the IoU of its regressed box
  with its ground-truth box instead of 1 (the quality focal loss of GFL, Li et al. 2020), so
  proposals are ranked by how well their box fits the lesion, not only by being near one.

Objectness is either one logit per anchor (sigmoid) or two scores, background and object (softmax,
as in the Faster R-CNN paper). With two scores the object probability softmax(s)[1] equals
sigmoid(s1 - s0), so the log-odds `s1 - s0` plays the part of the single logit wherever a ranking or
a focal weight is needed, and the softmax focal loss is exactly the sigmoid one on that log-odds.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import sigmoid_focal_loss

from medrpn.model.box_ops import paired_box_iou

BOX_BETA = 1 / 9  # torchvision's smooth-L1 beta for the RPN box loss


def object_logit(scores: Tensor) -> Tensor:
    """Log-odds that each anchor holds an object, (R,), from scores (R, 1) (one logit) or (R, 2)
    (background, object)."""
    if scores.shape[-1] == 2:
        return scores[..., 1] - scores[..., 0]
    return scores[..., 0]


def sampled_losses(
    scores: Tensor,
    deltas: Tensor,
    labels: list[Tensor],
    regression_targets: list[Tensor],
    positives: list[Tensor],
    negatives: list[Tensor],
) -> tuple[Tensor, Tensor]:
    """torchvision's RPN losses over a sample of anchors (masks per image).

    Objectness: binary cross-entropy (one logit) or cross-entropy (two scores), averaged over the
    sample. Box: smooth-L1 summed over the sampled positives, divided by the sample size.
    """
    sampled_pos = torch.where(torch.cat(positives, dim=0))[0]
    sampled_neg = torch.where(torch.cat(negatives, dim=0))[0]
    sampled = torch.cat([sampled_pos, sampled_neg], dim=0)
    all_labels = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    box_loss = F.smooth_l1_loss(deltas[sampled_pos], targets[sampled_pos], beta=BOX_BETA, reduction="sum")
    box_loss = box_loss / sampled.numel()
    if scores.shape[-1] == 2:
        objectness_loss = F.cross_entropy(scores[sampled], all_labels[sampled].long())
    else:
        objectness_loss = F.binary_cross_entropy_with_logits(scores.flatten()[sampled], all_labels[sampled])
    return objectness_loss, box_loss


def focal_losses(
    scores: Tensor,
    deltas: Tensor,
    labels: list[Tensor],
    regression_targets: list[Tensor],
    alpha: float,
    gamma: float,
) -> tuple[Tensor, Tensor]:
    """Focal objectness loss over every non-ignored anchor and smooth-L1 box loss over every positive.

    Both are sums divided by the number of positive anchors in the batch (at least 1), as in
    RetinaNet: the count of easy negatives, which depends on the image size, does not set the scale.
    """
    all_labels = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    counted = torch.where(all_labels >= 0)[0]
    positive = torch.where(all_labels >= 1)[0]
    normaliser = max(1, positive.numel())
    objectness_loss = sigmoid_focal_loss(
        object_logit(scores)[counted], all_labels[counted], alpha=alpha, gamma=gamma, reduction="sum"
    )
    box_loss = F.smooth_l1_loss(deltas[positive], targets[positive], beta=BOX_BETA, reduction="sum")
    return objectness_loss / normaliser, box_loss / normaliser


def regressed_iou(deltas: Tensor, target_deltas: Tensor, box_coder: BoxCoder) -> Tensor:
    """IoU, (R,), of the boxes that `deltas` and `target_deltas` (R, 4) make of the same anchors.

    IoU does not change when each axis is scaled and shifted, so it is the same whichever anchor both
    boxes are decoded from: here a unit square, which spares passing the anchors around.
    """
    unit = deltas.new_tensor([[-0.5, -0.5, 0.5, 0.5]]).expand(len(deltas), 4)
    predicted = box_coder.decode_single(deltas, unit)
    target = box_coder.decode_single(target_deltas, unit)
    return paired_box_iou(predicted, target)


def quality_focal_losses(
    scores: Tensor,
    deltas: Tensor,
    labels: list[Tensor],
    regression_targets: list[Tensor],
    beta: float,
    box_coder: BoxCoder,
) -> tuple[Tensor, Tensor]:
    """Quality focal objectness loss over every non-ignored anchor, smooth-L1 box loss as `focal_losses`.

    A positive's target probability is the IoU of its regressed box with its ground truth (taken as
    a constant), a negative's 0; the binary cross-entropy to that soft target is scaled by
    |target - probability| ** beta, GFL's generalisation of the focal weight. Both losses are divided
    by the number of positive anchors. The IoU is measured on the box the anchor proposes now, so
    the score learns to say how well it fits: where the best-scored positive fits worst, the IoU
    recall of the top proposals suffers.
    """
    all_labels = torch.cat(labels, dim=0)
    targets = torch.cat(regression_targets, dim=0)
    counted = torch.where(all_labels >= 0)[0]
    positive = torch.where(all_labels >= 1)[0]
    normaliser = max(1, positive.numel())
    quality = torch.zeros_like(all_labels)
    quality[positive] = regressed_iou(deltas[positive].detach(), targets[positive], box_coder).to(quality.dtype)
    logits = object_logit(scores)[counted]
    soft_targets = quality[counted]
    weight = (torch.sigmoid(logits) - soft_targets).abs().pow(beta)
    objectness_loss = (F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none") * weight).sum()
    box_loss = F.smooth_l1_loss(deltas[positive], targets[positive], beta=BOX_BETA, reduction="sum")
    return objectness_loss / normaliser, box_loss / normaliser
