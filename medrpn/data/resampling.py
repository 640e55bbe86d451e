"""Volumes resampled to one target spacing (`data.target_spacing`, nnU-Net's and nnDetection's
"target spacing"), so that a lesion of a given size in mm spans the same voxels in every scan
and the anchors, patches and windows mean the same everywhere.

Scans of one dataset seldom share a voxel size (CT from 0.6 to 5 mm slices, MR protocols that
differ by site). Each axis is resampled to round(n x spacing / target) voxels, by trilinear
interpolation of the [0, 1]-scaled channels (torch's `interpolate`, voxel centres aligned as
with `align_corners=False`), so a box's voxel-edge coordinates scale by exactly that new/old
count per axis (`grid_zoom`): the same factor maps boxes to the grid and the detections back to
the scan's own voxels, where the world (mm) coordinates of the findings are computed. IoU of
axis-aligned boxes does not change when each axis is scaled, so the metrics read the same on
either grid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from medrpn.data.records import Record
from medrpn.errors import ConfigError


def check_target_spacing(target: Sequence[float] | None) -> tuple[float, float, float] | None:
    """`data.target_spacing` as three positive mm values (x, y, z), or None for each scan's own."""
    if target is None:
        return None
    values = tuple(float(v) for v in target)
    if len(values) != 3 or not all(v > 0 and np.isfinite(v) for v in values):
        raise ConfigError(f"data.target_spacing needs three positive sizes in mm (x, y, z), got {list(target)}")
    return values  # type: ignore[return-value]


def grid_zoom(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> np.ndarray:
    """Per axis, the voxel count on the target grid over the scan's own (at least one voxel)."""
    old = np.asarray(shape, dtype=np.float64)
    new = np.maximum(1, np.round(old * np.asarray(spacing, dtype=np.float64) / np.asarray(target, dtype=np.float64)))
    return new / old


def resample_channels(channels: np.ndarray, zoom: np.ndarray) -> np.ndarray:
    """(C, X, Y, Z) channels on the grid `zoom` times as fine per axis (trilinear), float32."""
    if np.allclose(zoom, 1.0):
        return channels
    size = tuple(int(round(n * z)) for n, z in zip(channels.shape[1:], zoom))
    tensor = torch.from_numpy(np.ascontiguousarray(channels, dtype=np.float32))[None]
    return torch.nn.functional.interpolate(tensor, size=size, mode="trilinear", align_corners=False)[0].numpy()


def zoom_boxes(boxes: np.ndarray, zoom: np.ndarray) -> np.ndarray:
    """Voxel boxes (N, 6) x1, y1, z1, x2, y2, z2 on the grid `zoom` times as fine (divide by it to go back)."""
    return (np.asarray(boxes, dtype=np.float64) * np.tile(zoom, 2)).astype(np.float32).reshape(-1, 6)


def record_on_grid(record: Record, zoom: np.ndarray) -> Record:
    """The record with its boxes in the voxels of the resampled grid."""
    return dataclasses.replace(record, boxes=zoom_boxes(record.boxes, zoom))
