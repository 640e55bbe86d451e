"""Anchors: boxes of several sizes and aspect ratios centred on every feature-map position.

Each pyramid level gets its own sizes (small anchors on the fine, high-resolution levels, large
ones on the coarse levels); every size is combined with every aspect ratio, so a level with
S sizes and R ratios has S x R anchors per position. Generation itself is torchvision's
`AnchorGenerator`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchvision.models.detection.anchor_utils import AnchorGenerator

from medrpn.errors import ConfigError


@dataclass
class AnchorConfig:
    """Anchor shapes per pyramid level.

    Attributes:
        sizes: one list of anchor sizes (square-root of the area, in input pixels) per pyramid
            level, finest level first. Its length must equal the number of levels the backbone
            gives (returned stages + 1 pooled level).
        aspect_ratios: height / width ratios used at every level.
    """

    sizes: list[list[float]] = field(default_factory=lambda: [[8.0], [16.0], [32.0], [64.0], [128.0]])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])

    @property
    def anchors_per_position(self) -> list[int]:
        """Number of anchors at each position, per level (sizes x ratios)."""
        return [len(level) * len(self.aspect_ratios) for level in self.sizes]


def build_anchor_generator(config: AnchorConfig, num_levels: int) -> AnchorGenerator:
    """Builds torchvision's generator for a backbone with `num_levels` pyramid levels."""
    if len(config.sizes) != num_levels:
        raise ConfigError(
            f"anchors.sizes has {len(config.sizes)} levels but the backbone gives {num_levels} "
            "(returned stages + 1 pooled level): give one list of sizes per level"
        )
    if any(not level for level in config.sizes) or not config.aspect_ratios:
        raise ConfigError("anchors: every level needs at least one size, and at least one aspect ratio is needed")
    if any(s <= 0 for level in config.sizes for s in level) or any(r <= 0 for r in config.aspect_ratios):
        raise ConfigError("anchors: sizes and aspect ratios must be positive")
    sizes = tuple(tuple(float(s) for s in level) for level in config.sizes)
    ratios = tuple(tuple(float(r) for r in config.aspect_ratios) for _ in config.sizes)
    return AnchorGenerator(sizes=sizes, aspect_ratios=ratios)
