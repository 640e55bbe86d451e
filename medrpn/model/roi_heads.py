"""The second stage: RoI Align on each proposal, then a classifier that names the lesion type
(or background) and refines the box.

torchvision's `RoIHeads` does the matching of proposals to ground truth, the balanced sampling
of RoIs for the loss, and per-class box decoding and NMS at inference; `MultiScaleRoIAlign`
pools each proposal from the pyramid level that suits its size. The head is a small two-layer
MLP: lesions are few per image, so a narrow head and fewer sampled RoIs than torchvision's
512 per image cost little accuracy and much time.
"""

from __future__ import annotations

from dataclasses import dataclass

from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign


@dataclass
class RoIConfig:
    """Settings of the second stage.

    Attributes:
        output_size: RoI Align output grid (output_size x output_size).
        sampling_ratio: sampling points per bin in RoI Align.
        representation_size: width of the two fully connected layers.
        fg_iou_thresh / bg_iou_thresh: proposals with IoU >= fg are lesions, < bg background.
        batch_size_per_image: RoIs sampled per image for the loss.
        positive_fraction: wanted fraction of lesion RoIs in that sample.
        score_thresh: detections with a lower class probability are dropped.
        nms_thresh: per-class NMS threshold for detections.
        detections_per_img: most detections kept per image.
    """

    output_size: int = 7
    sampling_ratio: int = 2
    representation_size: int = 256
    fg_iou_thresh: float = 0.5
    bg_iou_thresh: float = 0.5
    batch_size_per_image: int = 128
    positive_fraction: float = 0.25
    score_thresh: float = 0.01
    nms_thresh: float = 0.5
    detections_per_img: int = 100


def build_roi_heads(config: RoIConfig, feature_names: list[str], in_channels: int, num_classes: int) -> RoIHeads:
    """Builds the second stage for `num_classes` lesion classes (background is added here)."""
    pool = MultiScaleRoIAlign(
        featmap_names=feature_names, output_size=config.output_size, sampling_ratio=config.sampling_ratio
    )
    head = TwoMLPHead(in_channels * config.output_size**2, config.representation_size)
    predictor = FastRCNNPredictor(config.representation_size, num_classes + 1)
    return RoIHeads(
        pool,
        head,
        predictor,
        fg_iou_thresh=config.fg_iou_thresh,
        bg_iou_thresh=config.bg_iou_thresh,
        batch_size_per_image=config.batch_size_per_image,
        positive_fraction=config.positive_fraction,
        bbox_reg_weights=None,
        score_thresh=config.score_thresh,
        nms_thresh=config.nms_thresh,
        detections_per_img=config.detections_per_img,
    )
