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
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.ops import nms

FLIP_DIMS = {"horizontal": -1, "vertical": -2}  # the image dimension each flip reverses


def flip_images(images: Tensor, flip: str) -> Tensor:
    """`images` (B, C, H, W) mirrored left-right ("horizontal") or top-bottom ("vertical")."""
    return images.flip(FLIP_DIMS[flip])


def unflip_boxes(boxes: Tensor, flip: str, height: int, width: int) -> Tensor:
    """xyxy `boxes` found in the flipped image, in the original image's coordinates."""
    out = boxes.clone()
    if flip == "horizontal":
        out[:, 0], out[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    else:
        out[:, 1], out[:, 3] = height - boxes[:, 3], height - boxes[:, 1]
    return out


def merge_proposals(
    views: Sequence[tuple[Tensor, Tensor]], nms_thresh: float, top_n: int
) -> tuple[Tensor, Tensor]:
    """One image's proposals from several views (each (boxes (P, 4), scores (P,)), in original
    coordinates), de-duplicated by NMS across views and levels; best first, at most `top_n`."""
    boxes = torch.cat([b for b, _ in views])
    scores = torch.cat([s for _, s in views])
    keep = nms(boxes, scores, nms_thresh)[:top_n]
    return boxes[keep], scores[keep]
