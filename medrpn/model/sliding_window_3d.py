"""Detection on whole scans, window by window: memory stays bounded by the window, not the scan.

A 512 x 512 x 400 CT does not fit a 3D detector at once; nnDetection and MONAI's RetinaNet run
overlapping patches. Here the detector runs on windows of `window` voxels that overlap by
`overlap` of a window along each axis (the last window of an axis ends at the scan's border), and
the findings are merged in scan coordinates:

1. A finding that touches a window's *inner* border (a side that is not the scan's own border),
   within `border_margin` voxels, is dropped: that lesion was cut by the window, and a window that
   overlaps this one by more than the lesion's size sees it whole.
2. Findings of one class from different windows that overlap by more than `merge_iou` (3D IoU)
   are one finding: the best-scoring one is kept (NMS, MONAI's).

So a lesion cut by one window's border is found once, from the window that holds it whole, as
long as the overlap (in voxels) is at least the lesion's size plus the margin; `windows` gives the
positions, for tests and for choosing the overlap.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
from torch import Tensor

Detections = dict[str, Tensor]


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Start positions along one axis: steps of window x (1 - overlap), the last flush with the end."""
    if window >= size:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window, step))
    return starts + [size - window]


def windows(shape: tuple[int, int, int], window: tuple[int, int, int], overlap: float) -> list[tuple[int, int, int]]:
    """The start corner of every window over a scan of `shape`."""
    return list(itertools.product(*[window_starts(s, w, overlap) for s, w in zip(shape, window)]))


def detect_by_windows(
    detect: Callable[[Tensor], Detections],
    volume: Tensor,
    window: tuple[int, int, int],
    overlap: float = 0.5,
    border_margin: float = 1.0,
    merge_iou: float = 0.5,
    proposal_merge_iou: float = 0.7,
) -> Detections:
    """Findings on a whole scan from a detector that runs on windows.

    Args:
        detect: maps a (C, wx, wy, wz) window to its findings {"boxes" (N, 6) in window voxels,
            "scores" (N,), "labels" (N,)}, and optionally its RPN proposals {"proposals" (P, 6),
            "proposal_scores" (P,)}, merged the same way (one class) when given.
        volume: (C, X, Y, Z) the whole scan.
        window: window size per axis (clipped to the scan).
        overlap: share of a window that neighbouring windows share, in [0, 1).
        border_margin: a finding within this many voxels of an inner window border is dropped.
        merge_iou: findings of one class overlapping more than this are merged (NMS).
        proposal_merge_iou: the same for proposals (the RPN's own NMS IoU is the natural choice).

    Returns:
        The merged findings in scan voxels, best score first (and "proposals", "proposal_scores",
        best first, when `detect` gives them).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    shape = tuple(int(n) for n in volume.shape[1:])
    size = tuple(min(w, s) for w, s in zip(window, shape))
    found_parts: list[tuple[Tensor, Tensor, Tensor]] = []
    proposal_parts: list[tuple[Tensor, Tensor, Tensor]] = []
    for start in windows(shape, size, overlap):
        crop = volume[:, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]]
        found = detect(crop)
        found_parts.append(_in_scan(found["boxes"], found["scores"], found["labels"], start, size, shape, border_margin))
        if "proposals" in found:
            boxes = found["proposals"]
            labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            proposal_parts.append(_in_scan(boxes, found["proposal_scores"], labels, start, size, shape, border_margin))
    boxes, scores, labels = _merge(found_parts, merge_iou)
    merged = {"boxes": boxes, "scores": scores, "labels": labels}
    if proposal_parts:
        merged["proposals"], merged["proposal_scores"], _ = _merge(proposal_parts, proposal_merge_iou)
    return merged


def _in_scan(
    boxes: Tensor, scores: Tensor, labels: Tensor, start: tuple[int, ...], size: tuple[int, ...], shape: tuple[int, ...],
    border_margin: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """A window's boxes in scan voxels, less those touching one of its inner borders."""
    keep = torch.ones(len(boxes), dtype=torch.bool, device=boxes.device)
    for axis in range(3):
        if start[axis] > 0:  # the window's low side is inside the scan
            keep &= boxes[:, axis] > border_margin
        if start[axis] + size[axis] < shape[axis]:  # its high side is inside the scan
            keep &= boxes[:, axis + 3] < size[axis] - border_margin
    offset = torch.tensor([*start, *start], dtype=boxes.dtype, device=boxes.device)
    return boxes[keep] + offset, scores[keep], labels[keep]


def _merge(parts: list[tuple[Tensor, Tensor, Tensor]], iou: float) -> tuple[Tensor, Tensor, Tensor]:
    """One set from the windows' sets: per class NMS (MONAI's, `medrpn.model.nms_3d`) at `iou`, best score first."""
    from medrpn.model.nms_3d import (
        batched_nms_3d,  # imports MONAI: seconds, only for volumes
    )

    boxes = torch.cat([p[0] for p in parts]).reshape(-1, 6)
    scores = torch.cat([p[1] for p in parts])
    labels = torch.cat([p[2] for p in parts])
    if len(boxes) == 0:
        return boxes, scores, labels
    keep = batched_nms_3d(boxes, scores, labels, iou)
    keep = keep[scores[keep].argsort(descending=True)]
    return boxes[keep], scores[keep], labels[keep]
