"""Anchors: boxes of several sizes and aspect ratios centred on every feature-map position.

Each pyramid level gets its own sizes (small anchors on the fine, high-resolution levels, large
ones on the coarse levels); every size is combined with every aspect ratio, so a level with
S sizes and R ratios has S x R anchors per position. A level given no sizes (`[]`) carries no
anchors: the RPN does not look at it (the RoI heads still pool from it), which saves the cost of
scoring a level whose scale matches no lesion. Generation itself is torchvision's `AnchorGenerator`.
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
            gives (returned stages + 1 pooled level). An empty list means "no anchors on this level".
        aspect_ratios: height / width ratios used at every level.
    """

    sizes: list[list[float]] = field(default_factory=lambda: [[8.0], [16.0], [32.0], [64.0], [128.0]])
    aspect_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])

    @property
    def anchors_per_position(self) -> list[int]:
        """Number of anchors at each position, per level (sizes x ratios; 0 on a level without anchors)."""
        return [len(level) * len(self.aspect_ratios) for level in self.sizes]

    @property
    def levels(self) -> list[int]:
        """Indices of the pyramid levels that carry anchors."""
        return [i for i, level in enumerate(self.sizes) if level]


class LevelAnchorGenerator(AnchorGenerator):
    """torchvision's `AnchorGenerator` over the carrying levels only, remembering which they are.

    Args:
        sizes, aspect_ratios: as for `AnchorGenerator`, one entry per carrying level.
        levels: pyramid index of each carrying level; the caller passes only those feature maps.
    """

    def __init__(
        self, sizes: tuple[tuple[float, ...], ...], aspect_ratios: tuple[tuple[float, ...], ...], levels: list[int]
    ) -> None:
        super().__init__(sizes=sizes, aspect_ratios=aspect_ratios)
        self.levels = list(levels)


def build_anchor_generator(config: AnchorConfig, num_levels: int) -> LevelAnchorGenerator:
    """Builds the generator for a backbone with `num_levels` pyramid levels.

    The generator knows only the levels that carry anchors (`generator.levels`); feed it those
    feature maps, in order.
    """
    if len(config.sizes) != num_levels:
        raise ConfigError(
            f"anchors.sizes has {len(config.sizes)} levels but the backbone gives {num_levels} "
            "(returned stages + 1 pooled level): give one list of sizes per level ([] for none)"
        )
    if not config.levels or not config.aspect_ratios:
        raise ConfigError("anchors: at least one level needs a size, and at least one aspect ratio is needed")
    if any(s <= 0 for level in config.sizes for s in level) or any(r <= 0 for r in config.aspect_ratios):
        raise ConfigError("anchors: sizes and aspect ratios must be positive")
    sizes = tuple(tuple(float(s) for s in config.sizes[i]) for i in config.levels)
    ratios = tuple(tuple(float(r) for r in config.aspect_ratios) for _ in sizes)
    return LevelAnchorGenerator(sizes, ratios, config.levels)
