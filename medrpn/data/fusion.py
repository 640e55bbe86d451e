"""Fusing the boxes of several readers (radiologists) of one image into one ground truth.

VinDr-CXR has three radiologists per training image, each drawing their own boxes: the same
lesion arrives as up to three slightly different boxes, and a finding one reader saw may be
missed by the others. Training on all of them teaches duplicates; the rule used here is IoU
clustering with a minimum number of readers (weighted box fusion with equal weights):

1. Per image and class, boxes are visited in a fixed order (reader id, then coordinates).
2. A box joins the cluster it overlaps most (mean IoU with the cluster's boxes, "average
   linkage"), if that mean IoU is at least `iou_threshold` and the cluster has no box of the
   same reader yet (one reader cannot confirm their own finding); otherwise it starts a new cluster.
3. The fused box of a cluster is the mean of its boxes' coordinates (equal weights).
4. Clusters drawn by at least `min_readers` different readers are kept; the rest are dropped.

`min_readers: 1` keeps every finding (union); with `iou_threshold` above 1 nothing merges and
every reader box is kept as drawn.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchvision.ops import box_iou

from medrpn.errors import ConfigError


@dataclass
class FusionConfig:
    """The fusion rule's settings (see the module docstring).

    Attributes:
        iou_threshold: least IoU between a box and a cluster's fused box for the box to join it.
        min_readers: least number of different readers a fused box needs to be kept.
    """

    iou_threshold: float = 0.4
    min_readers: int = 2

    def __post_init__(self) -> None:
        if self.iou_threshold <= 0:
            raise ConfigError(f"data.fusion.iou_threshold must be > 0, got {self.iou_threshold}")
        if self.min_readers < 1:
            raise ConfigError(f"data.fusion.min_readers must be >= 1, got {self.min_readers}")


def fuse_readers(
    boxes: np.ndarray, labels: np.ndarray, readers: list[str], config: FusionConfig = FusionConfig()
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fuse one image's reader boxes.

    Args:
        boxes: (N, 4) xyxy boxes of all readers.
        labels: (N,) class of each box.
        readers: (N,) reader id of each box.
        config: the rule's settings.

    Returns:
        fused boxes (M, 4) float32, their labels (M,) int64, and the number of readers behind
        each (M,) int64; ordered by class, then by first appearance.
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    out_boxes, out_labels, out_support = [], [], []
    if len(boxes):
        iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy()  # one call per image
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        clusters: list[list[int]] = []
        for i in sorted(index, key=lambda i: (readers[i], *boxes[i])):
            best, best_iou = -1, config.iou_threshold
            for c, members in enumerate(clusters):
                if readers[i] in {readers[m] for m in members}:
                    continue
                mean_iou = float(iou[i, members].mean())
                if mean_iou >= best_iou and (best < 0 or mean_iou > best_iou):
                    best, best_iou = c, mean_iou
            if best < 0:
                clusters.append([i])
            else:
                clusters[best].append(i)
        for members in clusters:
            support = len({readers[m] for m in members})
            if support >= config.min_readers:
                out_boxes.append(boxes[members].mean(axis=0))
                out_labels.append(label)
                out_support.append(support)
    return (
        np.array(out_boxes, dtype=np.float32).reshape(-1, 4),
        np.array(out_labels, dtype=np.int64),
        np.array(out_support, dtype=np.int64),
    )
