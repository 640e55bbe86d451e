"""Test-time flips for the RPN: proposals from mirrored copies of the image, merged by NMS.

A lesion the RPN boxes badly in one view may be boxed well in the mirrored one (the anchors and
the receptive fields fall differently on it), so the union of the views' proposals can hold more
lesions at IoU >= 0.5; but the views' proposals also compete for the same `post_nms_top_n`
places. Measured on the brain tumour set (docs/rpn_ablation.md): six more of 355 tumours in the
best 100 for one checkpoint, one fewer (and a higher CPM) for a stronger one. nnDetection
mirrors every test image along each axis (its default test-time augmentation); here only the
proposals are merged, so the cost is one more backbone and RPN pass per flip.

Merging: each view's proposals are mapped back to the original image, pooled with the original
view's, and de-duplicated by class-agnostic NMS at the RPN's own threshold, keeping the best
`post_nms_top_n`. That NMS also spans pyramid levels, which torchvision's per-level NMS does not.

Images flip "horizontal" (left-right) or "vertical" (top-bottom); volumes (B, C, X, Y, Z) flip
along "x", "y" or "z", their array axes (LPS: right-left, anterior-posterior, inferior-superior),
window by window in sliding-window inference, merged by MONAI's 3D NMS.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import nms

# each flip: (the tensor dimension it reverses, the box axis it mirrors)
FLIP_DIMS = {"horizontal": (-1, 0), "vertical": (-2, 1)}  # images (B, C, H, W), boxes xyxy
VOLUME_FLIP_DIMS = {"x": (-3, 0), "y": (-2, 1), "z": (-1, 2)}  # volumes (B, C, X, Y, Z), boxes xyzxyz
_ALL_FLIPS = {**FLIP_DIMS, **VOLUME_FLIP_DIMS}


def flip_images(images: Tensor, flip: str) -> Tensor:
    """`images` (B, C, H, W) mirrored left-right ("horizontal") or top-bottom ("vertical"), or
    volumes (B, C, X, Y, Z) along "x", "y" or "z"."""
    return images.flip(_ALL_FLIPS[flip][0])


def unflip_boxes(boxes: Tensor, flip: str, size: Sequence[int]) -> Tensor:
    """Boxes (xyxy, or xyzxyz for volumes) found in the flipped image of spatial `size` (H, W or
    X, Y, Z: the image tensor's last dimensions), in the original image's coordinates."""
    dim, axis = _ALL_FLIPS[flip]
    extent = size[dim]
    half = boxes.shape[1] // 2
    out = boxes.clone()
    out[:, axis], out[:, axis + half] = extent - boxes[:, axis + half], extent - boxes[:, axis]
    return out


def merge_proposals(
    views: Sequence[tuple[Tensor, Tensor]], nms_thresh: float, top_n: int
) -> tuple[Tensor, Tensor]:
    """One image's proposals from several views (each (boxes (P, 4) or (P, 6), scores (P,)), in
    original coordinates), de-duplicated by NMS across views and levels; best first, at most `top_n`."""
    boxes = torch.cat([b for b, _ in views])
    scores = torch.cat([s for _, s in views])
    if boxes.shape[1] == 4:
        keep = nms(boxes, scores, nms_thresh)[:top_n]
    else:  # volumes: MONAI's 3D NMS (`medrpn.model.nms_3d`; imported here: MONAI's import costs seconds)
        from medrpn.model.nms_3d import batched_nms_3d

        keep = batched_nms_3d(boxes, scores, torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device), nms_thresh)[:top_n]
    return boxes[keep], scores[keep]
