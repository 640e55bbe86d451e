"""The review of a findings folder: what `medrpn predict` wrote, the source images rendered at a
window the reader chooses, and the reader's marks, kept as they are made.

Marks are kept in ``<findings>/review/marks.json`` (every mark, with the finding it is about) and
turned, after each mark, into ``<findings>/review/reviewed.csv`` in medrpn's CSV annotation format
(``image,x1,y1,x2,y2,label,frame``), which `medrpn fit --data.annotations` reads. An image goes into
the CSV once every one of its findings is marked: confirmed ones as boxes of their class, those of
the wrong type as boxes of the class the reader chose, rejected ones not at all; an image whose
findings were all rejected becomes a row with empty box columns (an image without lesions). The
page cannot add a lesion the detector missed, so an image is only as complete as its findings.
Marks are keyed by the study's folder, the image and the finding, and hold the finding's tracking
UID: new studies arriving (`medrpn serve` writing into the same folder) move no mark, and a study
analysed again is not taken for the one reviewed (its marks no longer apply).
"""

from __future__ import annotations

import csv
import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

from medrpn.errors import ConfigError, DataError
from medrpn.outputs.findings import write_atomically

MARKS = ("confirmed", "rejected", "wrong_type")
REVIEW_FOLDER = "review"


@dataclass
class ReviewedImage:
    """One analysed image of a study: its findings.json entry and where its source file is."""

    study: str
    index: int
    entry: dict[str, Any]
    folder: Path
    source: Path | None

    @property
    def key(self) -> str:
        """"<study folder>|<image index>": stable while other studies come and go."""
        return f"{self.study}|{self.index}"


class ReviewSession:
    """The studies under ``findings`` (every findings.json below it), with sources under ``inputs``.

    Args:
        findings: the folder `medrpn predict` wrote.
        inputs: the folder it read (sources are named relative to it); None: the overlays are
            shown instead, without window adjustment.
    """

    def __init__(self, findings: str | Path, inputs: str | Path | None = None) -> None:
        self.root = Path(findings)
        self.inputs = None if inputs is None else Path(inputs)
        files = sorted(p for p in self.root.rglob("findings.json") if not any(s.startswith(".") for s in p.relative_to(self.root).parts))
        if not files:
            raise ConfigError(f"{self.root}: no findings.json below it (the folder `medrpn predict --output` wrote)")
        self.studies: list[dict[str, Any]] = []
        self.images: dict[str, ReviewedImage] = {}
        self._below: list[Path] | None = None  # files under inputs, listed once when needed
        for path in files:
            document = json.loads(path.read_text(encoding="utf-8"))
            folder = path.parent.relative_to(self.root).as_posix()
            self.studies.append({"folder": folder, "document": document})
            for index, entry in enumerate(document.get("images") or []):
                source = None
                if self.inputs is not None and not document.get("anonymized_paths"):
                    source = self._find_source(entry["source"])
                image = ReviewedImage(folder, index, entry, path.parent, source)
                self.images[image.key] = image
        self.class_names = list(self.studies[0]["document"]["model"]["class_names"])
        self.folder = self.root / REVIEW_FOLDER
        self._lock = threading.Lock()
        self._cache_lock = threading.RLock()
        self._windows: dict[str, list[float]] = {}
        self._decoded: OrderedDict[str, tuple[np.ndarray, pydicom.Dataset | None]] = OrderedDict()
        marks_file = self.folder / "marks.json"
        self.marks: dict[str, dict[str, Any]] = json.loads(marks_file.read_text(encoding="utf-8")) if marks_file.is_file() else {}

    def _find_source(self, source: str) -> Path | None:
        """``inputs/source``; else the one file below ``inputs`` whose path ends with ``source``
        (a study kept by `medrpn serve --keep-images` sits in a folder of its own)."""
        assert self.inputs is not None
        direct = self.inputs / source
        if direct.is_file():
            return direct
        if self._below is None:
            self._below = [p for p in self.inputs.rglob("*") if p.is_file()]
        tail = Path(source).parts
        found = [p for p in self._below if p.parts[-len(tail):] == tail]
        return found[0] if len(found) == 1 else None

    def listing(self) -> dict[str, Any]:
        """Everything the page shows: studies, images (with their default window), findings and marks."""
        studies = []
        for study in self.studies:
            model = study["document"]["model"]
            images = []
            for index, entry in enumerate(study["document"].get("images") or []):
                image = self.images[f"{study['folder']}|{index}"]
                findings = [
                    {**f, "key": f"{image.key}|{k}", "mark": self._mark_of(f"{image.key}|{k}", f)}
                    for k, f in enumerate(entry.get("findings") or [])
                ]
                images.append({
                    "key": image.key, "source": entry["source"], "width": entry["width"], "height": entry["height"],
                    "window": self.default_window(image), "adjustable": image.source is not None, "findings": findings,
                })
            studies.append({
                "folder": study["folder"], "score_threshold": model.get("score_threshold"),
                "threshold_source": model.get("threshold_source"), "images": images,
            })
        return {"class_names": self.class_names, "studies": studies}

    def default_window(self, image: ReviewedImage) -> list[float] | None:
        """The source's own window (DICOM), else its value range; None without a source."""
        if image.source is None:
            return None
        if image.key not in self._windows:
            values, dataset = self._values(image)
            if dataset is not None and "WindowCenter" in dataset and "WindowWidth" in dataset:
                window = [_first(dataset.WindowCenter), max(1.0, _first(dataset.WindowWidth))]
            else:
                low, high = float(values.min()), float(values.max())
                window = [(low + high) / 2, max(1.0, high - low)]
            self._windows[image.key] = window
        return self._windows[image.key]

    def render(self, key: str, center: float | None = None, width: float | None = None) -> bytes:
        """The image as a PNG: the source at window (``center``, ``width``), or its overlay PNG
        when there is no source to render.

        Raises:
            KeyError: no image ``key``.
            DataError: the source cannot be read.
        """
        image = self.images[key]
        if image.source is None:
            return (image.folder / image.entry["overlay"]).read_bytes()
        values, dataset = self._values(image)
        if values.ndim == 3:  # colour: shown as it is
            grey = values.astype(np.uint8)
        else:
            default = self.default_window(image)
            center = default[0] if center is None else center
            width = max(1.0, default[1] if width is None else width)
            unit = np.clip((values - (center - width / 2)) / width, 0.0, 1.0)
            if dataset is not None and dataset.get("PhotometricInterpretation") == "MONOCHROME1":
                unit = 1.0 - unit
            grey = np.rint(unit * 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(grey).save(buffer, format="PNG", compress_level=3)
        return buffer.getvalue()

    def _values(self, image: ReviewedImage) -> tuple[np.ndarray, pydicom.Dataset | None]:
        """The source's values after the modality LUT (DICOM) or as stored (other formats); the
        last few are kept, as a reader moves the window sliders over one image."""
        with self._cache_lock:  # the server answers requests in threads
            if image.key in self._decoded:
                self._decoded.move_to_end(image.key)
                return self._decoded[image.key]
            decoded = self._decode(image)
            self._decoded[image.key] = decoded
            while len(self._decoded) > 4:
                self._decoded.popitem(last=False)
            return decoded

    def _decode(self, image: ReviewedImage) -> tuple[np.ndarray, pydicom.Dataset | None]:
        path = image.source
        assert path is not None
        try:
            if path.suffix.lower() in (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".pgm", ".ppm"):
                with Image.open(path) as picture:
                    array = np.asarray(picture.convert("RGB" if picture.mode in ("RGB", "RGBA", "P") else "L"))
                return array.astype(np.float32), None
            dataset = pydicom.dcmread(path)
            pixels = dataset.pixel_array
            frame = image.entry.get("frame")
            if frame is not None and int(dataset.get("NumberOfFrames", 1)) > 1:
                pixels = pixels[frame]
            if dataset.get("SamplesPerPixel", 1) > 1:
                return pixels.astype(np.float32), dataset
            return apply_modality_lut(pixels, dataset).astype(np.float32), dataset
        except Exception as error:  # noqa: BLE001 - any decoder failure is this file's problem
            raise DataError(f"{path}: cannot be shown ({type(error).__name__}: {error})") from None

    def _mark_of(self, key: str, finding: dict[str, Any]) -> dict[str, Any] | None:
        """The mark on ``finding``; None when there is none, or when it was made on another finding
        of that place (the study was analysed again since: its tracking UID differs)."""
        mark = self.marks.get(key)
        return mark if mark is not None and mark.get("tracking_uid") == finding.get("tracking_uid") else None

    def mark(self, key: str, mark: str, label: str | None = None) -> dict[str, Any]:
        """Record the reader's mark on finding ``key`` ("study folder|image|finding"); rewrite the CSV.

        Raises:
            KeyError: no such finding. ValueError: an unknown mark, or a wrong type without a class
            of the model that differs from the finding's.
        """
        image_key, _, number = key.rpartition("|")
        image = self.images[image_key]
        findings = image.entry.get("findings") or []
        if not number.isdigit() or int(number) >= len(findings):
            raise KeyError(key)
        finding = findings[int(number)]
        if mark not in MARKS:
            raise ValueError(f"mark {mark!r}: one of {', '.join(MARKS)}")
        if mark == "wrong_type" and (label not in self.class_names or label == finding["label"]):
            raise ValueError(f"wrong type: give the right class, one of {self.class_names} other than {finding['label']!r}")
        record = {"mark": mark, "label": label if mark == "wrong_type" else finding["label"],
                  "tracking_uid": finding.get("tracking_uid")}
        with self._lock:
            self.marks[key] = record
            self.folder.mkdir(exist_ok=True)
            write_atomically(self.folder / "marks.json", json.dumps(self.marks, indent=1).encode())
            write_atomically(self.folder / "reviewed.csv", self.csv_text().encode())
        return record

    def csv_text(self) -> str:
        """The marks as medrpn's CSV annotations (module docstring)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "x1", "y1", "x2", "y2", "label", "frame"])
        for key, image in self.images.items():
            findings = image.entry.get("findings") or []
            marks = [self._mark_of(f"{key}|{k}", f) for k, f in enumerate(findings)]
            if not findings or image.source is None or any(m is None for m in marks):
                continue
            frame = "" if image.entry.get("frame") is None else image.entry["frame"]
            kept = [(f, m) for f, m in zip(findings, marks) if m["mark"] != "rejected"]
            for finding, mark in kept:
                writer.writerow([str(image.source.resolve()), *finding["box_px"], mark["label"], frame])
            if not kept:
                writer.writerow([str(image.source.resolve()), "", "", "", "", "", frame])
        return out.getvalue()


def _first(value: Any) -> float:
    """The first of a multi-valued DICOM number (a file may give several windows), as a float."""
    return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
