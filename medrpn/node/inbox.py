"""Received images on disk, one folder per study, until the study's results are delivered.

A study received is never lost when the process stops: each image is written to a temporary file,
flushed to disk and renamed into its study's folder before the sender is told it was stored, and a
study's folder goes only after its results were delivered. A restarted node finds the folders
where they were and takes them up again (`Inbox.ready`).

Folder and file names carry no patient data: a study's folder is named by a hash of its Study
Instance UID, an image by its SOP Instance UID. A study moves through two states, kept as a marker
file in its folder: *received* (images arriving; analysed once none came for the quiet time) and
*analysed* (results written, waiting to be delivered). An image arriving after the analysis takes
the study back to *received*, so its results are made again with every image.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ANALYSED = ".analysed"
"""Marker file: the study's results are written (its content: the results' output folder)."""


def study_key(study_instance_uid: str) -> str:
    """The name of a study's folder: 16 hex digits of the SHA-256 of its Study Instance UID."""
    return hashlib.sha256(study_instance_uid.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class QueuedStudy:
    """A study in the inbox: its folder, when its last image arrived, and where its results are
    (None until analysed)."""

    folder: Path
    last_received: float
    results: Path | None

    @property
    def key(self) -> str:
        return self.folder.name


class Inbox:
    """The studies received and not yet delivered, under ``root``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def store(self, study_instance_uid: str, sop_instance_uid: str, encoded: bytes) -> Path:
        """Write one received DICOM file (``encoded``, with its file meta) into its study's folder,
        durably, and take the study back to *received*. Returns the file's path."""
        folder = self.root / study_key(study_instance_uid)
        folder.mkdir(exist_ok=True)
        name = re.sub(r"[^0-9.]", "_", sop_instance_uid)[:64] or "unnamed"
        descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".receiving-")
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(encoded)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, folder / f"{name}.dcm")
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        (folder / ANALYSED).unlink(missing_ok=True)
        return folder / f"{name}.dcm"

    def studies(self) -> list[QueuedStudy]:
        """Every study in the inbox, oldest last image first."""
        found = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            images = list(folder.glob("*.dcm"))
            if not images:
                continue
            marker = folder / ANALYSED
            results = Path(marker.read_text(encoding="utf-8").strip()) if marker.is_file() else None
            found.append(QueuedStudy(folder, max(p.stat().st_mtime for p in images), results))
        return sorted(found, key=lambda s: s.last_received)

    def ready(self, quiet_seconds: float, now: float | None = None) -> list[QueuedStudy]:
        """Studies whose last image arrived at least ``quiet_seconds`` ago (or that are analysed)."""
        now = time.time() if now is None else now
        return [s for s in self.studies() if s.results is not None or now - s.last_received >= quiet_seconds]

    def mark_analysed(self, study: QueuedStudy, results: Path) -> QueuedStudy:
        """Record that ``study``'s results are in ``results`` (unless an image came meanwhile)."""
        newest = max(p.stat().st_mtime for p in study.folder.glob("*.dcm"))
        if newest > study.last_received:
            return study  # an image arrived during the analysis: analyse again, with it
        (study.folder / ANALYSED).write_text(str(results), encoding="utf-8")
        return QueuedStudy(study.folder, study.last_received, results)

    def remove(self, study: QueuedStudy, keep_in: Path | None = None) -> bool:
        """Forget a delivered study: its images go (into ``keep_in/<study folder>`` when given, e.g.
        for `medrpn review`); its results stay where they were written.

        An image that arrived after the analysis keeps the whole study, to be analysed again with
        it: returns False then.
        """
        images = list(study.folder.glob("*.dcm"))
        if images and max(p.stat().st_mtime for p in images) > study.last_received:
            return False
        (study.folder / ANALYSED).unlink(missing_ok=True)
        if keep_in is not None:
            keep_in.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(keep_in / study.key, ignore_errors=True)
            study.folder.replace(keep_in / study.key)
        else:
            shutil.rmtree(study.folder, ignore_errors=True)
        return True
