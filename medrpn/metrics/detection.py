"""DetectionMetrics: the evaluation figures of a lesion detector, accumulated over an epoch.

One torchmetrics ``Metric`` gives FROC sensitivities and CPM (class-agnostic and per class) under
the chosen hit rule, the class-agnostic CPM at IoU >= 0.5 beside it (comparable across projects
whatever the chosen rule), COCO mAP at IoU 0.1 / 0.5 / 0.5:0.95, RPN proposal recall by lesion size,
an operating point and, on request, bootstrap intervals (see ``medrpn.metrics.report`` for the
names and ``medrpn.metrics.froc`` for the counting rules).

Every state is a flat 1-D tensor reduced by concatenation, per image, per prediction or per
lesion, and matching under the hit rule happens in ``update`` (where the image is known). After a
DDP gather, images, predictions and lesions of every rank follow each other in rank order in all
states alike, so the figures are exactly those of one process over the same images, whatever the
number of images per rank. Patient ids (for the bootstrap) travel as 63-bit hashes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from medrpn.metrics.froc import (
    HitRule,
    best_hit_scores,
    check_hit_rule,
    credit_one_lesion_each,
    hit_quality,
    hits_of_quality,
)
from medrpn.metrics.proposals import PROPOSAL_TOP_KS, best_proposal_iou_batch, lesion_size
from medrpn.metrics.report import DetectionRecords, EvaluationReport, evaluate_records, froc_key

__all__ = ["DetectionMetrics", "froc_key", "patient_hash"]

# name -> dtype of every state (all 1-D, concatenated across batches and ranks)
_STATES: dict[str, torch.dtype] = {
    "img_n_pred": torch.long,
    "img_n_gt": torch.long,
    "img_patient": torch.long,  # hash of the patient id, or -1 when unknown
    "pred_box": torch.float32,  # 4 values per prediction
    "pred_score": torch.float32,
    "pred_label": torch.long,
    "pred_fp_any": torch.uint8,
    "pred_fp_cls": torch.uint8,
    "pred_fp_iou50": torch.uint8,
    "gt_box": torch.float32,  # 4 values per lesion
    "gt_label": torch.long,
    "gt_best_any": torch.float32,
    "gt_best_cls": torch.float32,
    "gt_best_iou50": torch.float32,
    "gt_size_px": torch.float32,
    "gt_size_mm": torch.float32,
    "gt_proposal_iou": torch.float32,  # len(proposal_top_ks) values per lesion
}


def patient_hash(patient_id: str) -> int:
    """A stable non-negative 63-bit integer for a patient id (the same in every process)."""
    return int.from_bytes(hashlib.blake2b(str(patient_id).encode(), digest_size=8).digest(), "big") >> 1


class DetectionMetrics(Metric):
    """FROC / CPM, mAP, proposal recall and an operating point over an evaluation epoch.

    ``compute`` returns the scalars as 0-d tensors (nan where there is nothing to measure);
    ``report`` returns the whole ``EvaluationReport`` (curves, bootstrap intervals, operating
    point). Use ``update`` each step; ``forward`` only updates, since FROC on a single batch (a
    handful of false positives) means nothing.

    Args:
        class_names: class names in label order (per-class figures with two or more); by
            default ``class0``, ``class1``, ... as many as the labels seen.
        froc_hit_rule: ``"iou"`` (IoU >= ``froc_iou_threshold``) or ``"center"`` (LUNA16's
            centre-within-radius rule).
        froc_iou_threshold: IoU at which a detection hits a lesion (``"iou"`` rule).
        proposal_top_ks: numbers of leading proposals for proposal recall.
        spatial_dims: 2 (images: boxes xyxy) or 3 (volumes: boxes xyzxyz in voxels, counted per
            scan: false positives per scan, 3D IoU, sizes as the side of the cube of equal volume).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        class_names: Sequence[str] | None = None,
        froc_hit_rule: HitRule = "iou",
        froc_iou_threshold: float = 0.3,
        proposal_top_ks: Sequence[int] = PROPOSAL_TOP_KS,
        spatial_dims: int = 2,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = int(spatial_dims)
        if any(int(k) < 1 for k in proposal_top_ks) or not proposal_top_ks:
            raise ValueError(f"proposal_top_ks must be numbers >= 1, got {list(proposal_top_ks)}")
        self.class_names = list(class_names) if class_names is not None else None
        self.froc_hit_rule = check_hit_rule(froc_hit_rule)
        self.froc_iou_threshold = float(froc_iou_threshold)
        self.proposal_top_ks = tuple(int(k) for k in proposal_top_ks)
        for name in _STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self,
        preds: list[dict[str, Tensor]],
        targets: list[dict[str, Tensor]],
        proposals: list[Tensor] | None = None,
        meta: list[dict[str, Any]] | None = None,
    ) -> None:
        """Add a batch (an empty one is fine and keeps every rank's states in step).

        Args:
            preds: per image ``boxes`` (N, 4) xyxy, ``scores`` (N,), ``labels`` (N,) int64
                (volumes: (N, 6) xyzxyz voxels).
            targets: per image ``boxes`` (G, 4) xyxy, ``labels`` (G,) int64 (0-based classes).
            proposals: per image RPN proposals (P, 4), best first; omit to skip proposal recall.
            meta: per image the batch meta (``medrpn.data.batch``): ``spacing`` (row, col) mm or
                None, ``scale`` (network input / original), optional ``patient_id``. Volumes:
                ``spacing`` (x, y, z) mm per voxel along the box axes, and no ``scale``.
        """
        with _single_threaded():
            self._update(preds, targets, proposals, meta)

    def _update(
        self,
        preds: list[dict[str, Tensor]],
        targets: list[dict[str, Tensor]],
        proposals: list[Tensor] | None,
        meta: list[dict[str, Any]] | None,
    ) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets")
        if proposals is not None and len(proposals) != len(targets):
            raise ValueError(f"got {len(proposals)} proposal sets for {len(targets)} targets")
        if meta is not None and len(meta) != len(targets):
            raise ValueError(f"got {len(meta)} meta entries for {len(targets)} targets")
        dev = self.device
        n_img = len(targets)
        meta = meta if meta is not None else [{}] * n_img
        dims = self.spatial_dims
        width = 2 * dims
        # Units per network-input pixel or voxel along each box axis: original pixels, and
        # millimetres where the spacing is known. 2D spacing is (row, col), boxes are (x=col, y=row).
        px = torch.ones(n_img, dims)
        mm = torch.full((n_img, dims), math.nan)
        patients = []
        for i, m in enumerate(meta):
            scale = float(m.get("scale") or 1.0)
            px[i] = 1.0 / scale
            spacing = m.get("spacing")
            if spacing is not None:
                along_axes = [float(v) for v in spacing][::-1] if dims == 2 else [float(v) for v in spacing]
                mm[i] = torch.tensor(along_axes) / scale
            pid = m.get("patient_id")
            patients.append(patient_hash(pid) if pid not in (None, "") else -1)

        p_boxes = [p["boxes"].detach().float().reshape(-1, width).to(dev) for p in preds]
        t_boxes = [t["boxes"].detach().float().reshape(-1, width).to(dev) for t in targets]
        n_pred = torch.tensor([len(b) for b in p_boxes], dtype=torch.long)
        n_gt = torch.tensor([len(b) for b in t_boxes], dtype=torch.long)
        pb = torch.cat(p_boxes) if p_boxes else torch.zeros(0, width, device=dev)
        gb = torch.cat(t_boxes) if t_boxes else torch.zeros(0, width, device=dev)
        ps = torch.cat([p["scores"].detach().float().reshape(-1).to(dev) for p in preds]) if preds else torch.zeros(0, device=dev)
        pl = torch.cat([p["labels"].reshape(-1).long().to(dev) for p in preds]) if preds else torch.zeros(0, dtype=torch.long, device=dev)
        gl = torch.cat([t["labels"].reshape(-1).long().to(dev) for t in targets]) if targets else torch.zeros(0, dtype=torch.long, device=dev)
        p_img = torch.repeat_interleave(torch.arange(n_img), n_pred).to(dev)
        g_img = torch.repeat_interleave(torch.arange(n_img), n_gt).to(dev)

        # Match in millimetres where the spacing is known (LUNA16's distance is physical; IoU
        # does not change under scaling), one matrix for the whole batch, masked to same image.
        unit = torch.where(torch.isnan(mm), px, mm).to(dev)  # (n_img, dims) along the box axes
        to_unit = torch.cat([unit, unit], dim=1)
        same_image = p_img[:, None] == g_img[None, :]
        quality = hit_quality(pb * to_unit[p_img], gb * to_unit[g_img], self.froc_hit_rule)
        hits = hits_of_quality(quality, self.froc_hit_rule, self.froc_iou_threshold) & same_image
        hits_cls = hits & (pl[:, None] == gl[None, :])
        # IoU is unchanged by scaling each axis, so pixels do here
        iou = quality if self.froc_hit_rule == "iou" else hit_quality(pb, gb, "iou")
        hits50 = (iou >= 0.5) & same_image

        # lesion_size takes 2D units as (row, col)
        size_units = (lambda u: u.flip(1)) if dims == 2 else (lambda u: u)
        g_px = lesion_size(gb, size_units(px.to(dev))[g_img])
        g_mm = lesion_size(gb, size_units(mm.to(dev))[g_img])
        k = len(self.proposal_top_ks)
        if proposals is None:
            prop_iou = torch.full((len(gl), k), math.nan, device=dev)
        else:
            prop_iou = best_proposal_iou_batch(proposals, t_boxes, self.proposal_top_ks).to(dev)

        values = {
            "img_n_pred": n_pred,
            "img_n_gt": n_gt,
            "img_patient": torch.tensor(patients, dtype=torch.long),
            "pred_box": pb.flatten(),
            "pred_score": ps,
            "pred_label": pl,
            "pred_fp_any": ~hits.any(dim=1),
            "pred_fp_cls": ~hits_cls.any(dim=1),
            "pred_fp_iou50": ~hits50.any(dim=1),
            "gt_box": gb.flatten(),
            "gt_label": gl,
            "gt_best_any": best_hit_scores(credit_one_lesion_each(hits, ps, quality), ps),
            "gt_best_cls": best_hit_scores(credit_one_lesion_each(hits_cls, ps, quality), ps),
            "gt_best_iou50": best_hit_scores(credit_one_lesion_each(hits50, ps, iou), ps),
            "gt_size_px": g_px,
            "gt_size_mm": g_mm,
            "gt_proposal_iou": prop_iou.flatten(),
        }
        for name, dtype in _STATES.items():
            getattr(self, name).append(values[name].to(device=dev, dtype=dtype))

    def records(self) -> DetectionRecords:
        """The accumulated states (as gathered, under DDP inside ``report`` / ``compute``) as numpy arrays."""
        s = {name: _cat(getattr(self, name), dtype).cpu().numpy() for name, dtype in _STATES.items()}
        n_images = len(s["img_n_pred"])
        image_ids = np.arange(n_images)
        # Bootstrap unit: the patient when known, else the image itself.
        known = s["img_patient"] >= 0
        keys = np.where(known, s["img_patient"], -1 - image_ids)
        _, image_group = np.unique(keys, return_inverse=True)
        return DetectionRecords(
            image_group=image_group.reshape(-1).astype(np.int64),
            pred_image=np.repeat(image_ids, s["img_n_pred"]),
            pred_box=s["pred_box"].reshape(-1, 2 * self.spatial_dims),
            pred_score=s["pred_score"],
            pred_label=s["pred_label"],
            pred_fp_any=s["pred_fp_any"].astype(bool),
            pred_fp_cls=s["pred_fp_cls"].astype(bool),
            pred_fp_iou50=s["pred_fp_iou50"].astype(bool),
            gt_image=np.repeat(image_ids, s["img_n_gt"]),
            gt_box=s["gt_box"].reshape(-1, 2 * self.spatial_dims),
            gt_label=s["gt_label"],
            gt_best_any=s["gt_best_any"],
            gt_best_cls=s["gt_best_cls"],
            gt_best_iou50=s["gt_best_iou50"],
            gt_size_px=s["gt_size_px"],
            gt_size_mm=s["gt_size_mm"],
            gt_proposal_iou=s["gt_proposal_iou"].reshape(-1, len(self.proposal_top_ks)),
        )

    def _class_names(self, records: DetectionRecords) -> list[str]:
        if self.class_names is not None:
            return self.class_names
        labels = np.concatenate([records.pred_label, records.gt_label])
        return [f"class{k}" for k in range(int(labels.max()) + 1 if labels.size else 1)]

    def report(
        self,
        n_bootstrap: int = 0,
        confidence: float = 0.95,
        seed: int = 0,
        target_fp_per_image: float | None = None,
        score_threshold: float | None = None,
    ) -> EvaluationReport:
        """Every figure over the images seen so far (all ranks' under DDP).

        Args:
            n_bootstrap: bootstrap resamples of patients for intervals (0: none; 1000 is usual).
            confidence, seed: of the bootstrap.
            target_fp_per_image: pick the operating point for this FP budget, or
            score_threshold: report the FP rate and sensitivity at this given threshold.
        """
        with self.sync_context(dist_sync_fn=self.dist_sync_fn, should_sync=self._to_sync, should_unsync=self._should_unsync):
            records = self.records()
        with _single_threaded():
            return evaluate_records(
                records,
                self._class_names(records),
                hit_rule=self.froc_hit_rule,
                iou_threshold=self.froc_iou_threshold,
                n_bootstrap=n_bootstrap,
                confidence=confidence,
                seed=seed,
                target_fp_per_image=target_fp_per_image,
                score_threshold=score_threshold,
                proposal_top_ks=self.proposal_top_ks,
            )

    def compute(self) -> dict[str, Tensor]:
        """The scalars as 0-d float tensors (nan where there is nothing to measure)."""
        records = self.records()  # torchmetrics has already gathered the states across ranks
        with _single_threaded():
            report = evaluate_records(
                records,
                self._class_names(records),
                hit_rule=self.froc_hit_rule,
                iou_threshold=self.froc_iou_threshold,
                proposal_top_ks=self.proposal_top_ks,
            )
        return {k: torch.tensor(v, dtype=torch.float32, device=self.device) for k, v in report.scalars.items()}

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Accumulate only: a per-batch FROC is meaningless."""
        self.update(*args, **kwargs)


@contextmanager
def _single_threaded() -> Iterator[None]:
    """Runs CPU tensor work on one thread. The metrics do many short operations, where intra-op
    threads cost more than they give: on a busy 2-core machine, 8 instead of 35-110 ms per batch
    of 16 images, and half the time for the figures of 5,000 images."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _cat(state: list[Tensor] | Tensor, dtype: torch.dtype) -> Tensor:
    """A cat-reduced state as one flat tensor of ``dtype`` (empty when nothing was added)."""
    if isinstance(state, Tensor):
        return state.flatten().to(dtype)
    if not state:
        return torch.empty(0, dtype=dtype)
    return dim_zero_cat(state).flatten().to(dtype)
