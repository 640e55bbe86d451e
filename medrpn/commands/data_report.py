"""What `check-data` says about boxes, for images and volumes alike: duplicated boxes and the
spread of a size, in one place."""

from __future__ import annotations

import numpy as np
import torch

from medrpn.data.records import Record

DUPLICATE_IOU = 0.95
NO_VALIDATION_NOTE = (
    "validation    none, as asked (val_fraction 0 or a split file without val): fit trains the set "
    "epochs, then tests and keeps the last weights; no best epoch, no operating point"
)


def pairwise_iou(boxes: np.ndarray) -> np.ndarray:
    """(N, N) IoU of a record's boxes: torchvision's for xyxy, MONAI's for xyzxyz."""
    tensor = torch.as_tensor(boxes, dtype=torch.float64)
    if boxes.shape[1] == 4:
        from torchvision.ops import box_iou
    else:
        from monai.data.box_utils import box_iou
    return box_iou(tensor, tensor).numpy()


def count_duplicates(record: Record) -> int:
    """Boxes of a record that repeat an earlier box of the same class (IoU >= 0.95)."""
    if len(record.boxes) < 2:
        return 0
    iou = pairwise_iou(record.boxes)
    same = record.labels[:, None] == record.labels[None, :]
    earlier = np.tril(np.ones_like(iou, dtype=bool), k=-1)
    return int(np.any((iou >= DUPLICATE_IOU) & same & earlier, axis=1).sum())


def quantiles(values: np.ndarray, unit: str) -> str:
    """min, 5%, median, 95% and max of `values`, in `unit`; "n/a" when there are none."""
    if len(values) == 0:
        return "n/a"
    q = np.percentile(values, [0, 5, 50, 95, 100])
    return f"min {q[0]:.1f}, 5% {q[1]:.1f}, median {q[2]:.1f}, 95% {q[3]:.1f}, max {q[4]:.1f} {unit}"
