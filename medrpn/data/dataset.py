"""A map-style dataset of annotated images that survives bad files.

An image that cannot be read is reported (a warning naming the file and the reason, once per
file and process) and yields `None`, which the collate function drops, so one broken file never
stops an epoch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import albumentations as A
import numpy as np
import torch
from torch.utils.data import Dataset

from medrpn.data.io import read_image
from medrpn.data.records import Image, Record
from medrpn.data.transforms import fit_scale
from medrpn.errors import DataError

log = logging.getLogger(__name__)

_UID_KEYS = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID")


class DetectionDataset(Dataset):
    """Reads, transforms and packs one record per item (see `medrpn.data.batch` for the format).

    Args:
        records: the images and their boxes.
        transform: an albumentations transform from `medrpn.data.transforms.build_transform`.
        image_size: the side of the transform's output (to compute the resize factor).
        reader: path -> `Image`; `medrpn.data.io.read_image` by default.
    """

    def __init__(
        self,
        records: Sequence[Record],
        transform: A.Compose,
        image_size: int,
        reader: Callable[[Any], Image] = read_image,
    ) -> None:
        self.records = list(records)
        self.transform = transform
        self.image_size = image_size
        self.reader = reader
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.records[index]
        try:
            image = self.reader(record.image_path)
        except DataError as error:
            self._report(str(record.image_path), error.reason)
            return None
        height, width = image.array.shape
        boxes = np.clip(record.boxes, 0, [width, height, width, height])
        out = self.transform(image=image.array, bboxes=boxes, labels=record.labels)
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
                "spacing": image.spacing,
                "uids": {k: image.meta[k] for k in _UID_KEYS if k in image.meta},
            },
        }

    def _report(self, path: str, reason: str) -> None:
        if path not in self._reported:
            self._reported.add(path)
            log.warning("Skipping unreadable image %s: %s", path, reason)
