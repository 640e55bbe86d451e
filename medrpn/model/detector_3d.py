"""The two-stage detector for volumes, built from its config: a 3D ResNet + FPN (MONAI's, with
`spatial_dims=3`), `medrpn.model.rpn_3d.RPN3D` and `medrpn.model.roi_heads_3d.RoIHeads3D`,
assembled by the same `LesionDetector` as in 2D, so the detector's contract is one: (B, C, X, Y, Z)
volumes in, targets with (N, 6) xyzxyz voxel boxes and 0-based labels, `DetectorOutput` out.

Volumes are often anisotropic (0.9 x 0.9 x 3 mm MR, 0.7 x 0.7 x 2.5 mm CT): `first_stride` sets
the stem's stride per axis, so the thick-slice axis is not halved as early as the others.
Anchors are MONAI's 3D anchor shapes per level, sizes (the cube root of the anchor's volume, in
voxels) and aspect ratios ((h/w, d/w) pairs), placed at cell centres by `medrpn.model.anchors_3d`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from medrpn.errors import ConfigError
from medrpn.model.detector import LesionDetector
from medrpn.model.roi_heads import RoIConfig
from medrpn.model.rpn import RPNConfig


@dataclass
class Backbone3DConfig:
    """A small 3D ResNet with an FPN on its stages 1-3.

    Attributes:
        in_channels: input channels (co-registered sequences as channels).
        widths: channels of ResNet stages 1-3 (basic blocks).
        blocks: residual blocks in each of stages 1-3.
        fpn_channels: channels of every pyramid level.
        first_stride: stride of the stem convolution along x, y, z (then a max pool halves all three).
    """

    in_channels: int = 1
    widths: list[int] = field(default_factory=lambda: [16, 32, 64])
    blocks: list[int] = field(default_factory=lambda: [1, 1, 1])
    fpn_channels: int = 32
    first_stride: list[int] = field(default_factory=lambda: [2, 2, 1])

    def __post_init__(self) -> None:
        if len(self.widths) != 3 or len(self.blocks) != 3 or min(self.widths + self.blocks) < 1:
            raise ConfigError(f"backbone widths and blocks need 3 positive values each (stages 1-3), got {self.widths} and {self.blocks}")
        if len(self.first_stride) != 3 or min(self.first_stride) < 1:
            raise ConfigError(f"backbone first_stride needs 3 positive values (x, y, z), got {self.first_stride}")


@dataclass
class Anchor3DConfig:
    """Anchors per pyramid level (4 levels: stages 1-3 and the FPN's max-pooled top): `sizes[i]`
    (voxels, cube root of the anchor's volume) times `aspect_ratios[i]` ((h/w, d/w) pairs)."""

    sizes: list[list[float]] = field(default_factory=lambda: [[6.0], [12.0], [24.0], [40.0]])
    aspect_ratios: list[list[list[float]]] = field(default_factory=lambda: [[[1.0, 0.5]]] * 4)

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.aspect_ratios):
            raise ConfigError(f"anchors: {len(self.sizes)} levels of sizes but {len(self.aspect_ratios)} of aspect ratios")
        for ratios in self.aspect_ratios:
            if any(len(pair) != 2 or min(pair) <= 0 for pair in ratios):
                raise ConfigError(f"3D anchor aspect ratios are positive (h/w, d/w) pairs, got {ratios}")


@dataclass
class Detector3DConfig:
    """Everything needed to rebuild a 3D detector (the 3D counterpart of `DetectorConfig`)."""

    num_classes: int
    backbone: Backbone3DConfig = field(default_factory=Backbone3DConfig)
    anchors: Anchor3DConfig = field(default_factory=Anchor3DConfig)
    rpn: RPNConfig = field(default_factory=lambda: RPNConfig(batch_size_per_image=128, pre_nms_top_n_test=300, post_nms_top_n_test=100))
    roi: RoIConfig = field(default_factory=lambda: RoIConfig(output_size=4, representation_size=128, batch_size_per_image=64))
    pixel_mean: float = 0.5
    pixel_std: float = 0.25
    cross_class_nms_thresh: float = 0.5
    containment_thresh: float | None = None
    rpn_only: bool = False


@dataclass
class VolumeModelConfig:
    """The 3D model's own settings, beside the RPN and RoI settings it shares with the 2D one: its
    backbone and anchors, and the windows it runs whole scans in (`medrpn.model.sliding_window_3d`).

    Attributes:
        backbone: the 3D ResNet + FPN.
        anchors: 3D anchors per pyramid level; "auto": planned from the training boxes by the
            `medrpn` command when a run starts (`medrpn plan`'s 3D plan, `anchors_per_position` shapes).
        window: window size along x, y, z in voxels for whole scans (clipped to the scan).
        window_overlap: share of a window its neighbours overlap; a lesion is found whole in some
            window when the overlap in voxels exceeds its size.
    """

    backbone: Backbone3DConfig = field(default_factory=Backbone3DConfig)
    anchors: Anchor3DConfig | Literal["auto"] = field(default_factory=Anchor3DConfig)
    window: list[int] = field(default_factory=lambda: [64, 64, 32])
    window_overlap: float = 0.5

    def __post_init__(self) -> None:
        if isinstance(self.backbone, dict):
            self.backbone = Backbone3DConfig(**self.backbone)
        if isinstance(self.anchors, dict):
            self.anchors = Anchor3DConfig(**self.anchors)
        if len(self.window) != 3 or min(self.window) < 1:
            raise ConfigError(f"model.volume.window needs 3 positive voxel counts (x, y, z), got {self.window}")
        if not 0 <= self.window_overlap < 1:
            raise ConfigError(f"model.volume.window_overlap must be in [0, 1), got {self.window_overlap}")


def build_backbone_3d(config: Backbone3DConfig):
    """MONAI's 3D ResNet (basic blocks) with an FPN on stages 1-3 (levels "0", "1", "2", and "pool",
    MONAI's max-pooled top level)."""
    from monai.networks.blocks.backbone_fpn_utils import BackboneWithFPN
    from monai.networks.nets.resnet import ResNet

    resnet = ResNet(
        block="basic",
        layers=[*config.blocks, 1],
        block_inplanes=[*config.widths, config.widths[-1]],
        spatial_dims=3,
        n_input_channels=config.in_channels,
        conv1_t_size=[7 if s > 1 else 3 for s in config.first_stride],
        conv1_t_stride=list(config.first_stride),
    )
    return BackboneWithFPN(
        resnet, {"layer1": "0", "layer2": "1", "layer3": "2"}, list(config.widths), config.fpn_channels, spatial_dims=3
    )


def build_detector_3d(config: Detector3DConfig) -> LesionDetector:
    """The 3D detector of `config` (without a second stage when `config.rpn_only`)."""
    from medrpn.model.anchors_3d import CellCentredAnchors
    from medrpn.model.flip_proposals import FLIP_DIMS
    from medrpn.model.roi_heads_3d import RoIHeads3D
    from medrpn.model.rpn_3d import RPN3D

    image_flips = [f for f in config.rpn.test_flips if f in FLIP_DIMS]
    if image_flips:
        raise ConfigError(f"model.rpn.test_flips: {', '.join(image_flips)} flips images; volumes flip along x, y or z")
    if config.roi.cascade_iou is not None and not config.rpn_only:
        raise ConfigError("model.roi.cascade_iou: the cascade second stage is 2D only; set it to null for volumes")
    if config.roi.iou_aware is not None and not config.rpn_only:
        raise ConfigError("model.roi.iou_aware: IoU-aware scoring is 2D only; set it to null for volumes")
    if config.roi.image_context and not config.rpn_only:
        raise ConfigError("model.roi.image_context: the image's context for the second stage is 2D only; set it to false for volumes")
    if len(config.anchors.sizes) != 4:
        raise ConfigError(f"the 3D backbone has 4 pyramid levels: give anchors for 4, got {len(config.anchors.sizes)}")
    backbone = build_backbone_3d(config.backbone)
    ratios = [[tuple(pair) for pair in level] for level in config.anchors.aspect_ratios]
    anchors = CellCentredAnchors(sizes=[tuple(level) for level in config.anchors.sizes], aspect_ratios=ratios, indexing="ij")
    rpn = RPN3D(anchors, config.backbone.fpn_channels, config.rpn)
    roi_heads = None if config.rpn_only else RoIHeads3D(config.roi, config.backbone.fpn_channels, config.num_classes + 1)
    return LesionDetector(
        backbone,
        rpn,
        roi_heads,
        pixel_mean=config.pixel_mean,
        pixel_std=config.pixel_std,
        cross_class_nms_thresh=config.cross_class_nms_thresh,
        containment_thresh=config.containment_thresh,
        test_flips=config.rpn.test_flips,
    )
