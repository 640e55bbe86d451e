"""Training patches from volumes: fixed-size crops, balanced between crops around a lesion and
crops anywhere, with the boxes that fall inside each crop.

A 3D detector trains on patches (nnDetection, MONAI's LUNA16 recipe): whole scans do not fit,
and most of a scan holds no lesion. Crops are MONAI's box-aware `RandCropBoxByPosNegLabeld`
(a crop centre inside a lesion box with probability `positive_fraction`, else anywhere; a box cut
by the crop is clipped to it, one cut to nothing is dropped), then random flips along each axis
(`RandFlipBoxd`, boxes flipped with the voxels). Volumes are read once (`medrpn.data.volume_files`)
and kept in memory, their intensities scaled to [0, 1] between the 0.5th and 99.5th percentiles
of the scan (MR has no fixed scale; for CT a window is the better choice, and a later setting).

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
    ) -> None:
        if any(r.spatial_dims != 3 for r in records):
            raise ConfigError("VolumePatches takes volume records (boxes x1, y1, z1, x2, y2, z2)")
        if not 0 <= positive_fraction <= 1:
            raise ConfigError(f"positive_fraction must be in [0, 1], got {positive_fraction}")
        self.records = list(records)
        self.patch_size = tuple(int(n) for n in patch_size)
        self.positive_fraction = positive_fraction
        self.samples_per_volume = samples_per_volume
        self.flip = flip
        self.seed = seed
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
        from monai.apps.detection.transforms.dictionary import RandCropBoxByPosNegLabeld, RandFlipBoxd

        later, index = divmod(index, len(self))
        record = self.records[index // self.samples_per_volume]
        rng_seed = (self.seed, self.epoch + later, index)
        image = self.volume(record)
        data = {"image": image, "boxes": record.boxes.astype(np.float32), "labels": record.labels.astype(np.int64)}
        if len(record.boxes):
            size = tuple(min(p, n) for p, n in zip(self.patch_size, image.shape[1:]))  # MONAI refuses a larger crop
            crop = RandCropBoxByPosNegLabeld(
                "image", "boxes", "labels", size, pos=self.positive_fraction,
                neg=1.0 - self.positive_fraction, num_samples=1, whole_box=True,
            )
            crop.set_random_state(seed=_seed(rng_seed, 0))
            data = crop(data)[0]
        else:
            data = self._random_crop(data, np.random.default_rng(_seed(rng_seed, 0)))
        if self.flip:
            for axis in range(3):
                flip = RandFlipBoxd("image", "boxes", box_ref_image_keys="image", prob=0.5, spatial_axis=axis)
                flip.set_random_state(seed=_seed(rng_seed, axis + 1))
                data = flip(data)
        boxes = torch.as_tensor(np.asarray(data["boxes"]), dtype=torch.float32).reshape(-1, 6)
        labels = torch.as_tensor(np.asarray(data["labels"]), dtype=torch.int64).reshape(-1)
        return torch.as_tensor(np.asarray(data["image"]), dtype=torch.float32), {"boxes": boxes, "labels": labels}

    def _random_crop(self, data: dict, rng: np.random.Generator) -> dict:
        """A crop anywhere (a volume without lesions)."""
        shape = data["image"].shape[1:]
        start = [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, self.patch_size)]
        stop = [min(s0 + p, s) for s0, p, s in zip(start, self.patch_size, shape)]
        image = data["image"][:, start[0] : stop[0], start[1] : stop[1], start[2] : stop[2]]
        return {"image": np.ascontiguousarray(image), "boxes": np.zeros((0, 6), np.float32), "labels": np.zeros(0, np.int64)}


def _seed(parts: tuple[int, int, int], salt: int) -> int:
    return int(np.random.SeedSequence([*parts, salt]).generate_state(1)[0])
