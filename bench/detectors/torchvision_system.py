"""torchvision's Faster R-CNN (ResNet-50 FPN, MobileNetV3-Large FPN), from scratch, default settings.

Only what the comparison needs differs from torchvision's defaults:
- `min_size = max_size = image_size`, so its transform does not resize (the data pipeline already
  gives every system the same square images);
- grey-scale images are repeated to 3 channels (its backbones take RGB); its own ImageNet
  normalisation is kept;
- labels are shifted by one (torchvision's class 0 is the background);
- `box_score_thresh` is the evaluation threshold shared by all systems (see `run.py`).
RPN proposals are taken from the model's own `rpn` module in eval mode, by running its forward
steps one by one, as `GeneralizedRCNN.forward` does.
"""

from __future__ import annotations

from torch import Tensor, nn
from torchvision.models.detection import fasterrcnn_mobilenet_v3_large_fpn, fasterrcnn_resnet50_fpn
from torchvision.models.detection.transform import resize_boxes

from bench.detectors.system import System

_BUILDERS = {"tv_resnet50": fasterrcnn_resnet50_fpn, "tv_mobilenet": fasterrcnn_mobilenet_v3_large_fpn}
_NAMES = {"tv_resnet50": "resnet50 + FPN256", "tv_mobilenet": "mobilenet_v3_large + FPN256"}


class TorchvisionDetector:
    """A torchvision `FasterRCNN` behind the batch contract."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @staticmethod
    def _rgb(images: Tensor) -> list[Tensor]:
        return list(images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images)

    def losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        shifted = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
        return self.model(self._rgb(images), shifted)

    def predict(self, images: Tensor) -> tuple[list[dict[str, Tensor]], list[Tensor] | None]:
        model = self.model
        inputs = self._rgb(images)
        original_sizes = [tuple(image.shape[-2:]) for image in inputs]
        image_list, _ = model.transform(inputs)
        features = model.backbone(image_list.tensors)
        proposals, _ = model.rpn(image_list, features)
        detections, _ = model.roi_heads(features, proposals, image_list.image_sizes)
        detections = model.transform.postprocess(detections, image_list.image_sizes, original_sizes)
        proposals = [resize_boxes(p, size, original) for p, size, original in zip(proposals, image_list.image_sizes, original_sizes)]
        detections = [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"] - 1} for d in detections]
        return detections, proposals


def build_torchvision(name: str, num_classes: int, image_size: int, score_thresh: float) -> System:
    """`fasterrcnn_resnet50_fpn` ("tv_resnet50") or `fasterrcnn_mobilenet_v3_large_fpn` ("tv_mobilenet")."""
    changed = {"min_size": image_size, "max_size": image_size, "box_score_thresh": score_thresh}
    model = _BUILDERS[name](weights=None, weights_backbone=None, num_classes=num_classes + 1, **changed)
    return System(
        name=name,
        detector=TorchvisionDetector(model),
        description=f"torchvision Faster R-CNN, {_NAMES[name]}",
        settings={"changed_from_defaults": changed, "anchors": "torchvision default (32..512 px, ratios 0.5/1/2)"},
    )
