"""DetectionMetrics: the validation figures of a lesion detector, accumulated over an epoch.

One torchmetrics ``Metric`` gives FROC sensitivities and CPM (class-agnostic), mAP at IoU 0.5
(per class, then averaged) and RPN proposal recall. Every state is a flat tensor reduced by
concatenation or sum, so the numbers are the same on one device and under DDP: per-image
matching happens in ``update`` (where the image is known) and only its results are kept.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities import dim_zero_cat

from medrpn.metrics.froc import FP_RATES, cpm, froc_points, match_image
from medrpn.metrics.proposals import proposal_hits


def froc_key(rate: float) -> str:
    """Metric name of the sensitivity at ``rate`` FP per image, e.g. ``froc_0.125fp``, ``froc_1fp``."""
    return f"froc_{rate:g}fp"


class DetectionMetrics(Metric):
    """FROC / CPM, mAP@0.5 and top-k proposal recall over a validation epoch.

    Keys returned by ``compute``: ``froc_0.125fp`` ... ``froc_8fp``, ``cpm``, ``map50`` and
    ``rpn_recall{top_k}`` (e.g. ``rpn_recall100``); all valid MLflow metric names. A value is
    nan when it has nothing to measure (no lesions, no proposals given).

    Use ``update`` each step and ``compute`` at the end of the epoch; ``forward`` only updates,
    since FROC on a single batch (a handful of false positives) means nothing.

    mAP comes from torchmetrics' ``MeanAveragePrecision`` (faster_coco_eval backend), which keeps
    the best 100 detections per image, while FROC uses all of them. Under DDP every rank must
    update with the same number of images, as ``DistributedSampler`` arranges, because that
    child metric gathers its states image by image; the FROC and recall states here are flat
    and would not need it.

    Args:
        froc_iou_threshold: IoU at which a detection hits a lesion for FROC.
        proposal_top_k: how many leading proposals count for proposal recall.
        proposal_iou_threshold: IoU at which a proposal covers a lesion.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    gt_best_scores: list[Tensor] | Tensor
    fp_scores: list[Tensor] | Tensor
    n_images: Tensor
    proposal_hits: Tensor
    proposal_n_gt: Tensor

    def __init__(
        self,
        froc_iou_threshold: float = 0.3,
        proposal_top_k: int = 100,
        proposal_iou_threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if proposal_top_k < 1:
            raise ValueError(f"proposal_top_k must be at least 1, got {proposal_top_k}")
        self.froc_iou_threshold = froc_iou_threshold
        self.proposal_top_k = proposal_top_k
        self.proposal_iou_threshold = proposal_iou_threshold
        self.add_state("gt_best_scores", default=[], dist_reduce_fx="cat")
        self.add_state("fp_scores", default=[], dist_reduce_fx="cat")
        self.add_state("n_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("proposal_hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        # Lesions in the images whose proposals were given (the recall denominator).
        self.add_state("proposal_n_gt", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.map = MeanAveragePrecision(iou_thresholds=[0.5], backend="faster_coco_eval")

    def update(
        self,
        preds: list[dict[str, Tensor]],
        targets: list[dict[str, Tensor]],
        proposals: list[Tensor] | None = None,
    ) -> None:
        """Add a batch.

        Args:
            preds: per image ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) int64.
            targets: per image ``boxes`` (G, 4) xyxy, ``labels`` (G,) int64 (0-based classes).
            proposals: per image RPN proposals (P, 4), best first; omit to skip proposal recall.
        """
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        if proposals is not None and len(proposals) != len(targets):
            raise ValueError(f"got {len(proposals)} proposal sets for {len(targets)} targets")
        gt_best, fps = [], []
        for pred, target in zip(preds, targets):
            best, fp = match_image(pred["boxes"], pred["scores"], target["boxes"], self.froc_iou_threshold)
            gt_best.append(best.to(self.device))
            fps.append(fp.to(self.device))
        if gt_best:
            self.gt_best_scores.append(torch.cat(gt_best))
            self.fp_scores.append(torch.cat(fps))
        self.n_images += len(targets)
        if proposals is not None:
            for props, target in zip(proposals, targets):
                self.proposal_hits += proposal_hits(
                    props, target["boxes"], self.proposal_top_k, self.proposal_iou_threshold
                )
                self.proposal_n_gt += target["boxes"].shape[0]
        self.map.update(
            [{"boxes": p["boxes"].detach(), "scores": p["scores"].detach(), "labels": p["labels"]} for p in preds],
            [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets],
        )

    def compute(self) -> dict[str, Tensor]:
        """The epoch's figures as 0-d float tensors (nan where there is nothing to measure)."""
        gt_best = _cat(self.gt_best_scores)
        fps = _cat(self.fp_scores)
        n_images = int(self.n_images)
        if n_images > 0:
            points = froc_points(gt_best, fps, n_images, FP_RATES)
        else:
            points = {rate: math.nan for rate in FP_RATES}
        out = {froc_key(rate): value for rate, value in points.items()}
        out["cpm"] = cpm(points)
        map50 = float(self.map.compute()["map"])
        out["map50"] = math.nan if map50 < 0 else map50  # torchmetrics reports -1 for no data
        n_gt = int(self.proposal_n_gt)
        out[f"rpn_recall{self.proposal_top_k}"] = int(self.proposal_hits) / n_gt if n_gt else math.nan
        return {key: torch.tensor(value, dtype=torch.float32, device=self.device) for key, value in out.items()}

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate only: a per-batch FROC is meaningless, and the child mAP would be reset."""
        self.update(*args, **kwargs)

    def reset(self) -> None:
        """Reset this metric's states and the child mAP metric's."""
        super().reset()
        self.map.reset()


def _cat(state: list[Tensor] | Tensor) -> Tensor:
    """A cat-reduced state as one flat tensor (empty when nothing was added)."""
    if isinstance(state, Tensor):
        return state.flatten()
    if not state:
        return torch.empty(0)
    return dim_zero_cat(state).flatten()
