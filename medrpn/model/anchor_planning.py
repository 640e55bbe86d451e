"""Anchors planned from the training boxes, and how well a set of anchors covers them.

A two-stage detector only learns a lesion the RPN can propose, and the RPN only learns from
boxes that some anchor overlaps with IoU >= 0.5 (torchvision's foreground threshold). So the
measure here is *coverage*: the share of ground-truth boxes whose best anchor, on the real grid
of the backbone's pyramid levels at the network input size, has IoU >= 0.5; the mean best IoU
breaks ties (a closer anchor is an easier regression target).

`plan_anchors` picks sizes per level and shared aspect ratios from the box statistics and keeps
the candidate that covers the boxes best under a budget of anchors per position. It follows
nnDetection's anchor planning (`nndet/planning/architecture/boxes/base.py`, `BoxC001._plan_anchors`),
which fits anchor widths and heights to the training boxes by maximising the mean best IoU
between boxes and anchors with an evolutionary optimiser (nevergrad, 3 x 5,000 evaluations),
with the boxes moved to the origin (the grid ignored) and one set of shapes scaled by each
level's stride. From it we take the objective (best anchor IoU over the training set, computed
with the detector's own anchor generator) and the idea that anchors come from dataset
statistics, not from natural-image defaults. We differ where medical lesions need it:
- scored on the real grid: a small lesion is lost by its offset from the nearest anchor centre,
  which an origin-centred comparison cannot see;
- ranked by coverage first, mean IoU second: a box without a positive anchor is never learnt,
  however good the mean;
- a few dozen deterministic quantile candidates, each refined by a coordinate search (one size
  or ratio at a time, by steps of 2**(1/8) and 2**(1/4)), instead of an optimiser: seconds to
  tens of seconds on a CPU, the same plan on every run, no extra dependency. The quantiles
  alone split the boxes into equal shares, so a few elongated or very large lesions never pull
  a ratio or a size outwards; the search does, when that covers more boxes;
- sizes per level, and none (`[]`) on levels that no box needs, so fewer anchors per image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torchvision.models.detection.image_list import ImageList

from medrpn.errors import ConfigError
from medrpn.model.anchors import AnchorConfig, build_anchor_generator
from medrpn.model.box_ops import paired_box_iou

COVERAGE_IOU = 0.5  # torchvision's RPN foreground IoU: a box with no anchor at this IoU gets no positive
# A box goes to the coarsest level whose stride is at most (its short side / factor); each factor is tried.
# Up to 4, i.e. short sides of 4-8 strides: torchvision's own default (32 px anchors at stride 4) has
# 5.7-8; more would pull large boxes onto fine levels whose 3x3 RPN head sees only part of them.
LEVEL_FACTORS = (1.0, 1.5, 2.0, 3.0, 4.0)
MIN_SPREAD = 2**0.25  # neighbouring sizes (or ratios) of a level differ by at least this factor
# The refinement's moves: one size or ratio scaled by each factor, repeated while coverage (then mean IoU) grows.
REFINE_STEPS = (2**-0.25, 2**-0.125, 2**0.125, 2**0.25)
REFINE_ROUNDS = 20  # an upper bound; on the brain tumour boxes the search stops after 2-6 rounds


@dataclass
class AnchorSetup:
    """What the anchor coverage needs from the model config."""

    anchors: AnchorConfig = field(default_factory=AnchorConfig)
    returned_stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])

    @property
    def strides(self) -> list[int]:
        """Stride of each pyramid level: stage k has stride 2**(k+1), plus the pooled level (x2 the last)."""
        strides = [2 ** (k + 1) for k in sorted(self.returned_stages)]
        return strides + [strides[-1] * 2]


def _level_grids(setup: AnchorSetup, image_size: int) -> list[torch.Tensor]:
    """The anchors of every level that carries some, each as (rows, cols, anchors per position, 4).

    They are made by the detector's own generator (torchvision's `AnchorGenerator` built from
    `AnchorConfig`) on feature maps of the backbone's strides for an `image_size` square input;
    levels with an empty size list are skipped, as the RPN skips their feature maps.
    """
    strides, sizes = setup.strides, setup.anchors.sizes
    if len(sizes) != len(strides):
        raise ConfigError(
            f"anchors.sizes has {len(sizes)} levels but the backbone gives {len(strides)} "
            "(returned stages + 1 pooled level): give one list of sizes per level ([] for none)"
        )
    kept = [i for i, level in enumerate(sizes) if level]
    if not kept:
        raise ConfigError("anchors: every level has an empty size list, so there are no anchors at all")
    generator = build_anchor_generator(AnchorConfig([sizes[i] for i in kept], setup.anchors.aspect_ratios), len(kept))
    grids = [(math.ceil(image_size / strides[i]),) * 2 for i in kept]
    images = ImageList(torch.zeros(1, 1, image_size, image_size), [(image_size, image_size)])
    anchors = generator(images, [torch.zeros(1, 1, *grid) for grid in grids])[0]
    per_position = generator.num_anchors_per_location()
    counts = [rows * cols * a for (rows, cols), a in zip(grids, per_position)]
    # torchvision lays anchors out row by row, then column, then shape
    return [level.view(rows, cols, a, 4) for level, (rows, cols), a in zip(anchors.split(counts), grids, per_position)]


def anchors_per_image(setup: AnchorSetup, image_size: int) -> int:
    """How many anchors the RPN scores on one `image_size` square input."""
    return sum(grid[..., 0].numel() for grid in _level_grids(setup, image_size))


def anchor_best_iou(boxes: np.ndarray, setup: AnchorSetup, image_size: int) -> np.ndarray:
    """For each box (N, 4) in input pixels, the IoU of its best-matching anchor (levels without anchors skipped)."""
    return _best_iou(boxes, _level_grids(setup, image_size))


def _best_iou(boxes: np.ndarray, grids: list[torch.Tensor]) -> np.ndarray:
    """The best IoU of each box over the anchors of `grids` (from `_level_grids`).

    Exactly the maximum of `box_iou(boxes, all anchors)`, without the N x anchors matrix: all
    anchors of a position share its centre, and for a fixed anchor shape the overlap only shrinks
    as the centres move apart along x or y, so each anchor shape's best is at one of the two grid
    columns and two grid rows around the box centre. That keeps planning (about 1,500 evaluations
    on the 1,746 brain tumour boxes, most of them in the refinement) to 15 s on one thread.
    """
    boxes_t = torch.as_tensor(np.asarray(boxes, dtype=np.float32).reshape(-1, 4))
    best = torch.zeros(len(boxes_t))
    if len(boxes_t) == 0:
        return best.numpy()
    centres = (boxes_t[:, :2] + boxes_t[:, 2:]) / 2
    for grid in grids:
        rows, cols = grid.shape[:2]
        xs = (grid[0, :, 0, 0] + grid[0, :, 0, 2]) / 2  # anchor centres along x (one per column)
        ys = (grid[:, 0, 0, 1] + grid[:, 0, 0, 3]) / 2
        ix = torch.searchsorted(xs.contiguous(), centres[:, 0].contiguous())
        iy = torch.searchsorted(ys.contiguous(), centres[:, 1].contiguous())
        ix = torch.stack([ix - 1, ix]).clamp(0, cols - 1)  # (2, N): the columns left and right of the centre
        iy = torch.stack([iy - 1, iy]).clamp(0, rows - 1)
        near = grid[iy[:, None, :], ix[None, :, :]]  # (2, 2, N, anchors per position, 4)
        iou = paired_box_iou(boxes_t[None, None, :, None, :], near)
        best = torch.maximum(best, iou.amax(dim=(0, 1, 3)))
    return best.numpy()


def torchvision_anchors(num_levels: int) -> AnchorConfig:
    """torchvision's default detection anchors for `num_levels` levels: one size per level from 32 px, doubling, x 3 ratios."""
    return AnchorConfig(sizes=[[32.0 * 2**i] for i in range(num_levels)], aspect_ratios=[0.5, 1.0, 2.0])


@dataclass
class AnchorScore:
    """How one set of anchors covers a set of boxes.

    Attributes:
        anchors: the anchors scored.
        best_iou: (N,) IoU of each box's best anchor.
        anchors_per_image: anchors the RPN scores per input image.
    """

    anchors: AnchorConfig
    best_iou: np.ndarray = field(repr=False)
    anchors_per_image: int

    @property
    def coverage(self) -> float:
        """Share of boxes whose best anchor has IoU >= `COVERAGE_IOU`."""
        return float(np.mean(self.best_iou >= COVERAGE_IOU)) if len(self.best_iou) else 0.0

    @property
    def mean_iou(self) -> float:
        """Mean over boxes of the best anchor IoU."""
        return float(np.mean(self.best_iou)) if len(self.best_iou) else 0.0


def score_anchors(boxes: np.ndarray, setup: AnchorSetup, image_size: int) -> AnchorScore:
    """Coverage, mean best IoU and anchors per image of `setup`'s anchors on `boxes` (input pixels)."""
    grids = _level_grids(setup, image_size)
    return AnchorScore(setup.anchors, _best_iou(boxes, grids), sum(grid[..., 0].numel() for grid in grids))


@dataclass
class AnchorPlan:
    """The planned anchors, with the scores they are chosen by.

    Attributes:
        anchors: the chosen anchors (`[]` on levels that no box needs).
        planned: the score of `anchors` on the boxes.
        before: the score of the baseline anchors (the config's), or None when none was given.
        torchvision: the score of torchvision's default anchors on the same levels, for reference.
        strides: the stride of each pyramid level, finest first.
    """

    anchors: AnchorConfig
    planned: AnchorScore
    before: AnchorScore | None
    torchvision: AnchorScore
    strides: list[int]

    @property
    def coverage(self) -> float:
        """The plan's coverage (`planned.coverage`)."""
        return self.planned.coverage

    @property
    def mean_iou(self) -> float:
        """The plan's mean best IoU (`planned.mean_iou`)."""
        return self.planned.mean_iou

    @property
    def anchors_per_image(self) -> int:
        """The plan's anchors per image (`planned.anchors_per_image`)."""
        return self.planned.anchors_per_image


def _rank(score: AnchorScore) -> tuple[float, float, int]:
    """What a plan is chosen by: coverage first, then mean best IoU, then fewer anchors."""
    return score.coverage, score.mean_iou, -score.anchors_per_image


def _moved(anchors: AnchorConfig, level: int | None, index: int, step: float) -> AnchorConfig | None:
    """`anchors` with one shape scaled by `step`: size `index` of `level`, or aspect ratio `index` if `level` is None.

    None if that would bring two sizes of the level (or two ratios) closer than `MIN_SPREAD`.
    """
    values = anchors.aspect_ratios if level is None else anchors.sizes[level]
    digits = 2 if level is None else 1
    moved = sorted(round(v * step, digits) if k == index else v for k, v in enumerate(values))
    if any(b / a < MIN_SPREAD * 0.999 for a, b in zip(moved, moved[1:])):  # 0.999: the rounding
        return None
    if level is None:
        return AnchorConfig([list(sizes) for sizes in anchors.sizes], moved)
    return AnchorConfig([moved if k == level else list(sizes) for k, sizes in enumerate(anchors.sizes)], list(anchors.aspect_ratios))


def _refine(boxes: np.ndarray, start: AnchorScore, stages: list[int], image_size: int) -> AnchorScore:
    """`start` improved by coordinate search: every size of every level, then every ratio, is scaled by each of
    `REFINE_STEPS` in turn, and a move is kept when it ranks higher (`_rank`); rounds repeat until one keeps none.

    The anchor count never changes (a move scales a shape, it adds none, and empty levels stay
    empty), so the search only trades coverage and mean IoU between shapes. Deterministic.
    """
    best = start
    for _ in range(REFINE_ROUNDS):
        improved = False
        shapes = [(level, i) for level, sizes in enumerate(best.anchors.sizes) for i in range(len(sizes))]
        for level, index in shapes + [(None, i) for i in range(len(best.anchors.aspect_ratios))]:
            for step in REFINE_STEPS:
                moved = _moved(best.anchors, level, index, step)
                if moved is None:
                    continue
                score = score_anchors(boxes, AnchorSetup(moved, stages), image_size)
                if _rank(score) > _rank(best):
                    best, improved = score, True
        if not improved:
            break
    return best


def _quantiles(values: np.ndarray, count: int) -> np.ndarray:
    """`count` values at the centres of `count` equal-mass slices of the distribution (1: the median)."""
    return np.quantile(values, (np.arange(count) + 0.5) / count)


def _spread(logs: np.ndarray, digits: int) -> list[float]:
    """exp(logs), sorted, pushed apart to at least `MIN_SPREAD` between neighbours around the same centre, rounded.

    Levels with one or few box sizes (or all boxes of one shape) would otherwise get the same
    anchor several times: a wasted share of the budget.
    """
    logs = np.sort(np.asarray(logs, dtype=np.float64))
    pushed = logs.copy()
    for i in range(1, len(pushed)):
        pushed[i] = max(pushed[i], pushed[i - 1] + math.log(MIN_SPREAD))
    pushed += logs.mean() - pushed.mean()
    return [round(float(v), digits) for v in np.exp(pushed)]


def _candidates(boxes: np.ndarray, strides: list[int], budget: int) -> list[AnchorConfig]:
    """Anchor sets built from the box statistics, one per (level rule, sizes x ratios split of the budget).

    - Aspect ratios: the quantiles of log(height / width), so ratios sit where the boxes are
      (elongated lesions get elongated anchors) and split the boxes evenly between them.
    - Levels: a box needs a grid fine enough that half a stride of offset (the worst case
      between its centre and the nearest anchor centre) does not ruin the IoU along its short
      side, and no finer (finer levels cost anchors). It goes to the coarsest level whose
      stride is at most its short side / factor, for each factor in `LEVEL_FACTORS`; the
      scoring picks the factor.
    - Sizes: per level, the quantiles of sqrt(area) (the anchor size convention) of the boxes
      that went there; levels that no box went to get `[]`.
    - Budget: every split sizes x ratios <= budget (sizes = budget // ratios), the same on
      every level, as the RPN head is shared between levels.
    """
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    log_size, log_ratio = 0.5 * np.log(w * h), np.log(h / w)
    short = np.minimum(w, h)
    configs: list[AnchorConfig] = []
    for factor in LEVEL_FACTORS:
        level = np.clip(np.searchsorted(np.asarray(strides) * factor, short, side="right") - 1, 0, len(strides) - 1)
        for num_ratios in range(1, budget + 1):
            num_sizes = budget // num_ratios
            ratios = _spread(_quantiles(log_ratio, num_ratios), 2)
            sizes = [
                _spread(_quantiles(log_size[level == i], num_sizes), 1) if np.any(level == i) else []
                for i in range(len(strides))
            ]
            config = AnchorConfig(sizes=sizes, aspect_ratios=ratios)
            if config not in configs:
                configs.append(config)
    return configs


def plan_anchors(
    boxes: np.ndarray,
    returned_stages: list[int],
    image_size: int,
    anchors_per_position: int = 3,
    baseline: AnchorConfig | None = None,
) -> AnchorPlan:
    """Anchors fitted to `boxes`: the candidate with the best coverage, then mean best IoU, then fewest anchors.

    Args:
        boxes: (N, 4) training boxes in network-input pixels, xyxy (already fitted to `image_size`).
        returned_stages: the backbone's returned stages; they and the pooled level give the strides.
        image_size: the square network input side.
        anchors_per_position: the budget: sizes x ratios per position on every level that has anchors.
        baseline: anchors to compare with (the config's); scored as `before` when given.

    Every box gets a level with anchors (levels are only left empty when no box went there), and
    each candidate is refined (`_refine`) and scored on the real grid with `anchor_best_iou`.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(boxes) == 0:
        raise ValueError("no boxes to plan anchors from")
    if np.any(boxes[:, 2] <= boxes[:, 0]) or np.any(boxes[:, 3] <= boxes[:, 1]):
        raise ValueError("every box needs a positive width and height to plan anchors from")
    if anchors_per_position < 1:
        raise ConfigError(f"anchors per position must be at least 1, got {anchors_per_position}")
    stages = list(returned_stages)
    strides = AnchorSetup(returned_stages=stages).strides
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # many small tensor ops: on busy cores extra threads only wait (25x slower seen)
    try:
        candidates = _candidates(boxes, strides, anchors_per_position)
        scores = [_refine(boxes, score_anchors(boxes, AnchorSetup(c, stages), image_size), stages, image_size) for c in candidates]
        best = max(scores, key=_rank)  # first of equals: deterministic
        before = score_anchors(boxes, AnchorSetup(baseline, stages), image_size) if baseline is not None else None
        reference = score_anchors(boxes, AnchorSetup(torchvision_anchors(len(strides)), stages), image_size)
    finally:
        torch.set_num_threads(threads)
    return AnchorPlan(best.anchors, best, before, reference, strides)
