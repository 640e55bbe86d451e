"""Volumes for `LesionDataModule`: read and checked once, then patches for training and whole
scans for evaluation, in the batch format of `medrpn.data.batch` with a third axis.

- `VolumeStore` reads every scan of the splits before the first step (with `sequences`, each
  co-registered sequence beside it as one more channel), scales it to [0, 1] (`scale_to_unit`),
  resamples it to `target_spacing` when one is set (`medrpn.data.resampling`; the records' boxes
  then move to that grid, `VolumeStore.on_grid`) and keeps it in memory, or on disk memory-mapped
  (`data.cache.mode: disk`, `medrpn.data.volume_cache`); a scan whose voxels cannot be read (truncated,
  corrupt, too large) is a data problem of that scan, reported and left out under `on_error:
  skip`. Headers were already read with the annotations.
- Training: `VolumePatches` crops (balanced between lesion and background, flipped), drawn anew
  every epoch through `EpochPatchSampler`, which also shards them over DDP ranks.
- Evaluation: `WholeVolumes`, one scan per batch, with its spacing (x, y, z mm, along the box
  axes) and patient, for metrics per scan; the model runs it window by window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES
from medrpn.data.records import Record
from medrpn.data.resampling import grid_zoom, record_on_grid, resample_channels
from medrpn.data.volume import Volume
from medrpn.data.volume_cache import VolumeDiskCache
from medrpn.data.volume_files import read_volume, read_volume_geometry
from medrpn.data.volume_patches import NEGATIVE_PLACES, VolumePatches, scale_to_unit
from medrpn.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class PatchConfig:
    """How training patches are drawn from volumes (used only when the annotations are 3D).

    Attributes:
        size: patch size along x, y, z in voxels (a scan smaller along an axis is not cropped there).
        per_volume: patches drawn from each training volume per epoch.
        positive_fraction: share of patches placed around a lesion (scans with lesions).
        flip: flip patches at random along each axis.
        min_visible: boxes a patch cuts to less than this share of their extent along any axis
            are left out of its targets (0: all kept, clipped to the patch).
        negatives: where the patches not placed around a lesion go: "anywhere" in the scan, or
            "foreground": centred on a voxel above zero in some channel after scaling (nnU-Net's
            crop to the non-zero region; for skull-stripped MRI, the brain).
    """

    size: list[int] = field(default_factory=lambda: [64, 64, 32])
    per_volume: int = 4
    positive_fraction: float = 0.5
    flip: bool = True
    min_visible: float = 0.0
    negatives: str = "anywhere"

    def __post_init__(self) -> None:
        if len(self.size) != 3 or min(self.size) < 1:
            raise ConfigError(f"data.patches.size needs 3 positive voxel counts (x, y, z), got {self.size}")
        if self.per_volume < 1:
            raise ConfigError(f"data.patches.per_volume must be >= 1, got {self.per_volume}")
        if not 0 <= self.positive_fraction <= 1:
            raise ConfigError(f"data.patches.positive_fraction must be in [0, 1], got {self.positive_fraction}")
        if not 0 <= self.min_visible <= 1:
            raise ConfigError(f"data.patches.min_visible must be in [0, 1], got {self.min_visible}")
        if self.negatives not in NEGATIVE_PLACES:
            raise ConfigError(f"data.patches.negatives: {self.negatives!r} is not one of {', '.join(repr(n) for n in NEGATIVE_PLACES)}")


def channel_paths(reference: Path, sequences: Sequence[str] | None) -> list[Path]:
    """The files (or DICOM series folders) read as input channels for a scan: the scan itself, or
    each of `sequences` beside it (names in the scan's folder, in channel order)."""
    if not sequences:
        return [Path(reference)]
    return [Path(reference).parent / name for name in sequences]


def read_channels(
    reference: Path, sequences: Sequence[str] | None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> tuple[Volume, np.ndarray]:
    """A scan and its co-registered sequences: the reference scan's `Volume` (geometry and
    identifiers) and the channels (C, X, Y, Z) scaled to [0, 1] each.

    Every sequence must lie on the reference's grid (same shape and voxel-to-mm transform within
    0.01 mm): sequences are not registered onto each other, so one that does not is a `DataError`
    naming both.
    """
    paths = channel_paths(reference, sequences)
    first = read_volume(paths[0], max_decoded_bytes)
    if not sequences:
        return first, scale_to_unit(first.array)[None]
    grid = first.geometry if Path(reference) == paths[0] else read_volume_geometry(reference, max_decoded_bytes)
    channels = []
    for path in paths:
        volume = first if path == paths[0] else read_volume(path, max_decoded_bytes)
        if volume.shape != grid.shape or not np.allclose(volume.affine, grid.affine, atol=0.01):
            raise DataError(
                path,
                f"not on the grid of {Path(reference).name} (shape {volume.shape} against {grid.shape}, or another "
                "voxel-to-mm transform): sequences used as channels must be co-registered on one grid",
            )
        channels.append(scale_to_unit(volume.array))
    reference_volume = first if Path(reference) == paths[0] else read_volume(reference, max_decoded_bytes)
    return reference_volume, np.stack(channels)


class VolumeStore:
    """Every scan's channels (C, X, Y, Z), scaled to [0, 1] (and resampled), read once and kept
    (by record key), with the spacing of the grid they are on.

    Args:
        sequences: file names of co-registered sequences beside each annotated scan, read as its
            channels in this order (`read_channels`); None: the annotated scan alone.
        target_spacing: resample every scan to these voxel sizes (x, y, z mm); None: as it is.
        disk: keep them on disk, memory-mapped (`medrpn.data.volume_cache`), instead of in memory;
            scans prepared by an earlier run with the same files and settings are not read again.
    """

    def __init__(
        self,
        sequences: Sequence[str] | None = None,
        target_spacing: Sequence[float] | None = None,
        disk: VolumeDiskCache | None = None,
    ) -> None:
        self.sequences = list(sequences) if sequences else None
        self.target_spacing = None if target_spacing is None else tuple(float(v) for v in target_spacing)
        self.disk = disk
        self.arrays: dict[str, np.ndarray] = {}
        self.spacings: dict[str, tuple[float, float, float]] = {}
        self.zooms: dict[str, np.ndarray] = {}

    def fill(self, records: Sequence[Record], unreadable: Callable[[Record, DataError], None]) -> None:
        """Reads the scans not yet held; calls `unreadable` for each one that cannot be read."""
        for record in records:
            if record.key in self.arrays:
                continue
            key = self.disk.key(channel_paths(record.image_path, self.sequences), self.target_spacing) if self.disk else None
            cached = self.disk.load(key) if key else None
            if cached is not None:
                channels, spacing, zoom = cached
            else:
                try:
                    volume, channels = read_channels(record.image_path, self.sequences)
                except DataError as error:
                    unreadable(record, error)
                    continue
                zoom = np.ones(3)
                if self.target_spacing is not None:
                    zoom = grid_zoom(channels.shape[1:], volume.spacing, self.target_spacing)
                    channels = resample_channels(channels, zoom)
                spacing = tuple(float(s) for s in np.asarray(volume.spacing) / zoom)
                if key:
                    channels = self.disk.store(key, channels, spacing, zoom)
            self.arrays[record.key] = channels
            self.spacings[record.key] = spacing
            self.zooms[record.key] = zoom

    def on_grid(self, record: Record) -> Record:
        """The record with its boxes in the voxels of its stored channels (as it is without resampling)."""
        zoom = self.zooms.get(record.key)
        return record if zoom is None or np.allclose(zoom, 1.0) else record_on_grid(record, zoom)

    @property
    def nbytes(self) -> int:
        """Bytes held in memory (memory-mapped scans are on disk)."""
        return sum(a.nbytes for a in self.arrays.values() if not isinstance(a, np.memmap))


class EpochPatchSampler(DistributedSampler):
    """Every patch index once per epoch, shuffled by (seed, epoch) and sharded over DDP ranks
    (padded by repeating the first ones so every rank gets as many), as index + epoch x n, so
    that `VolumePatches` draws the epoch's own crops. Lightning calls `set_epoch` each epoch, and
    leaves a `DistributedSampler` as it is (it would wrap any other sampler in a second sharding).
    """

    def __init__(self, n: int, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n = n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        order += order[: self.total_size - self.n]
        return iter(self.epoch * self.n + i for i in order[self.rank : self.total_size : self.num_replicas])


class TrainingPatches(Dataset):
    """`VolumePatches` in the batch format, each patch zero-padded at its high end to the full
    patch size (a scan smaller than a patch along an axis), so that patches stack into a batch;
    a scan that fails after all as None (reported)."""

    def __init__(self, patches: VolumePatches) -> None:
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            image, target = self.patches[index]
        except DataError as error:
            log.warning("Skipping a patch of unreadable volume %s: %s", error.path, error.reason)
            return None
        short = [max(0, size - n) for size, n in zip(self.patches.patch_size, image.shape[1:])]
        if any(short):
            image = torch.nn.functional.pad(image, [0, short[2], 0, short[1], 0, short[0]])
        return {"image": image, "target": target, "meta": {}}


class WholeVolumes(Dataset):
    """Whole scans for evaluation: image (C, X, Y, Z), target in scan voxels, meta with the spacing."""

    def __init__(self, records: Sequence[Record], store: VolumeStore) -> None:
        self.records = list(records)
        self.store = store

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        array = self.store.arrays.get(record.key)
        if array is None:  # left out at setup (reported there)
            return None
        return {
            "image": torch.from_numpy(array),
            "target": {"boxes": torch.as_tensor(record.boxes, dtype=torch.float32).reshape(-1, 6),
                       "labels": torch.as_tensor(record.labels, dtype=torch.int64)},
            "meta": {
                "path": str(record.image_path),
                "scale": 1.0,
                "spacing": self.store.spacings[record.key],
                "original_size": tuple(array.shape[1:]),
                "patient_id": record.patient_id,
            },
        }
