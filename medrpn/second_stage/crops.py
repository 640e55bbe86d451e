"""Image patches around boxes, with a context margin, all resized to one fixed size.

A second-stage classifier sees each candidate the way a radiologist zooms in on it: a square
window centred on the box, larger than the box by a margin on every side (the surroundings tell a
lesion from a rib crossing or a vessel), resampled to `crop_size` x `crop_size` whatever the
box's size. Boxes are absolute pixel xyxy (pixel i spans [i, i + 1)); RoI Align with
``aligned=True`` samples in that convention, so the crop of a box centred on pixel (r, c) has
pixel (r, c) at its centre. Parts of the window outside the image read as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import roi_align


def context_boxes(boxes: Tensor, margin: float = 0.5, min_side: float = 16.0) -> Tensor:
    """Square windows around ``boxes``: same centre, side = longest box side x (1 + 2 x margin),
    at least ``min_side`` pixels.

    Args:
        boxes: (N, 4) absolute pixel xyxy.
        margin: context added on each side, as a fraction of the box's longest side.
        min_side: smallest window side in pixels (tiny boxes still get some surroundings).
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    boxes = boxes.float().reshape(-1, 4)
    centre_x = (boxes[:, 0] + boxes[:, 2]) / 2
    centre_y = (boxes[:, 1] + boxes[:, 3]) / 2
    side = torch.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) * (1 + 2 * margin)
    half = side.clamp(min=min_side) / 2
    return torch.stack([centre_x - half, centre_y - half, centre_x + half, centre_y + half], dim=1)


def crop_patches(
    images: Tensor, boxes: list[Tensor], crop_size: int = 48, margin: float = 0.5, min_side: float = 16.0
) -> Tensor:
    """The context window of every box, resized to ``crop_size`` (RoI Align, bilinear, averaged
    over the samples falling in each output pixel so large windows are not aliased).

    Args:
        images: (B, C, H, W).
        boxes: per image (N_i, 4) absolute pixel xyxy in that image.
        crop_size, margin, min_side: output side and window (see `context_boxes`).

    Returns:
        (sum N_i, C, crop_size, crop_size), image by image in the order of ``boxes``.
    """
    if images.dim() != 4 or len(boxes) != len(images):
        raise ValueError(f"need (B, C, H, W) images and one box tensor per image, got {tuple(images.shape)} and {len(boxes)}")
    windows = [context_boxes(b, margin, min_side).to(images) for b in boxes]
    if sum(len(w) for w in windows) == 0:
        return images.new_zeros((0, images.shape[1], crop_size, crop_size))
    return roi_align(images, windows, output_size=crop_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
