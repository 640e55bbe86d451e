"""MONAI's RetinaNet (`monai.apps.detection`), 2D, from scratch, set up as MONAI's detection tutorial does.

- Backbone: `monai.networks.nets.resnet` (ResNet-50 or ResNet-18, `spatial_dims=2`, one input
  channel) under `resnet_fpn_feature_extractor`; returned layers 1..4, so the pyramid has the same
  strides as medrpn's recipe (4 .. 32, plus a pooled 64).
- Anchors: `AnchorGeneratorWithAnchorShape` with the recipe's finest-level anchor sizes and aspect
  ratios (doubling per level), i.e. the same anchor shapes medrpn uses for this data.
- Training: ATSS matcher (4 candidates) and hard-negative sampler (64 per image, 30% positive,
  pool 20, at least 16 negatives), as in MONAI's LUNA16 tutorial; its default losses (BCE,
  smooth L1). Inference: its box selector with the shared evaluation score threshold.
MONAI orders box coordinates by array axis (row before column), so boxes are swapped from
medrpn's xyxy on the way in and back on the way out. Images go in as given ([0, 1]), as MONAI expects.
"""

from __future__ import annotations

import math
from typing import Any

from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.nets import resnet
from torch import Tensor

from bench.detectors.system import System

RETURNED_LAYERS = (1, 2, 3, 4)
_SWAP = [1, 0, 3, 2]  # xyxy <-> (row, col, row, col)


class MonaiDetector:
    """A `RetinaNetDetector` behind the batch contract (one-stage: no proposals)."""

    def __init__(self, detector: RetinaNetDetector) -> None:
        self.model = detector

    def losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        swapped = [{"boxes": t["boxes"][:, _SWAP], "labels": t["labels"]} for t in targets]
        return self.model(images, swapped)

    def predict(self, images: Tensor) -> tuple[list[dict[str, Tensor]], list[Tensor] | None]:
        out = self.model(images)
        detections = [
            {"boxes": d[self.model.target_box_key][:, _SWAP], "scores": d[self.model.pred_score_key], "labels": d[self.model.target_label_key]}
            for d in out
        ]
        return detections, None


def base_anchor_shapes(sizes: list[float], aspect_ratios: list[float]) -> list[tuple[float, float]]:
    """(rows, cols) anchor shapes of the finest level: every size with every height/width ratio."""
    return [(s * math.sqrt(r), s / math.sqrt(r)) for s in sizes for r in aspect_ratios]


def build_monai(
    num_classes: int, finest_sizes: list[float], aspect_ratios: list[float], score_thresh: float, depth: str = "resnet50"
) -> System:
    """RetinaNet on a 2D MONAI ResNet (`depth`: "resnet50" or "resnet18") with the given anchor shapes."""
    shapes = base_anchor_shapes(finest_sizes, aspect_ratios)
    scales = [2**level for level in range(len(RETURNED_LAYERS) + 1)]
    anchor_generator = AnchorGeneratorWithAnchorShape(feature_map_scales=scales, base_anchor_shapes=shapes)
    backbone = getattr(resnet, depth)(spatial_dims=2, n_input_channels=1, conv1_t_size=7, conv1_t_stride=2)
    feature_extractor = resnet_fpn_feature_extractor(
        backbone=backbone, spatial_dims=2, pretrained_backbone=False, returned_layers=RETURNED_LAYERS, trainable_backbone_layers=None
    )
    size_divisible = [s * 2 * 2 ** max(RETURNED_LAYERS) for s in feature_extractor.body.conv1.stride]
    network = RetinaNet(
        spatial_dims=2,
        num_classes=num_classes,
        num_anchors=anchor_generator.num_anchors_per_location()[0],
        feature_extractor=feature_extractor,
        size_divisible=size_divisible,
    )
    detector = RetinaNetDetector(network=network, anchor_generator=anchor_generator)
    detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
    detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
    selector: dict[str, Any] = {"score_thresh": score_thresh, "topk_candidates_per_level": 1000, "nms_thresh": 0.5, "detections_per_img": 100}
    detector.set_box_selector_parameters(**selector)
    return System(
        name="monai_retinanet",
        detector=MonaiDetector(detector),
        description=f"MONAI RetinaNet 2D, {depth} + FPN256",
        settings={
            "backbone": depth,
            "returned_layers": list(RETURNED_LAYERS),
            "anchor_shapes_finest_level_rows_cols": [[round(h, 2), round(w, 2)] for h, w in shapes],
            "feature_map_scales": scales,
            "matcher": "ATSS(num_candidates=4)",
            "sampler": "hard negative (64 per image, 0.3 positive, pool 20, min_neg 16)",
            "box_selector": selector,
        },
    )
