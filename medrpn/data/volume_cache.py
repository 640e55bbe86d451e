"""Prepared volumes kept on disk (`data.cache.mode: disk` with 3D annotations), for datasets whose
scans do not fit in memory together: a 512 x 512 x 400 CT is 400 MB as float32, a hundred of them
40 GB.

Each scan's channels, scaled (and resampled) exactly as `VolumeStore` prepares them, go to one
``.npy`` file and are opened memory-mapped (copy-on-write): a training patch or an evaluation
window reads only its own voxels from disk (and the OS page cache), and forked DataLoader workers
share the pages. A ``.json`` beside it holds the grid's spacing and zoom.

The entry's name is a hash of what it was made from: every channel file's resolved path, size and
modification time (for a DICOM series folder, each of its files'), the sequences, the target
spacing and this format's version; a changed file or setting is never served stale, and the
cache survives between runs (like MONAI's PersistentDataset). Entries are written to a temporary
file and renamed, so a reader never sees half of one; an entry that cannot be read is made again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

_FORMAT_VERSION = 1
DEFAULT_DIR = Path.home() / ".cache" / "medrpn" / "volumes"


def _signature(path: Path) -> list:
    """What identifies the content of a file or a DICOM series folder without reading it."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    out = []
    for file in files:
        stat = file.stat()
        out.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return out


class VolumeDiskCache:
    """Prepared channels (C, X, Y, Z) of scans, on disk and memory-mapped (see the module docstring)."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder).expanduser() if folder else DEFAULT_DIR

    def key(self, paths: Sequence[Path], target_spacing: Sequence[float] | None) -> str | None:
        """The entry name of a scan read from these channel files; None if one cannot be found."""
        try:
            signature = [_signature(p) for p in paths]
        except OSError:
            return None  # missing: the reader reports it
        text = json.dumps({"channels": signature, "target_spacing": target_spacing, "version": _FORMAT_VERSION})
        return hashlib.sha1(text.encode()).hexdigest()

    def _paths(self, key: str) -> tuple[Path, Path]:
        folder = self.folder / key[:2]
        return folder / f"{key}.npy", folder / f"{key}.json"

    def load(self, key: str) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray] | None:
        """The entry's (memory-mapped channels, spacing, zoom), or None when there is none."""
        array_path, info_path = self._paths(key)
        if not array_path.is_file() or not info_path.is_file():
            return None
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
            channels = np.load(array_path, mmap_mode="c")
            return channels, tuple(float(v) for v in info["spacing"]), np.asarray(info["zoom"], dtype=float)
        except (OSError, ValueError, KeyError, json.JSONDecodeError):
            log.warning("Ignoring a damaged volume cache entry %s", array_path)
            return None

    def store(self, key: str, channels: np.ndarray, spacing: Sequence[float], zoom: np.ndarray) -> np.ndarray:
        """Writes an entry and returns it memory-mapped; on a write error, the channels as given."""
        array_path, info_path = self._paths(key)
        array_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            _write_atomically(info_path, lambda f: f.write(json.dumps({"spacing": list(spacing), "zoom": zoom.tolist()}).encode()))
            _write_atomically(array_path, lambda f: np.save(f, np.ascontiguousarray(channels, dtype=np.float32)))
        except OSError as error:
            log.warning("Cannot write the volume cache in %s (%s); this scan stays in memory", self.folder, error)
            return channels
        return np.load(array_path, mmap_mode="c")


def _write_atomically(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
