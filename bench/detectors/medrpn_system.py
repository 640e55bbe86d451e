"""medrpn's detector, built from a recipe's `model:` section exactly as `medrpn fit` builds it.

Two variants: the recipe as written ("medrpn") and the same recipe with a MobileNetV3-Large
backbone ("medrpn_mobilenet"), to compare with torchvision's MobileNetV3 Faster R-CNN on the same
backbone. Anchor sizes are in input pixels of the recipe's image size; at another image size they
are scaled with it, so they keep covering the same lesions.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor

from bench.detectors.system import System
from medrpn.training.lightning_module import LesionDetectionModule


class MedrpnDetector:
    """`medrpn.model.LesionDetector` (already speaks the batch contract)."""

    def __init__(self, module: LesionDetectionModule) -> None:
        self.model = module.model

    def losses(self, images: Tensor, targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return self.model(images, targets).losses

    def predict(self, images: Tensor) -> tuple[list[dict[str, Tensor]], list[Tensor] | None]:
        out = self.model(images)
        return out.detections, out.proposals


def model_section(recipe: dict[str, Any], image_size: int, backbone: str | None = None) -> dict[str, Any]:
    """The recipe's model settings for `image_size` (anchors scaled), optionally with another backbone."""
    model = copy.deepcopy(recipe.get("model") or {})
    recipe_size = int((recipe.get("data") or {}).get("image_size", image_size))
    anchors = model.setdefault("anchors", {})
    if "sizes" in anchors and recipe_size != image_size:
        scale = image_size / recipe_size
        anchors["sizes"] = [[float(s) * scale for s in level] for level in anchors["sizes"]]
    if backbone is not None:
        model.setdefault("backbone", {})["name"] = backbone
    return model


def build_medrpn(recipe: dict[str, Any], class_names: list[str], image_size: int, backbone: str | None = None) -> System:
    """medrpn with the recipe's model section (and `backbone` instead of the recipe's, when given)."""
    settings = model_section(recipe, image_size, backbone)
    module = LesionDetectionModule(class_names=class_names, **settings)
    config = module.detector_config
    name = "medrpn" if backbone is None else "medrpn_mobilenet"
    return System(
        name=name,
        detector=MedrpnDetector(module),
        description=f"medrpn two-stage, {config.backbone.name} + FPN{config.backbone.fpn_channels}",
        settings={"model": settings},
    )
