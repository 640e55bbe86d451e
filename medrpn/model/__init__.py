"""The detector as plain PyTorch: backbone + FPN, anchors, Region Proposal Network, RoI heads.

Nothing here imports Lightning or MLflow: a `LesionDetector` can be built from its configs,
loaded from a state dict and run on its own.
"""

from medrpn.model.anchors import AnchorConfig, build_anchor_generator
from medrpn.model.backbone import BackboneConfig, build_backbone
from medrpn.model.detector import DetectorConfig, DetectorOutput, LesionDetector, build_detector
from medrpn.model.roi_heads import RoIConfig, build_roi_heads
from medrpn.model.rpn import RPNConfig, build_rpn

__all__ = [
    "AnchorConfig",
    "BackboneConfig",
    "DetectorConfig",
    "DetectorOutput",
    "LesionDetector",
    "RPNConfig",
    "RoIConfig",
    "build_anchor_generator",
    "build_backbone",
    "build_detector",
    "build_roi_heads",
    "build_rpn",
]
