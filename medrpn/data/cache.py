"""Decoded, windowed and resized images, kept so that later epochs do not decode DICOM again.

Decoding a 2048x2048 16-bit DICOM and windowing it costs tens of milliseconds; an epoch of a
chest X-ray set does it thousands of times. `ImageCache` does it once per image, in parallel
worker processes, before training starts (as MONAI's CacheDataset does), and keeps the result
fitted to the network input (longest side = `image_size`, the deterministic first step of
`medrpn.data.transforms.build_transform`), quantised to 16 bits (steps of 1/65535):

- ``memory``: in this process (about image_size^2 x 2 bytes per image; forked DataLoader
  workers share it);
- ``disk``: one ``.npz`` per image under `dir`, named by a hash of the file (path, size,
  modification time), the frame and the reading settings, so a changed file or setting is
  never served stale; the cache survives between runs (like MONAI's PersistentDataset);
- ``none``: every access reads the file again (only headers are checked up front).

Filling the cache is also where unreadable images are found, before the first training step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import albumentations as A
import cv2
import numpy as np
from torch.utils.data import DataLoader, Dataset

from medrpn.data.io import ReadConfig, probe_image, read_image
from medrpn.data.records import Record
from medrpn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

MODES = ("memory", "disk", "none")
_FORMAT_VERSION = 1
_FULL = 65535.0


@dataclass
class CacheConfig:
    """Where decoded images are kept (see the module docstring).

    Attributes:
        mode: "memory", "disk" or "none".
        dir: folder of the disk cache; default ``~/.cache/medrpn/images``.
    """

    mode: str = "memory"
    dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"data.cache.mode must be one of {', '.join(MODES)}, got {self.mode!r}")


@dataclass
class Prepared:
    """An image ready for the per-epoch transform.

    Attributes:
        array: float32 (h, w) or (h, w, 3) in [0, 1], resized so that max(h, w) = image_size.
        original_size: (H, W) of the image in the file (boxes are in these pixels).
        spacing: (row, col) mm of the original pixels, or None.
        meta: identifiers from the file (DICOM UIDs ...).
    """

    array: np.ndarray
    original_size: tuple[int, int]
    spacing: tuple[float, float] | None
    meta: dict[str, Any]


def prepare(record: Record, read: ReadConfig, image_size: int) -> Prepared:
    """Read, window and fit one image to `image_size` (albumentations' LongestMaxSize, INTER_AREA)."""
    image = read_image(record.image_path, record.frame, read)
    height, width = image.array.shape[:2]
    resized = A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_AREA, p=1.0)(image=image.array)["image"]
    return Prepared(np.asarray(resized, dtype=np.float32), (height, width), image.spacing, image.meta)


class ImageCache:
    """Serves `Prepared` images, from memory, disk or the file itself.

    Args:
        config: mode and folder.
        read: how files are read (part of the cache key).
        image_size: network input side (part of the cache key).
    """

    def __init__(self, config: CacheConfig, read: ReadConfig, image_size: int) -> None:
        self.config = config
        self.read = read
        self.image_size = image_size
        self.sizes: dict[str, tuple[int, int]] = {}  # record key -> original (H, W), known after fill
        self.spacings: dict[str, tuple[float, float] | None] = {}  # record key -> (row, col) mm, after fill
        self._memory: dict[str, tuple[np.ndarray, dict[str, Any]]] = {}
        self.dir = Path(config.dir).expanduser() if config.dir else Path.home() / ".cache" / "medrpn" / "images"

    def fill(
        self,
        records: Sequence[Record],
        num_workers: int = 0,
        on_error: Callable[[Record, DataError], None] | None = None,
        keep: bool = True,
    ) -> None:
        """Decode every record not cached yet (mode none: check headers only), in `num_workers` processes.

        Args:
            records: the images to prepare.
            num_workers: worker processes (0: this process).
            on_error: called with each record that cannot be read and its `DataError`;
                by default the error is raised.
            keep: False decodes (to check) but keeps only sizes and spacings in memory mode.
        """
        todo = [r for r in records if r.key not in self.sizes]
        if not todo:
            return
        loader = DataLoader(
            _FillDataset(todo, self, keep), batch_size=None, shuffle=False, num_workers=num_workers, collate_fn=_identity
        )
        for index, result in loader:
            record = todo[index]
            if isinstance(result, tuple) and len(result) == 3 and result[0] == "error":
                error = DataError(result[1], result[2])
                if on_error is None:
                    raise error
                on_error(record, error)
                continue
            size, spacing, entry = result
            self.sizes[record.key] = size
            self.spacings[record.key] = spacing
            if entry is not None:
                self._memory[record.key] = entry

    def get(self, record: Record) -> Prepared:
        """The prepared image of a record; reads the file on a cache miss (and stores it on disk)."""
        entry = self._memory.get(record.key)
        if entry is not None:
            return _unpack(*entry)
        if self.config.mode == "disk":
            path = self._path(record)
            if path is not None and path.is_file():
                try:
                    with np.load(path) as data:
                        return _unpack(data["pixels"], json.loads(str(data["info"])))
                except (OSError, ValueError, KeyError, json.JSONDecodeError):
                    log.warning("Ignoring a damaged cache entry %s", path)
        prepared = prepare(record, self.read, self.image_size)
        if self.config.mode == "disk":
            self._store(record, prepared)
        return prepared

    def _work(self, record: Record, keep: bool) -> tuple[tuple[int, int], tuple[float, float] | None, Any]:
        """In a worker: make the record's entry; returns (original size, spacing, entry kept in memory or None)."""
        if self.config.mode == "none":
            info = probe_image(record.image_path, record.frame, self.read)
            return (info.height, info.width), info.spacing, None
        if self.config.mode == "disk":
            prepared = self.get(record)  # reads the disk entry, or prepares and stores it
            return prepared.original_size, prepared.spacing, None
        prepared = prepare(record, self.read, self.image_size)
        return prepared.original_size, prepared.spacing, _pack(prepared) if keep else None

    def _store(self, record: Record, prepared: Prepared) -> None:
        path = self._path(record)
        if path is None:
            return
        pixels, info = _pack(prepared)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, pixels=pixels, info=json.dumps(info))
            os.replace(tmp, path)  # atomic: readers never see a half-written entry
        except OSError as e:
            Path(tmp).unlink(missing_ok=True)
            log.warning("Cannot write the image cache in %s (%s); images are read from their files", self.dir, e)

    def _path(self, record: Record) -> Path | None:
        try:
            stat = record.image_path.stat()
        except OSError:
            return None
        key = {
            "path": str(record.image_path.resolve()),
            "size": stat.st_size,
            "mtime": stat.st_mtime_ns,
            "frame": record.frame,
            "read": self.read.as_dict(),
            "image_size": self.image_size,
            "version": _FORMAT_VERSION,
        }
        digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()
        return self.dir / digest[:2] / f"{digest}.npz"


def _pack(prepared: Prepared) -> tuple[np.ndarray, dict[str, Any]]:
    pixels = np.round(np.clip(prepared.array, 0.0, 1.0) * _FULL).astype(np.uint16)
    info = {
        "original_size": list(prepared.original_size),
        "spacing": None if prepared.spacing is None else list(prepared.spacing),
        "meta": prepared.meta,
    }
    return pixels, info


def _unpack(pixels: np.ndarray, info: dict[str, Any]) -> Prepared:
    spacing = info.get("spacing")
    return Prepared(
        pixels.astype(np.float32) / _FULL,
        tuple(info["original_size"]),
        None if spacing is None else (float(spacing[0]), float(spacing[1])),
        dict(info.get("meta") or {}),
    )


class _FillDataset(Dataset):
    """One item per record to prepare; errors come back as data (a DataError does not survive pickling)."""

    def __init__(self, records: Sequence[Record], cache: ImageCache, keep: bool) -> None:
        self.records, self.cache, self.keep = records, cache, keep

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        try:
            return index, self.cache._work(self.records[index], self.keep)
        except DataError as e:  # the readers turn every decoder failure into one; anything else is a bug
            return index, ("error", e.path, e.reason)


def _identity(x):
    return x
