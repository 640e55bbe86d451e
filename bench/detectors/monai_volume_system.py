"""MONAI's RetinaNet (`monai.apps.detection`) in 3D, from scratch, set up as MONAI's LUNA16 detection
tutorial (`tutorials/detection/luna16_training.py` and its `config_train_luna16_16g.json`) does:

- Backbone: `monai.networks.nets.resnet` in 3D (`depth`, the tutorial's resnet50 by default), one
  input channel, stem kernel 7 with stride (2, 2, 1) for thick slices, under
  `resnet_fpn_feature_extractor` with returned layers 1 and 2; `size_divisible` as the tutorial
  computes it.
- Anchors: `AnchorGeneratorWithAnchorShape` with feature-map scales 1, 2, 4 and three base shapes.
  The tutorial's ([6, 8, 4], [8, 6, 5], [10, 10, 6] voxels) are for LUNA16's 0.7 x 0.7 x 1.25 mm
  nodules; here they are set for the phantoms' 0.9 x 0.9 x 3 mm voxels and 3-40 mm lesions, in
  the same way: ([6, 6, 2], [10, 10, 3], [14, 14, 5]) voxels, x 1, 2, 4 by level.
- Training: ATSS matcher (4 candidates, `center_in_gt` False), hard-negative sampler (64 per
  image, 0.3 positive, pool 20, at least 16 negatives), its losses summed with weight 1, SGD with
  lr 0.01, momentum 0.9, weight decay 3e-5, Nesterov (the tutorial's optimizer).
- Inference: MONAI's own sliding-window inferer over the whole scan (the same window and overlap
  as medrpn's bench run) and box selector (score 0.02, top 1000 per level, NMS 0.22, 300 per
  scan), all as in the tutorial.

medrpn's volume boxes are (x1, y1, z1, x2, y2, z2) along the array's axes, which is MONAI's
"xyzxyz" box mode for arrays indexed (x, y, z): the boxes go in and come out unchanged.
"""

from __future__ import annotations

import torch
from monai.apps.detection.networks.retinanet_detector import RetinaNetDetector
from monai.apps.detection.networks.retinanet_network import RetinaNet, resnet_fpn_feature_extractor
from monai.apps.detection.utils.anchor_utils import AnchorGeneratorWithAnchorShape
from monai.networks.nets import resnet

RETURNED_LAYERS = (1, 2)
STEM_STRIDE = (2, 2, 1)
BASE_ANCHOR_SHAPES = ((6, 6, 2), (10, 10, 3), (14, 14, 5))


class MonaiVolumeSystem:
    """A 3D `RetinaNetDetector`: losses on a batch of patches, detections on a whole scan."""

    def __init__(self, num_classes: int, window: tuple[int, int, int], overlap: float, depth: str = "resnet50") -> None:
        scales = [2**level for level in range(len(RETURNED_LAYERS) + 1)]
        anchors = AnchorGeneratorWithAnchorShape(feature_map_scales=scales, base_anchor_shapes=BASE_ANCHOR_SHAPES)
        backbone = getattr(resnet, depth)(spatial_dims=3, n_input_channels=1, conv1_t_size=7, conv1_t_stride=STEM_STRIDE)
        features = resnet_fpn_feature_extractor(
            backbone=backbone, spatial_dims=3, pretrained_backbone=False, returned_layers=list(RETURNED_LAYERS), trainable_backbone_layers=None
        )
        size_divisible = [s * 2 * 2 ** max(RETURNED_LAYERS) for s in STEM_STRIDE]
        network = RetinaNet(
            spatial_dims=3, num_classes=num_classes, num_anchors=anchors.num_anchors_per_location()[0],
            feature_extractor=features, size_divisible=size_divisible,
        )
        detector = RetinaNetDetector(network=network, anchor_generator=anchors, debug=False)
        detector.set_atss_matcher(num_candidates=4, center_in_gt=False)
        detector.set_hard_negative_sampler(batch_size_per_image=64, positive_fraction=0.3, pool_size=20, min_neg=16)
        detector.set_target_keys(box_key="boxes", label_key="labels")
        detector.set_box_selector_parameters(score_thresh=0.02, topk_candidates_per_level=1000, nms_thresh=0.22, detections_per_img=300)
        detector.set_sliding_window_inferer(roi_size=list(window), overlap=overlap, sw_batch_size=1, mode="constant", device="cpu")
        self.model = detector
        self.description = f"MONAI RetinaNet 3D ({depth} + FPN, LUNA16 tutorial settings)"

    def optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.network.parameters(), lr=0.01, momentum=0.9, weight_decay=3e-5, nesterov=True)

    def losses(self, images: torch.Tensor, targets: list[dict]) -> dict[str, torch.Tensor]:
        return self.model(images, [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])

    def detect(self, volume: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model([volume], use_inferer=True)[0]
        return {"boxes": out["boxes"], "scores": out[self.model.pred_score_key], "labels": out["labels"]}
