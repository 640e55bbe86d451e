"""RoI Align for volumes: a fixed grid of trilinear samples from each 3D box.

torchvision's `roi_align` is 2D only and MONAI has none, so this is written here with
`torch.nn.functional.grid_sample` (trilinear on 5D input): each output bin averages
`sampling_ratio`^3 regularly spaced samples, exactly as torchvision's aligned RoI Align does in 2D
(Mask R-CNN, He et al. 2017; `aligned=True`: a box edge at voxel coordinate c samples from
feature index c * scale - 0.5, so a box that covers whole voxels pools those voxels' centres).

Conventions are medrpn's for volumes (`medrpn.data.volume`): features (N, C, X, Y, Z), boxes
(K, 6) xyzxyz with edges at integers in input voxels. Samples outside the feature map read zero
(grid_sample's zero padding); torchvision clamps samples within one voxel of the border instead,
a difference only at the outermost half voxel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def roi_align_3d(
    features: Tensor,
    boxes: list[Tensor],
    output_size: tuple[int, int, int],
    spatial_scale: float | tuple[float, float, float] = 1.0,
    sampling_ratio: int = 2,
) -> Tensor:
    """Pool each box of each volume into a (C, *output_size) grid.

    Args:
        features: (N, C, X, Y, Z) feature volumes.
        boxes: one (K_n, 6) tensor of input-voxel boxes per volume of the batch.
        output_size: bins along x, y, z.
        spatial_scale: feature voxels per input voxel (1 / stride), one or per axis.
        sampling_ratio: samples per bin along each axis (at least 1).

    Returns:
        (sum K_n, C, *output_size), boxes in batch order.
    """
    if features.dim() != 5:
        raise ValueError(f"features must be (N, C, X, Y, Z), got shape {tuple(features.shape)}")
    if len(boxes) != features.shape[0]:
        raise ValueError(f"{len(boxes)} box tensors for a batch of {features.shape[0]} volumes")
    if sampling_ratio < 1:
        raise ValueError(f"sampling_ratio must be at least 1, got {sampling_ratio}")
    scale = torch.as_tensor(
        spatial_scale if isinstance(spatial_scale, (tuple, list)) else (spatial_scale,) * 3, dtype=features.dtype, device=features.device
    )
    size = torch.as_tensor(features.shape[2:], dtype=features.dtype, device=features.device)
    out = torch.as_tensor(output_size, dtype=features.dtype, device=features.device)
    pooled = []
    for n, volume_boxes in enumerate(boxes):
        if len(volume_boxes) == 0:
            continue
        volume_boxes = volume_boxes.to(features.dtype)
        lo = volume_boxes[:, :3] * scale - 0.5  # feature index space, voxel centres at integers
        extent = (volume_boxes[:, 3:] - volume_boxes[:, :3]) * scale
        axes = []
        for axis in range(3):
            steps = int(output_size[axis]) * sampling_ratio
            fraction = (torch.arange(steps, dtype=features.dtype, device=features.device) + 0.5) / steps
            position = lo[:, axis : axis + 1] + fraction[None] * extent[:, axis : axis + 1]  # (K, steps)
            axes.append((2 * position + 1) / size[axis] - 1)  # grid_sample's align_corners=False normalisation
        k = len(volume_boxes)
        sx, sy, sz = (a.shape[1] for a in axes)
        gx = axes[0][:, :, None, None].expand(-1, -1, sy, sz)
        gy = axes[1][:, None, :, None].expand(-1, sx, -1, sz)
        gz = axes[2][:, None, None, :].expand(-1, sx, sy, -1)
        grid = torch.stack([gz, gy, gx], dim=-1).reshape(1, k * sx, sy, sz, 3)  # grid_sample's (W, H, D) = (z, y, x) order
        samples = F.grid_sample(features[n : n + 1], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        samples = samples.view(features.shape[1], k, sx, sy, sz).transpose(0, 1)
        pooled.append(F.avg_pool3d(samples, kernel_size=sampling_ratio) if sampling_ratio > 1 else samples)
    if not pooled:
        return features.new_zeros((0, features.shape[1], *[int(v) for v in out.tolist()]))
    return torch.cat(pooled)
