"""Training patches from volumes: fixed-size crops, balanced between crops around a lesion and
crops anywhere, with the boxes that fall inside each crop.

A 3D detector trains on patches (nnDetection, MONAI's LUNA16 recipe): whole scans do not fit,
and most of a scan holds no lesion. With probability `positive_fraction` a crop is placed around a
lesion: one of the scan's lesions, each as likely as the others whatever its size, and the crop
at a random place where it holds that lesion whole (or, for a lesion larger than the crop, where
it lies inside the lesion's box). Otherwise the crop is anywhere in the scan, or (`negatives:
"foreground"`) centred on a voxel of the scan's foreground, one that is above zero in some channel
after scaling: nnU-Net and nnDetection crop every scan to its non-zero region before drawing
patches, and in a skull-stripped brain in MNI space (an MS scan) 55% of 32-voxel crops drawn
anywhere hold under 10% brain, so the detector hardly sees the tissue its false positives come
from. Boxes are moved into the crop and clipped to it; a box cut to nothing is dropped (and with
`min_visible` one cut below that share of its extent along an axis). Then random flips along
each axis (MONAI's `RandFlipBoxd`, boxes flipped with the voxels).

Lesions are chosen, not voxels, as nnDetection samples objects: MONAI's `RandCropBoxByPosNegLabeld`
centres a crop on a voxel inside any box, so a lesion's share of the positive crops grows with
its box's volume. In one of the MS scans (patient 19 of ../shared/data/ms-lesions-3d, 65 lesions of
median extent 6 voxels) one confluent lesion's box holds 1.09 million voxels, 99% of all its boxes'
voxels: nearly every positive crop landed inside it, where the clipped box is the whole crop, and
the small lesions were almost never the reason for a crop.

Volumes are read once (`medrpn.data.volume_files`) and kept in memory, their intensities scaled
to [0, 1] between the 0.5th and 99.5th percentiles of the scan (MR has no fixed scale; for CT a
window is the better choice, and a later setting).

Items are (patch (C, X, Y, Z) float32 (C: the sequences, 1 for a single scan), {"boxes" (N, 6) float32 patch voxels, "labels" (N,) int64}),
the batch contract of the 2D data (`medrpn.data.records`) with a third axis.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from medrpn.data.records import Record
from medrpn.data.volume_files import read_volume
from medrpn.errors import ConfigError

PERCENTILES = (0.5, 99.5)
NEGATIVE_PLACES = ("anywhere", "foreground")


def scale_to_unit(array: np.ndarray) -> np.ndarray:
    """Intensities to [0, 1] between the scan's 0.5th and 99.5th percentiles (clipped)."""
    lo, hi = np.percentile(array, PERCENTILES)
    return np.clip((array - lo) / max(hi - lo, 1e-6), 0.0, 1.0).astype(np.float32)


class VolumePatches(Dataset):
    """`samples_per_volume` random patches of each record's volume per epoch.

    Args:
        records: 3D records (boxes (N, 6) in the volume's LPS voxels).
        patch_size: crop size per axis, in voxels (a volume smaller along an axis is not cropped there).
        positive_fraction: probability that a crop is centred in a lesion box (volumes with lesions).
        samples_per_volume: patches drawn from each volume per epoch.
        flip: flip patches at random along each axis.
        seed: seed of the crops and flips (each item derives its own from it).
        volumes: the records' voxels already scaled (`scale_to_unit`), (C, X, Y, Z) or (X, Y, Z),
            by record key; by default each volume is read on first use and kept.
        min_visible: a box the crop cuts to less than this share of its extent along any axis is
            left out of the crop's targets (0: every box that keeps a voxel stays, clipped). A
            confluent lesion far larger than the crop then does not make the whole crop a box.
        negatives: where the crops not placed around a lesion go: "anywhere" in the scan, or
            "foreground": centred on a voxel above zero in some channel (a scan without one: anywhere).

    Index i + e * len(self) is item i drawn for epoch `epoch + e` (`EpochPatchSampler` yields
    such indices, so every epoch gets new crops in worker processes too).
    """

    def __init__(
        self,
        records: Sequence[Record],
        patch_size: tuple[int, int, int],
        positive_fraction: float = 0.5,
        samples_per_volume: int = 4,
        flip: bool = True,
        seed: int = 0,
        volumes: Mapping[str, np.ndarray] | None = None,
        min_visible: float = 0.0,
        negatives: str = "anywhere",
    ) -> None:
        if any(r.spatial_dims != 3 for r in records):
            raise ConfigError("VolumePatches takes volume records (boxes x1, y1, z1, x2, y2, z2)")
        if not 0 <= positive_fraction <= 1:
            raise ConfigError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        if negatives not in NEGATIVE_PLACES:
            raise ConfigError(f"negatives: {negatives!r} is not one of {', '.join(repr(n) for n in NEGATIVE_PLACES)}")
        self.records = list(records)
        self.patch_size = tuple(int(n) for n in patch_size)
        self.positive_fraction = positive_fraction
        self.samples_per_volume = samples_per_volume
        self.flip = flip
        self.seed = seed
        self.min_visible = min_visible
        self.negatives = negatives
        self._foreground: dict[str, np.ndarray] = {}  # voxels above zero per x-slice, by record key
        self.epoch = 0
        self._volumes: dict[str, np.ndarray] = {} if volumes is None else volumes  # type: ignore[assignment]

    def __len__(self) -> int:
        return len(self.records) * self.samples_per_volume

    def volume(self, record: Record) -> np.ndarray:
        """The record's voxels scaled to [0, 1], (C, X, Y, Z), read once."""
        if record.key not in self._volumes:
            self._volumes[record.key] = scale_to_unit(read_volume(record.image_path).array)[None]
        volume = self._volumes[record.key]
        return volume if volume.ndim == 4 else volume[None]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from monai.apps.detection.transforms.dictionary import RandFlipBoxd

        later, index = divmod(index, len(self))
        record = self.records[index // self.samples_per_volume]
        rng_seed = (self.seed, self.epoch + later, index)
        data = self._crop(self.volume(record), record, np.random.default_rng(_seed(rng_seed, 0)))
        if self.flip:
            for axis in range(3):
                flip = RandFlipBoxd("image", "boxes", box_ref_image_keys="image", prob=0.5, spatial_axis=axis)
                flip.set_random_state(seed=_seed(rng_seed, axis + 1))
                data = flip(data)
        boxes = torch.as_tensor(np.asarray(data["boxes"]), dtype=torch.float32).reshape(-1, 6)
        labels = torch.as_tensor(np.asarray(data["labels"]), dtype=torch.int64).reshape(-1)
        return torch.as_tensor(np.asarray(data["image"]), dtype=torch.float32), {"boxes": boxes, "labels": labels}

    def _crop(self, image: np.ndarray, record: Record, rng: np.random.Generator) -> dict:
        """A crop around one of the record's lesions (with probability `positive_fraction`) or
        elsewhere (`negatives`), with the boxes inside it."""
        shape = np.array(image.shape[1:])
        size = np.minimum(np.array(self.patch_size), shape)  # a scan smaller along an axis is not cropped there
        boxes = np.asarray(record.boxes, dtype=np.float32).reshape(-1, 6)
        if len(boxes) and rng.random() < self.positive_fraction:
            lesion = boxes[rng.integers(len(boxes))]
            low, high = np.floor(lesion[:3]), np.ceil(lesion[3:])
            # starts that keep the lesion whole in the crop, or the crop inside a lesion larger than it
            first, last = np.minimum(low, high - size), np.maximum(low, high - size)
            start = np.array([rng.integers(int(a), int(b) + 1) for a, b in zip(first, last)])
        else:
            centre = None
            if self.negatives == "foreground":
                if record.key not in self._foreground:
                    self._foreground[record.key] = foreground_counts(image)
                centre = _foreground_voxel(image, self._foreground[record.key], rng)
            if centre is not None:
                start = centre - size // 2
            else:
                start = np.array([rng.integers(0, int(n - p) + 1) for n, p in zip(shape, size)])
        start = np.clip(start, 0, shape - size).astype(int)
        stop = start + size
        crop = image[:, start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
        labels = np.asarray(record.labels, dtype=np.int64).reshape(-1)
        moved = boxes - np.concatenate([start, start]).astype(np.float32)
        clipped = np.concatenate([np.clip(moved[:, :3], 0, size), np.clip(moved[:, 3:], 0, size)], axis=1)
        visible = clipped[:, 3:] - clipped[:, :3]
        # a box cut to nothing goes; so does one cut below `min_visible` of its extent along an axis
        keep = (visible > 0).all(axis=1) & (visible / np.maximum(moved[:, 3:] - moved[:, :3], 1e-6) >= self.min_visible).all(axis=1)
        boxes, labels = clipped[keep], labels[keep]
        return {"image": np.ascontiguousarray(crop), "boxes": np.asarray(boxes, np.float32).reshape(-1, 6), "labels": labels}


def _foreground_voxel(image: np.ndarray, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray | None:
    """A voxel drawn uniformly among those of `image` (C, X, Y, Z) above zero in some channel, given
    `counts`, the number of such voxels in each x-slice (`foreground_counts`); None if there is none.
    An x-slice is drawn by its count, then a voxel of it: no (X, Y, Z) index array is kept."""
    total = int(counts.sum())
    if total == 0:
        return None
    x = int(rng.choice(len(counts), p=counts / total))
    inside = np.flatnonzero(image[:, x].max(axis=0) > 0)
    y, z = np.unravel_index(int(inside[rng.integers(len(inside))]), image.shape[2:])
    return np.array([x, y, z])


def foreground_counts(image: np.ndarray) -> np.ndarray:
    """Voxels above zero in some channel of `image` (C, X, Y, Z), per x-slice."""
    return (image.max(axis=0) > 0).sum(axis=(1, 2))


def _seed(parts: tuple[int, int, int], salt: int) -> int:
    return int(np.random.SeedSequence([*parts, salt]).generate_state(1)[0])
