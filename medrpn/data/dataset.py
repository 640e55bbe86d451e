"""A map-style dataset of annotated images that survives bad files.

Images come from an `ImageCache` (decoded, windowed and fitted to the input size once); the
per-epoch work is padding and augmentation. An image that cannot be read (a `DataError`, which
every image reader raises for a missing, unreadable or corrupt file) is reported (a warning naming
the file and the reason, once per file and process) and yields `None`, which the collate function
drops: one broken file never stops an epoch. Any other exception is a bug, not a bad file, and
propagates: skipping it would silently shrink the training, validation and test sets.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from medrpn.data.cache import CacheConfig, ImageCache, Prepared
from medrpn.data.io import ReadConfig
from medrpn.data.records import Record
from medrpn.data.transforms import MOSAIC_KEY, fit_scale
from medrpn.errors import DataError

log = logging.getLogger(__name__)

_UID_KEYS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


class DetectionDataset(Dataset):
    """Reads, transforms and packs one record per item (see `medrpn.data.batch` for the format).

    Args:
        records: the images and their boxes.
        transform: an albumentations transform from `medrpn.data.transforms.build_transform`.
        image_size: the side of the transform's output (to compute the resize factor).
        images: where prepared images come from; by default every file is read on access
            with the default `ReadConfig`.
        mosaic_partners: how many other records, drawn at random, go to the transform with each
            item for its mosaic (`medrpn.data.transforms.MOSAIC_KEY`); 0 when it makes none.
            An unreadable partner is reported and left out (the mosaic repeats the item instead).
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: A.Compose,
        image_size: int,
        images: ImageCache | None = None,
        mosaic_partners: int = 0,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.image_size = image_size
        self.images = images or ImageCache(CacheConfig(mode="none"), ReadConfig(), image_size)
        self.mosaic_partners = mosaic_partners
        self._reported: set[str] = set()
        self._seeded_in: int | None = None
        self._rng = np.random.default_rng(0)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        self._seed_augmentation()
        record = self.records[index]
        try:
            return self._sample(record)
        except DataError as error:
            self._report(record.key, error.path, error.reason)
        return None

    def _seed_augmentation(self) -> None:
        """Seeds albumentations (which ignores the global seeds) once per process from torch's
        seed: the main process's after `seed_everything`, or a DataLoader worker's (base seed +
        worker id). The same seed then gives the same augmentations, and workers differ."""
        pid = os.getpid()
        if self._seeded_in != pid:
            seed = torch.initial_seed() % 2**32
            self.transform.set_random_seed(seed)
            self._rng = np.random.default_rng(seed)  # mosaic partners
            self._seeded_in = pid

    def _fitted(self, record: Record) -> tuple[Prepared, dict[str, Any]]:
        """The record's prepared image, and the transform's input: its pixels, boxes and labels at the fitted size."""
        prepared = self.images.get(record)
        height, width = prepared.original_size
        fitted_h, fitted_w = prepared.array.shape[:2]
        boxes = np.clip(record.boxes, 0, [width, height, width, height])
        boxes = boxes * np.array([fitted_w / width, fitted_h / height] * 2, dtype=np.float32)
        return prepared, {"image": prepared.array, "bboxes": boxes, "labels": record.labels}

    def _partners(self) -> list[dict[str, Any]]:
        """The transform's inputs of `mosaic_partners` records drawn at random (unreadable ones reported and left out)."""
        partners = []
        for index in self._rng.integers(len(self.records), size=self.mosaic_partners):
            record = self.records[index]
            try:
                partners.append(self._fitted(record)[1])
            except DataError as error:
                self._report(record.key, error.path, error.reason)
        return partners

    def _sample(self, record: Record) -> dict[str, Any]:
        prepared, inputs = self._fitted(record)
        if self.mosaic_partners:
            inputs[MOSAIC_KEY] = self._partners()
        out = self.transform(**inputs)
        height, width = prepared.original_size
        pixels = np.asarray(out["image"], dtype=np.float32)
        return {
            "image": torch.from_numpy(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1).copy()),
            "target": {
                "boxes": torch.as_tensor(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)),
                "labels": torch.as_tensor(np.asarray(out["labels"], dtype=np.int64).reshape(-1)),
            },
            "meta": {
                "path": str(record.image_path),
                "scale": fit_scale(height, width, self.image_size),
                "original_size": (height, width),
                "spacing": prepared.spacing,
                "uids": {k: prepared.meta[k] for k in _UID_KEYS if k in prepared.meta},
                # the patient, for confidence intervals resampled over patients (never logged)
                "patient_id": record.patient_id or prepared.meta.get("PatientID"),
            },
        }

    def _report(self, key: str, path: str, reason: str) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("Skipping unreadable image %s: %s", path, reason)
