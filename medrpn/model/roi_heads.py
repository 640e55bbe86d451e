"""The second stage: RoI Align on each proposal, then a classifier that names the lesion type
(or background) and refines the box.

torchvision's `RoIHeads` does the matching of proposals to ground truth, the balanced sampling
of RoIs for the loss, and per-class box decoding and NMS at inference; `MultiScaleRoIAlign`
pools each proposal from the pyramid level that suits its size (in training on the CPU through
one sparse matrix product, `medrpn.model.sparse_roi_align`: the same values, 3.5x faster). The head is a small two-layer
MLP: lesions are few per image, so a narrow head and fewer sampled RoIs than torchvision's
512 per image cost little accuracy and much time.

What a lesion is often shows around it more than inside its box (a pituitary tumour sits at the
sella, a meningioma against the dura): with `context_scale`, each proposal is also pooled
enlarged that many times about its centre, from the coarser level that suits the larger box, and
the two grids go to the head side by side as channels. With `image_context`, the head also reads
where the proposal lies in the image and the image's mean feature: a lesion's type often follows
from its place in the anatomy (the sella, the convexity, the parenchyma), which a 7x7 grid of the
box alone does not show, and medical images are taken in a few standard positions.

The box loss is torchvision's smooth L1 on the encoded offsets, or with `box_loss: giou` the
generalized IoU of the decoded box with its lesion (Rezatofighi et al. 2019; mmdetection's
`reg_decoded_bbox` with `GIoULoss`, weight 10): it scores the box as it is judged, by overlap,
rather than by four offsets weighted alike.

With `iou_aware`, the head also predicts the IoU of each refined box with its lesion, and a
detection's score weighs that in beside its class probability
(`medrpn.model.iou_aware_scoring`): boxes that fit rank above boxes that merely sit on a lesion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss

from medrpn.errors import ConfigError
from medrpn.model.iou_aware_scoring import IoUAwareBoxPredictor, best_overlaps, iou_aware_logits, iou_loss, iou_targets
from medrpn.model.sparse_roi_align import SparseMultiScaleRoIAlign

BOX_LOSSES = {"smooth_l1": 1.0, "giou": 10.0}  # each box loss with its default weight


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
        context_scale: also pool each proposal enlarged this many times about its centre (e.g.
            2.0), for the classifier to see around the lesion; None: the box alone.
        box_loss: "smooth_l1" on the encoded offsets (torchvision's), or "giou" on the decoded box.
        box_loss_weight: the box loss's weight; None: 1 for smooth L1, 10 for GIoU (mmdetection's).
        cascade_iou: None for one stage; or the IoU at which each stage of a cascade matches its
            RoIs to lesions, rising (Cascade R-CNN's [0.5, 0.6, 0.7]): every stage refines the
            boxes of the one before (`medrpn.model.cascade_roi_heads`). It replaces
            fg_iou_thresh and bg_iou_thresh. 2D only.
        iou_aware: None for scores from the class probabilities alone; or alpha in (0, 1]: the
            head also predicts each refined box's IoU with its lesion, and a detection scores
            p(class) * (IoU / P(lesion)) ** alpha (`medrpn.model.iou_aware_scoring`; IoU-aware
            RetinaNet's 0.5 is a usual choice). 2D, one stage only.
        image_context: the head also reads each proposal's place in its image (x1, y1, x2, y2 as
            fractions of the width and height) and the image's mean feature on the coarsest
            pyramid level it pools from (`ImageContextRoIAlign`). 2D only.
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
    context_scale: float | None = None
    box_loss: str = "smooth_l1"
    box_loss_weight: float | None = None
    cascade_iou: list[float] | None = None
    iou_aware: float | None = None
    image_context: bool = False

    def __post_init__(self) -> None:
        if self.cascade_iou is not None:
            ious = [float(v) for v in self.cascade_iou]
            if len(ious) < 2 or not all(0 < v < 1 for v in ious) or any(b <= a for a, b in zip(ious, ious[1:])):
                raise ConfigError(
                    f"model.roi.cascade_iou must be two or more rising IoUs between 0 and 1 (e.g. [0.5, 0.6, 0.7]), or null; got {self.cascade_iou}"
                )
            self.cascade_iou = ious
        if self.context_scale is not None and not self.context_scale > 1.0:
            raise ConfigError(f"model.roi.context_scale must be above 1 (the enlarged box), or null; got {self.context_scale}")
        if self.box_loss not in BOX_LOSSES:
            raise ConfigError(f"model.roi.box_loss must be one of {', '.join(BOX_LOSSES)}; got {self.box_loss!r}")
        if self.box_loss_weight is not None and not self.box_loss_weight > 0:
            raise ConfigError(f"model.roi.box_loss_weight must be positive, or null; got {self.box_loss_weight}")
        if self.iou_aware is not None:
            if not 0 < self.iou_aware <= 1:
                raise ConfigError(f"model.roi.iou_aware must be a weight in (0, 1] (e.g. 0.5), or null; got {self.iou_aware}")
            if self.cascade_iou is not None:
                raise ConfigError("model.roi.iou_aware and model.roi.cascade_iou cannot be combined: set one of them to null")

    @property
    def box_weight(self) -> float:
        """The box loss's weight, its default filled in."""
        if self.box_loss_weight is not None:
            return self.box_loss_weight
        return BOX_LOSSES[self.box_loss]



def enlarge_boxes(boxes: Tensor, scale: float) -> Tensor:
    """xyxy boxes scaled `scale` times about their centres (not clipped: RoI Align reads zeros outside)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return torch.cat([centre - half, centre + half], dim=1)


class ContextRoIAlign(nn.Module):
    """`MultiScaleRoIAlign` of each proposal and of the proposal enlarged `scale` times, stacked as
    channels: (N, 2C, S, S) for the box head."""

    def __init__(self, pool: MultiScaleRoIAlign, scale: float) -> None:
        super().__init__()
        self.pool, self.scale = pool, scale

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        inner = self.pool(features, proposals, image_shapes)
        outer = self.pool(features, [enlarge_boxes(p, self.scale) for p in proposals], image_shapes)
        return torch.cat([inner, outer], dim=1)


class ImageContextRoIAlign(nn.Module):
    """A pooler's grid for each proposal, flattened, then where the proposal lies in its image and
    what the image holds as a whole: (N, D + 4 + C) for the box head, D the grid's size.

    The place is the box's x1, y1, x2, y2 as fractions of its image's width and height; the whole
    is the mean over the feature map `level` (the coarsest the pooler reads, C channels) of the
    proposal's image, padding included (medrpn's 2D recipes resize every image to one square
    size, so there is none). Both are learnt from by the head's first layer like the grid."""

    def __init__(self, pool: nn.Module, level: str) -> None:
        super().__init__()
        self.pool, self.level = pool, level

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        grid = self.pool(features, proposals, image_shapes).flatten(1)
        # each RoI's image, built from the proposals themselves so that a traced (ONNX) graph
        # follows their number rather than the count seen when it was traced
        image = torch.cat([torch.full_like(p[:, 0], i, dtype=torch.long) for i, p in enumerate(proposals)])
        sizes = torch.tensor([[w, h, w, h] for h, w in image_shapes], dtype=grid.dtype, device=grid.device)
        place = torch.cat(proposals).to(grid.dtype) / sizes[image]
        whole = features[self.level].mean(dim=(2, 3)).to(grid.dtype)[image]
        return torch.cat([grid, place, whole], dim=1)


class LesionRoIHeads(RoIHeads):
    """torchvision's `RoIHeads` whose training losses follow `RoIConfig.box_loss`; inference is
    torchvision's, on IoU-aware scores when the predictor is an `IoUAwareBoxPredictor`."""

    def __init__(self, *args, box_loss: str = "smooth_l1", box_weight: float = 1.0, iou_alpha: float | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.box_loss, self.box_weight, self.iou_alpha = box_loss, box_weight, iou_alpha

    def forward(self, features, proposals, image_shapes, targets=None):
        if not self.training:
            if self.iou_alpha is None:
                return super().forward(features, proposals, image_shapes, targets)
            return self._detect_iou_aware(features, proposals, image_shapes), {}
        if targets is None:
            raise ValueError("targets are required in training mode")
        proposals, _, labels, regression_targets = self.select_training_samples(proposals, targets)
        pooled = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression, *iou_logits = self.box_predictor(pooled)  # IoUs with `iou_alpha`
        iou, overlaps = None, None
        if iou_logits:
            iou, overlaps = iou_logits[0], best_overlaps(proposals, [t["boxes"] for t in targets])
        rois, labels, regression_targets = torch.cat(proposals), torch.cat(labels), torch.cat(regression_targets)
        return [], self.losses(class_logits, box_regression, rois, labels, regression_targets, iou, overlaps)

    def _detect_iou_aware(self, features, proposals, image_shapes) -> list[dict[str, Tensor]]:
        """torchvision's post-processing (score threshold, per-class NMS, top k) on IoU-aware scores."""
        pooled = self.box_head(self.box_roi_pool(features, proposals, image_shapes))
        class_logits, box_regression, iou_logits = self.box_predictor(pooled)
        scores = iou_aware_logits(class_logits, iou_logits, self.iou_alpha)
        boxes, scores, labels = self.postprocess_detections(scores, box_regression, proposals, image_shapes)
        return [{"boxes": b, "scores": s, "labels": l} for b, s, l in zip(boxes, scores, labels)]

    def losses(
        self,
        class_logits: Tensor,
        box_regression: Tensor,
        rois: Tensor,
        labels: Tensor,
        regression_targets: Tensor,
        iou_logits: Tensor | None = None,
        overlaps: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Cross-entropy over classes, and the box loss over the lesion RoIs (each with its own
        class's offsets), summed and divided by all sampled RoIs as torchvision does; with
        `iou_logits` and `overlaps` (each RoI's best IoU with a lesion), also `loss_box_iou`, the
        predicted IoUs against `iou_targets`."""
        positive = (labels > 0).nonzero().flatten()
        if box_regression.shape[1] == 4:  # one class-agnostic box per RoI (a cascade stage's)
            deltas = box_regression[positive]
        else:
            deltas = box_regression.reshape(len(labels), -1, 4)[positive, labels[positive]]
        if self.box_loss == "giou" or iou_logits is not None:
            predicted = self.box_coder.decode_single(deltas, rois[positive])
            lesion = self.box_coder.decode_single(regression_targets[positive], rois[positive])
        if self.box_loss == "giou":
            box = generalized_box_iou_loss(predicted, lesion, reduction="sum")
        else:
            box = F.smooth_l1_loss(deltas, regression_targets[positive], beta=1 / 9, reduction="sum")
        losses = {
            "loss_classifier": F.cross_entropy(class_logits, labels),
            "loss_box_reg": self.box_weight * box / max(len(labels), 1),
        }
        if iou_logits is not None:
            targets = iou_targets(labels > 0, predicted, lesion, overlaps)
            losses["loss_box_iou"] = iou_loss(iou_logits, targets)
        return losses


def build_roi_heads(config: RoIConfig, feature_names: list[str], in_channels: int, num_classes: int) -> nn.Module:
    """Builds the second stage for `num_classes` lesion classes (background is added here): one
    `LesionRoIHeads`, or with `config.cascade_iou` a `CascadeRoIHeads` of one per IoU."""
    pool = SparseMultiScaleRoIAlign(
        featmap_names=feature_names, output_size=config.output_size, sampling_ratio=config.sampling_ratio
    )
    channels = in_channels
    if config.context_scale is not None:
        pool, channels = ContextRoIAlign(pool, config.context_scale), 2 * in_channels
    head_inputs = channels * config.output_size**2
    if config.image_context:
        pool, head_inputs = ImageContextRoIAlign(pool, feature_names[-1]), head_inputs + 4 + in_channels
    if config.cascade_iou is None:
        predictor_class = FastRCNNPredictor if config.iou_aware is None else IoUAwareBoxPredictor
        predictor = predictor_class(config.representation_size, num_classes + 1)
        return _stage(config, pool, head_inputs, predictor, config.fg_iou_thresh, config.bg_iou_thresh, None)
    from medrpn.model.cascade_roi_heads import AgnosticBoxPredictor, CascadeRoIHeads, stage_box_weights

    stages = [
        _stage(config, None, head_inputs, AgnosticBoxPredictor(config.representation_size, num_classes + 1), iou, iou, stage_box_weights(i))
        for i, iou in enumerate(config.cascade_iou)
    ]
    return CascadeRoIHeads(pool, stages)


def _stage(config: RoIConfig, pool: nn.Module | None, head_inputs: int, predictor: nn.Module, fg_iou: float, bg_iou: float, box_weights) -> LesionRoIHeads:
    head = TwoMLPHead(head_inputs, config.representation_size)
    return LesionRoIHeads(
        pool,
        head,
        predictor,
        fg_iou_thresh=fg_iou,
        bg_iou_thresh=bg_iou,
        batch_size_per_image=config.batch_size_per_image,
        positive_fraction=config.positive_fraction,
        bbox_reg_weights=box_weights,
        score_thresh=config.score_thresh,
        nms_thresh=config.nms_thresh,
        detections_per_img=config.detections_per_img,
        box_loss=config.box_loss,
        box_weight=config.box_weight,
        iou_alpha=config.iou_aware,
    )
