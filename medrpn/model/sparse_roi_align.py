"""Multi-scale RoI Align whose training pass on the CPU is one sparse matrix product.

torchvision's CPU `roi_align` backward scatters every sample's gradient into the feature maps one
RoI at a time, in one thread: in a training step of the brain recipe (128 RoIs per image, batch 8,
256 px, 2 threads) it took 17% of the step, as much as the forward passes of all convolutions. RoI Align is linear in the features, and its bilinear samples lie on a grid
per RoI, so every bin's value is a fixed weighted sum of feature-map pixels: the pooling of all
RoIs from all pyramid levels is one sparse matrix S (RoI bins x pyramid pixels) times the features
(pixels x channels), and its backward is S^T times the gradient, both run by torch's sparse kernels
on all threads (3.5x faster forward and backward together here, `bench/roi_align_speed.py`).

The weights are torchvision's RoI Align with `aligned=False` (what `MultiScaleRoIAlign` uses),
sample for sample: bins of `size / output_size`, `sampling_ratio` samples per bin and axis at bin
fractions (i + 0.5) / sampling_ratio, boxes at least one feature pixel wide, samples beyond one
pixel outside the map reading zero, others clamped to the border. Each bilinear weight is the product
of a weight along y and one along x, so a bin's weights are the outer product of two short vectors.

Inference, other devices and dtypes, and adaptive sampling (`sampling_ratio <= 0`) use
torchvision's own kernels, so predictions are torchvision's. The levels and scales come from
torchvision's own (private) `_setup_scales`, so that training and inference assign boxes to levels
alike; tests/test_sparse_roi_align.py compares both passes with torchvision's.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.poolers import _filter_input, _setup_scales


class SparseMultiScaleRoIAlign(MultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign` (same arguments, levels and outputs); when gradients
    flow into float32 CPU features it pools through one sparse matrix product (module docstring)."""

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if not _sparse_applies(features, self.sampling_ratio):
            return super().forward(x, boxes, image_shapes)
        if self.scales is None or self.map_levels is None:  # as torchvision sets them, on first use
            self.scales, self.map_levels = _setup_scales(features, image_shapes, self.canonical_scale, self.canonical_level)
        levels = self.map_levels(boxes) if len(features) > 1 else torch.zeros(sum(len(b) for b in boxes), dtype=torch.int64)
        return pool_sparse(features, boxes, levels, self.scales, _pair(self.output_size), self.sampling_ratio)


def _sparse_applies(features: list[Tensor], sampling_ratio: int) -> bool:
    return (
        torch.is_grad_enabled()
        and sampling_ratio > 0
        and any(f.requires_grad for f in features)
        and all(f.device.type == "cpu" and f.dtype == torch.float32 for f in features)
    )


def _pair(size: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    return (int(size[0]), int(size[0])) if len(size) == 1 else (int(size[0]), int(size[1]))


def pool_sparse(
    features: list[Tensor],
    boxes: list[Tensor],
    levels: Tensor,
    scales: list[float],
    output_size: tuple[int, int],
    sampling_ratio: int,
) -> Tensor:
    """RoI Align (torchvision's, `aligned=False`) of every box from the level `levels` names.

    Args:
        features: one (N, C, H_l, W_l) map per pyramid level.
        boxes: one (K_n, 4) xyxy tensor per image, in input pixels.
        levels: (sum K_n,) the level of each box, in batch order.
        scales: feature pixels per input pixel, per level.
        output_size: bins along y and x.
        sampling_ratio: samples per bin along each axis (at least 1).

    Returns:
        (sum K_n, C, *output_size), boxes in batch order.
    """
    batch, channels = features[0].shape[:2]
    out_h, out_w = output_size
    rois = torch.cat(boxes).to(torch.float32)
    count = len(rois)
    if count == 0:
        return features[0].new_zeros(0, channels, out_h, out_w)
    image = torch.repeat_interleave(torch.arange(len(boxes)), torch.tensor([len(b) for b in boxes]))
    heights = torch.tensor([f.shape[2] for f in features])[levels]
    widths = torch.tensor([f.shape[3] for f in features])[levels]
    scale = torch.tensor(scales, dtype=torch.float32)[levels]
    offsets = torch.cumsum(torch.tensor([0] + [f[0, 0].numel() * batch for f in features[:-1]]), 0)[levels]

    x1, y1 = rois[:, 0] * scale, rois[:, 1] * scale
    width = (rois[:, 2] * scale - x1).clamp(min=1.0)
    height = (rois[:, 3] * scale - y1).clamp(min=1.0)
    rows, weight_y = _axis_windows(y1, height, heights, out_h, sampling_ratio)  # (K, out_h, My)
    cols, weight_x = _axis_windows(x1, width, widths, out_w, sampling_ratio)  # (K, out_w, Mx)

    # Weight of pixel (row, col) in bin (by, bx) of box k: weight_y * weight_x. Laid out by
    # (k, by, bx, row, col), entries are sorted by the matrix row (the bin) and within it by
    # pixel, so the matrix is built coalesced, without sorting.
    values = weight_y[:, :, None, :, None] * weight_x[:, None, :, None, :]  # (K, out_h, out_w, My, Mx)
    base = offsets + image * heights * widths
    pixel = base[:, None, None, None, None] + rows[:, :, None, :, None] * widths[:, None, None, None, None] + cols[:, None, :, None, :]
    keep = values.reshape(-1).nonzero().squeeze(1)  # entry (k, by, bx, a, b), flat
    total = sum(f.numel() // channels for f in features)
    matrix = torch.sparse_coo_tensor(
        torch.stack([keep // values[0, 0, 0].numel(), pixel.expand_as(values).reshape(-1)[keep]]),
        values.reshape(-1)[keep],
        (count * out_h * out_w, total),
        is_coalesced=True,
        check_invariants=False,
    )
    pixels = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, channels) for f in features])  # (pixels, C)
    pooled = torch.sparse.mm(matrix, pixels)  # (K * bins, C)
    return pooled.reshape(count, out_h, out_w, channels).permute(0, 3, 1, 2).contiguous()


def _axis_windows(start: Tensor, length: Tensor, size: Tensor, bins: int, sampling_ratio: int) -> tuple[Tensor, Tensor]:
    """Along one axis, the feature rows (or columns) each bin of each box reads and their weights:
    (K, bins, M) indices, ascending, and weights, zero where a bin reads fewer than M."""
    weights = _axis_weights(start, length, size, bins, sampling_ratio)  # (K, bins, max size)
    read = weights != 0
    first = torch.where(read.any(2), read.float().argmax(2), torch.zeros((), dtype=torch.int64))
    span = torch.where(read.any(2), read.shape[2] - read.flip(2).float().argmax(2) - first, 0)  # last read + 1 - first
    window = int(span.max()) if read.any() else 1
    index = first[..., None] + torch.arange(window)
    inside = index < weights.shape[2]
    index = torch.where(inside, index, torch.zeros_like(index))
    return index, torch.where(inside, weights.gather(2, index), torch.zeros((), dtype=weights.dtype))


def _axis_weights(start: Tensor, length: Tensor, size: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    """(K, bins, max size) weights of the feature rows (or columns) each bin averages along one axis:
    the mean over the bin's samples of their linear-interpolation weights, torchvision's rules."""
    step = length / bins
    sample = torch.arange(bins * sampling_ratio, dtype=start.dtype)
    position = (
        start[:, None]
        + (sample // sampling_ratio)[None] * step[:, None]
        + ((sample % sampling_ratio) + 0.5)[None] * (step / sampling_ratio)[:, None]
    )  # (K, bins * sampling_ratio)
    last = (size - 1).to(start.dtype)[:, None]
    inside = ((position >= -1.0) & (position <= size[:, None])).to(start.dtype)  # else the sample reads zero
    position = position.clamp(min=0)
    low = torch.minimum(position.floor(), last)
    high = torch.minimum(low + 1, last)
    fraction = torch.where(low >= last, torch.zeros_like(position), position - low)
    weights = torch.zeros(len(start), bins * sampling_ratio, int(size.max()), dtype=start.dtype)
    weights.scatter_add_(2, low.long()[..., None], ((1 - fraction) * inside)[..., None])
    weights.scatter_add_(2, high.long()[..., None], (fraction * inside)[..., None])
    return weights.reshape(len(start), bins, sampling_ratio, -1).mean(2)
