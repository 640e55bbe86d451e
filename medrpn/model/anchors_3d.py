"""3D anchors: MONAI's anchor shapes, each placed at the centre of its feature cell.

MONAI's `AnchorGenerator` makes the anchor shapes of every level (sizes x (h/w, d/w) aspect
ratios, `cell_anchors`) and the strides; where it places them changed between its versions: at
the cell's corner, i x stride, up to 1.4, and at i x stride + stride // 2 from 1.6 (an integer
half, so none for a stride of 1). medrpn places them itself at (i + 0.5) x stride, the cell's
centre in voxel-edge coordinates (`medrpn.data.volume`), so a model is the same whatever MONAI
version is installed (found when the tests ran on MONAI 1.3).
"""

from __future__ import annotations

import torch
from monai.apps.detection.utils.anchor_utils import AnchorGenerator
from torch import Tensor


class CellCentredAnchors(AnchorGenerator):
    """MONAI's `AnchorGenerator` (3D, "ij" indexing) with anchors at the centres of their cells."""

    def grid_anchors(self, grid_sizes: list[list[int]], strides: list[list[Tensor]]) -> list[Tensor]:
        anchors = []
        for size, stride, base in zip(grid_sizes, strides, self.cell_anchors):
            centres = [
                (torch.arange(size[axis], dtype=base.dtype, device=base.device) + 0.5) * stride[axis].to(base.dtype)
                for axis in range(self.spatial_dims)
            ]
            grid = torch.meshgrid(*centres, indexing="ij")
            shifts = torch.stack([g.reshape(-1) for g in grid] * 2, dim=1)
            anchors.append((shifts[:, None, :] + base[None, :, :]).reshape(-1, 2 * self.spatial_dims))
        return anchors
