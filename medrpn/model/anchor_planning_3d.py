"""3D anchors planned from the training boxes: sizes per pyramid level and (h/w, d/w) ratios that
cover the lesions, the 3D counterpart of `medrpn.model.anchor_planning`.

Coverage is measured as in 2D: the share of boxes whose best anchor has IoU >= 0.5 (the RPN's
foreground IoU), the mean best IoU breaking ties. Anchors sit at cell centres
(`medrpn.model.anchors_3d`), every shape of a level at every position, so for one anchor shape
the best-placed anchor for a box is the one at the centre of the cell holding the box's centre
(the overlap along each axis only shrinks as the centres move apart): the best IoU is computed
from that offset alone, for boxes anywhere in a scan of any size, without making the grid (a box
centred in a scan's last, partial cell is scored as if that cell had anchors).

The plan, as in 2D, is deterministic: candidates from quantiles of the boxes' sizes (the side of
the cube of equal volume, voxels) and shapes (h/w, d/w, voxels), a box going to the coarsest
level whose stride fits its short side `factor` times along every axis, then a coordinate search
over each size and ratio. Unlike the 2D RPN, the 3D RPN's head predicts the same number of
anchors at every level, so every level gets as many sizes (a level no box needs keeps sizes on
its own scale).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medrpn.errors import ConfigError
from medrpn.model.anchor_planning import COVERAGE_IOU, LEVEL_FACTORS, REFINE_ROUNDS, REFINE_STEPS
from medrpn.model.detector_3d import Anchor3DConfig, Backbone3DConfig


def level_strides(backbone: Backbone3DConfig) -> list[tuple[int, int, int]]:
    """The voxel stride of each of the 4 pyramid levels along x, y, z, measured on the backbone itself."""
    import torch

    from medrpn.model.detector_3d import build_backbone_3d

    size = [16 * 2 * s for s in backbone.first_stride]  # a multiple of every stride
    with torch.no_grad():
        features = build_backbone_3d(backbone).eval()(torch.zeros(1, backbone.in_channels, *size))
    return [tuple(int(round(n / m)) for n, m in zip(size, f.shape[2:])) for f in features.values()]


def anchor_shapes(anchors: Anchor3DConfig) -> list[np.ndarray]:
    """Per level, the (A, 3) anchor sides (w, h, d) in voxels, taken from the detector's own
    generator (MONAI's shapes: size s and ratios (h/w, d/w) give w = s / cbrt(h/w * d/w),
    h = w * h/w, d = w * d/w, corners rounded to whole voxels)."""
    from medrpn.model.anchors_3d import CellCentredAnchors

    generator = CellCentredAnchors(
        sizes=[tuple(level) for level in anchors.sizes],
        aspect_ratios=[[tuple(pair) for pair in level] for level in anchors.aspect_ratios],
        indexing="ij",
    )
    return [(base[:, 3:] - base[:, :3]).double().numpy() for base in generator.cell_anchors]


def best_iou_3d(boxes: np.ndarray, anchors: Anchor3DConfig, strides: list[tuple[int, int, int]]) -> np.ndarray:
    """For each box (N, 6) in scan voxels, the IoU of its best anchor over every level."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    sides = boxes[:, 3:] - boxes[:, :3]
    centres = (boxes[:, 3:] + boxes[:, :3]) / 2
    best = np.zeros(len(boxes))
    for shapes, stride in zip(anchor_shapes(anchors), strides):
        if len(shapes) == 0:
            continue
        stride = np.asarray(stride, dtype=np.float64)
        offset = centres - (np.floor(centres / stride) + 0.5) * stride  # from the nearest cell centre
        b = sides[:, None, :]  # (N, 1, 3)
        a = shapes[None, :, :]  # (1, A, 3)
        o = np.abs(offset)[:, None, :]
        overlap = np.clip(np.minimum(b / 2, o + a / 2) - np.maximum(-b / 2, o - a / 2), 0, None)
        inter = overlap.prod(axis=2)
        iou = inter / (b.prod(axis=2) + a.prod(axis=2) - inter)
        best = np.maximum(best, iou.max(axis=1))
    return best


@dataclass
class Anchor3DScore:
    anchors: Anchor3DConfig
    coverage: float
    mean_iou: float

    @property
    def rank(self) -> tuple[float, float]:
        return (round(self.coverage, 6), self.mean_iou)


def score_3d(boxes: np.ndarray, anchors: Anchor3DConfig, strides: list[tuple[int, int, int]]) -> Anchor3DScore:
    best = best_iou_3d(boxes, anchors, strides)
    return Anchor3DScore(anchors, float((best >= COVERAGE_IOU).mean()) if len(best) else math.nan, float(best.mean()) if len(best) else math.nan)


@dataclass
class Anchor3DPlan:
    """The planned anchors and their score, the config's own (None when there were none) and the strides."""

    planned: Anchor3DScore
    before: Anchor3DScore | None
    strides: list[tuple[int, int, int]]

    @property
    def anchors(self) -> Anchor3DConfig:
        return self.planned.anchors


def _quantile_centres(values: np.ndarray, count: int) -> np.ndarray:
    """`count` values splitting `values` into equal shares: the medians of each share."""
    return np.quantile(values, (np.arange(count) + 0.5) / count, axis=0)


def _candidates(boxes: np.ndarray, strides: list[tuple[int, int, int]], budget: int) -> list[Anchor3DConfig]:
    sides = boxes[:, 3:] - boxes[:, :3]
    sizes = np.cbrt(sides.prod(axis=1))
    log_ratios = np.log(np.stack([sides[:, 1] / sides[:, 0], sides[:, 2] / sides[:, 0]], axis=1))
    candidates = []
    for n_ratios in range(1, budget + 1):
        n_sizes = budget // n_ratios
        order = np.argsort(log_ratios[:, 1] + 0.5 * log_ratios[:, 0], kind="stable")  # along the thick-slice shape first
        groups = np.array_split(order, n_ratios)
        ratios = [[float(round(v, 3)) for v in np.exp(np.median(log_ratios[g], axis=0))] for g in groups if len(g)]
        for factor in LEVEL_FACTORS:
            level = np.zeros(len(boxes), dtype=int)
            for index, stride in enumerate(strides):
                fits = (sides / np.asarray(stride)).min(axis=1) >= factor
                level[fits] = index
            level_sizes = []
            for index, stride in enumerate(strides):
                own = sizes[level == index]
                if len(own):
                    chosen = _quantile_centres(own, n_sizes)
                else:  # a level no box needs: sizes on its own scale, the same number as the others
                    chosen = np.cbrt(np.prod(stride)) * factor * 2.0 ** (np.arange(n_sizes) / max(n_sizes, 1))
                level_sizes.append([float(round(s, 2)) for s in chosen])
            candidates.append(Anchor3DConfig(sizes=level_sizes, aspect_ratios=[ratios] * len(strides)))
    return candidates


def _per_position(anchors: Anchor3DConfig) -> int:
    """Anchor shapes per position: the most of any level (sizes x ratios)."""
    return max(len(sizes) * len(ratios) for sizes, ratios in zip(anchors.sizes, anchors.aspect_ratios))


def _moves(anchors: Anchor3DConfig):
    """Every config one size or one ratio component away, by each of the refinement's steps."""
    for step in REFINE_STEPS:
        for level, sizes in enumerate(anchors.sizes):
            for i in range(len(sizes)):
                moved = [list(s) for s in anchors.sizes]
                moved[level][i] = round(moved[level][i] * step, 3)
                yield Anchor3DConfig(sizes=moved, aspect_ratios=anchors.aspect_ratios)
        shared = all(level == anchors.aspect_ratios[0] for level in anchors.aspect_ratios)
        for level in [None] if shared else range(len(anchors.aspect_ratios)):  # None: every level alike
            own = anchors.aspect_ratios[0 if level is None else level]
            for i in range(len(own)):
                for component in (0, 1):
                    ratios = [list(pair) for pair in own]
                    ratios[i][component] = round(ratios[i][component] * step, 4)
                    levels = [[list(p) for p in r] for r in anchors.aspect_ratios]
                    for target in range(len(levels)) if level is None else [level]:
                        levels[target] = ratios
                    yield Anchor3DConfig(sizes=anchors.sizes, aspect_ratios=levels)


def plan_anchors_3d(
    boxes: np.ndarray, strides: list[tuple[int, int, int]], budget: int = 2, baseline: Anchor3DConfig | None = None
) -> Anchor3DPlan:
    """Anchors for 3D boxes (N, 6) in voxels on pyramid levels of `strides`, at most `budget`
    shapes (sizes x ratios) per position, chosen for coverage, then mean best IoU."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    if len(boxes) == 0:
        raise ConfigError("no box to plan 3D anchors from")
    if budget < 1:
        raise ConfigError(f"anchors per position must be at least 1, got {budget}")
    candidates = _candidates(boxes, strides, budget)
    if baseline is not None and _per_position(baseline) <= budget and len(baseline.sizes) == len(strides):
        candidates.append(baseline)  # the plan starts from the config's anchors too: never worse than them
    best = max((score_3d(boxes, c, strides) for c in candidates), key=lambda s: s.rank)
    for _ in range(REFINE_ROUNDS):
        moved = max((score_3d(boxes, c, strides) for c in _moves(best.anchors)), key=lambda s: s.rank)
        if moved.rank <= best.rank:
            break
        best = moved
    before = None if baseline is None else score_3d(boxes, baseline, strides)
    return Anchor3DPlan(best, before, strides)
