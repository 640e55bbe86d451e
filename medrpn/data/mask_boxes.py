"""Lesion masks turned into boxes, so that a segmentation dataset becomes a detection dataset.

The rule, the same for 2D and 3D masks:
- A lesion is a connected component of voxels of one non-zero mask value. Voxels are connected
  when they share a face (`connectivity` 1, scipy's default and the count reported for the MS
  data in shared/data); 2 adds edges, 3 (in 3D) corners.
- The lesion's class is its mask value minus 1 (a binary mask: class 0).
- A component of fewer than `min_voxels` voxels is dropped: specks of a few voxels are below
  what a reader marks and what the raters agree on.
- Confluent lesions, joined into one component, stay one box: the mask gives no line between
  them, and a reader would mark one confluent region.

Boxes use medrpn's conventions, edges at integers: a component over voxels i0..i1 gives
x1 = i0, x2 = i1 + 1. A 3D mask is indexed (x, y, z) like a `medrpn.data.volume.Volume`; a 2D
mask (rows, columns) like a 2D image, so x runs along its columns.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medrpn.errors import ConfigError


@dataclass
class MaskConfig:
    """How a dataset's lesion masks become boxes (`data.masks`; see the module docstring).

    Attributes:
        min_voxels: components smaller than this are not lesions (1 keeps every voxel; the MS
            data in shared/data counts components of >= 10 voxels of 1 mm, about a 2 mm cube).
        connectivity: 1 (faces), 2 (and edges) or 3 (and corners) in 3D.
    """

    min_voxels: int = 1
    connectivity: int = 1

    def __post_init__(self) -> None:
        if self.min_voxels < 1:
            raise ConfigError(f"data.masks.min_voxels must be at least 1, got {self.min_voxels}")
        if not 1 <= self.connectivity <= 3:
            raise ConfigError(f"data.masks.connectivity must be 1, 2 or 3, got {self.connectivity}")


@dataclass
class MaskBoxes:
    """Lesions found in one mask.

    Attributes:
        boxes: (N, 2 * D) float32, edges in voxels (x1, y1[, z1], x2, y2[, z2]) along the mask's axes.
        labels: (N,) int64 class indices (mask value - 1).
        voxels: (N,) int64 size of each lesion in voxels.
        dropped: components left out for being smaller than `min_voxels`.
    """

    boxes: np.ndarray
    labels: np.ndarray
    voxels: np.ndarray
    dropped: int


def boxes_from_mask(mask: np.ndarray, min_voxels: int = 1, connectivity: int = 1) -> MaskBoxes:
    """The lesions of an integer mask (2D or 3D) as boxes, by the module's rule."""
    mask = np.asarray(mask)
    if mask.ndim not in (2, 3):
        raise ConfigError(f"a lesion mask must be 2D or 3D, got shape {mask.shape}")
    if not 1 <= connectivity <= mask.ndim:
        raise ConfigError(f"mask connectivity must be 1..{mask.ndim} for a {mask.ndim}D mask, got {connectivity}")
    if min_voxels < 1:
        raise ConfigError(f"min_voxels must be at least 1, got {min_voxels}")
    if mask.dtype.kind == "f":
        if not np.isfinite(mask).all() or (mask != np.round(mask)).any():
            raise ConfigError("a lesion mask holds non-integer values (a probability map?): threshold it first")
        mask = mask.astype(np.int64)
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    boxes, labels, voxels, dropped = [], [], [], 0
    for value in np.unique(mask[mask != 0]):
        components, count = ndimage.label(mask == value, structure=structure)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        for index, where in enumerate(ndimage.find_objects(components)):
            if sizes[index] < min_voxels:
                dropped += 1
                continue
            where = where[::-1] if mask.ndim == 2 else where  # 2D: (rows, columns) -> (x, y)
            boxes.append([s.start for s in where] + [s.stop for s in where])
            labels.append(int(value) - 1)
            voxels.append(int(sizes[index]))
    dims = mask.ndim
    return MaskBoxes(
        np.asarray(boxes, dtype=np.float32).reshape(-1, 2 * dims),
        np.asarray(labels, dtype=np.int64),
        np.asarray(voxels, dtype=np.int64),
        dropped,
    )
