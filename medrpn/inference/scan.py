"""What is in a prediction input: a file or a folder tree, grouped into the studies to analyse.

DICOM files are recognised by content (the ``DICM`` marker) or name (``.dcm``, ``.dicom``, no
suffix), their headers read without pixels and grouped by StudyInstanceUID (ordered by series and
instance number; each frame of a multi-frame file is an image). DICOM objects that are not images
(structured reports, RT structure sets, presentation states...) are noted and skipped; files whose
header cannot be read are listed with the reason. PNG/JPEG files and NIfTI slices are grouped by
the folder they are in. Nothing here knows the model.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from medrpn.data import dicom, nifti
from medrpn.data.io import RASTER_SUFFIXES
from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES
from medrpn.errors import DataError, MedrpnError
from medrpn.outputs.references import reference_header

DICOM_SUFFIXES = {".dcm", ".dicom", ""}
# Output names are kept well under the usual 255-byte limit of a file name: writers add a temporary
# prefix and suffix, and later folder suffixes ("-2") must still fit.
MAX_NAME_BYTES = 120


@dataclass
class InputItem:
    """One 2D image to analyse: a file, the frame/slice in it, and (DICOM) its reference header."""

    path: Path
    source: str
    frame: int | None = None
    header: Dataset | None = None
    overlay: str = ""
    order: tuple = ()


@dataclass
class InputGroup:
    """The images of one output folder: a DICOM study, or the other images of one input folder."""

    folder: Path
    study_instance_uid: str | None
    items: list[InputItem] = field(default_factory=list)


@dataclass
class Scan:
    """What `scan_inputs` found: groups to analyse, unreadable files, notes and ignored files."""

    groups: list[InputGroup]
    skipped: list[tuple[str, str]]
    notes: list[tuple[str, str]]
    ignored: int


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _kind(path: Path) -> str | None:
    """"dicom", "raster", "nifti" or None (not an image file medrpn reads)."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return "nifti"
    if _has_dicom_magic(path):  # DICOM whatever its name, as `medrpn.data.io.read_image` decides
        return "dicom"
    if path.suffix.lower() in RASTER_SUFFIXES:
        return "raster"
    return "dicom" if path.suffix.lower() in DICOM_SUFFIXES else None


def _list_files(root: Path, exclude: Path | None) -> list[Path]:
    """Files below ``root``, sorted, hidden files and folders and the ``exclude`` tree left out."""
    files = []
    for folder, dirs, names in os.walk(root):
        here = Path(folder)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )
        files += [here / n for n in sorted(names) if not n.startswith(".")]
    return files


def _read_header(path: Path, max_decoded_bytes: int) -> Dataset:
    """The DICOM header without pixel data, or a `DataError` saying why it cannot be read (a deflated
    file that would inflate to more than `max_decoded_bytes` included)."""
    dicom.check_inflated_size(path, max_decoded_bytes)
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as error:
        # some writers leave out the preamble and file meta; accept such a file if it still
        # parses into a DICOM object with a SOP class
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception:
            ds = None
        if ds is not None and ds.get("SOPClassUID"):
            return ds
        raise DataError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from error
    except PermissionError as error:
        raise DataError(path, "permission denied") from error
    except Exception as error:  # pydicom raises many types on damaged headers
        raise DataError(path, f"unreadable DICOM header, the file may be truncated or corrupt ({error})") from error


def _not_an_image(ds: Dataset) -> str | None:
    """The SOP class name of a complete DICOM object that holds no image (SR, RTSTRUCT, PR...), else None."""
    if "Rows" in ds:
        return None
    file_meta = getattr(ds, "file_meta", None) or Dataset()
    sop_class = ds.get("SOPClassUID") or file_meta.get("MediaStorageSOPClassUID")
    if not sop_class or "Image" in sop_class.name or sop_class.name == str(sop_class):
        return None  # no class, an image class without Rows (cut short), or a class pydicom does not know
    return sop_class.name


def _overlay_name(source: str, frame: int | None, taken: set[str]) -> str:
    stem = re.sub(r"(\.nii)?(\.gz)?$", "", Path(source).name, flags=re.IGNORECASE)
    stem = Path(stem).stem if Path(stem).suffix.lower() in {*RASTER_SUFFIXES, ".dcm", ".dicom"} else stem
    stem = re.sub(r"[^\w.\-]", "_", stem) or "image"
    base = _short_name(stem if frame is None else f"{stem}_{frame}", f"{source}|{frame}")
    name, n = f"{base}.png", 1
    while name.lower() in taken:
        n += 1
        name = f"{base}-{n}.png"
    taken.add(name.lower())
    return name


def _short_name(name: str, key: str) -> str:
    """``name`` if it fits in `MAX_NAME_BYTES` (UTF-8), else a readable prefix of it and a short hash
    of ``key`` (the full path it comes from), so that long names stay distinct."""
    if len(name.encode("utf-8")) <= MAX_NAME_BYTES:
        return name
    prefix = name.encode("utf-8")[: MAX_NAME_BYTES - 17].decode("utf-8", errors="ignore")
    return f"{prefix}-{_pseudonym(key)}"


def _pseudonym(text: str) -> str:
    """16 hex digits of the SHA-256 of ``text``: the same path always gets the same name."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _safe_folder_name(uid: str) -> str:
    """A study's folder name: its UID, made safe (a damaged UID must not name ``..`` or a hidden folder)."""
    name = re.sub(r"[^0-9A-Za-z._-]", "_", uid.strip()).lstrip(".")
    return _short_name(name, uid) if re.search(r"[0-9A-Za-z]", name) else "study"


def scan_inputs(
    inputs: str | Path,
    exclude: str | Path | None = None,
    axis: str = "axial",
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    anonymize_paths: bool = False,
) -> Scan:
    """Find the images under ``inputs`` and group them into output folders (see the module docstring).

    Args:
        inputs: an image file or a folder (searched recursively; hidden files are left out).
        exclude: a folder below ``inputs`` not to search (the output folder, when it is inside).
        axis: the plane NIfTI volumes are sliced in.
        max_decoded_bytes: files whose header declares more decoded pixel data are skipped
            (`medrpn.data.limits`), before a frame or slice of them becomes an image to analyse.
        anonymize_paths: name images by their SOP Instance UID (DICOM) or a `_pseudonym` of their
            path, and folders of other images by a pseudonym, instead of by the input's names
            (which can carry patient names); sources, overlays and folders are then named so.

    Returns:
        A `Scan`; group folders are relative to the output folder. Two groups can ask for the same
        folder (a study and an input folder named alike): the caller makes them unique.
    """
    inputs = Path(inputs)
    if inputs.is_file():
        root, files = inputs.parent, [inputs]
    elif inputs.is_dir():
        root, files = inputs, _list_files(inputs, None if exclude is None else Path(exclude).resolve())
    else:
        raise MedrpnError(f"{inputs}: no such file or folder")

    studies: dict[str, InputGroup] = {}
    folders: dict[Path, InputGroup] = {}
    skipped, notes, ignored = [], [], 0

    def folder_group(relative: str) -> InputGroup:
        parent = Path(relative).parent
        name = Path(_pseudonym(parent.as_posix())) if anonymize_paths and parent != Path(".") else parent
        return folders.setdefault(parent, InputGroup(name, None))

    for path in files:
        kind = _kind(path)
        if kind is None:
            ignored += 1
            continue
        relative = path.relative_to(root).as_posix()
        source = _pseudonym(relative) if anonymize_paths else relative
        if kind == "dicom":
            try:
                ds = _read_header(path, max_decoded_bytes)
            except DataError as error:
                skipped.append((str(path), error.reason))
                continue
            other = _not_an_image(ds)
            if other is not None:
                notes.append((str(path), f"not an image ({other}), skipped"))
                continue
            if "Rows" not in ds:
                skipped.append((str(path), "no image attributes in this DICOM file: it looks truncated or corrupt"))
                continue
            try:
                dicom.check_declared_size(ds, path, max_decoded_bytes)
            except DataError as error:
                skipped.append((str(path), error.reason))
                continue
            if anonymize_paths and str(ds.get("SOPInstanceUID") or "").strip():
                source = str(ds.SOPInstanceUID).strip()
            frames = [None] if "NumberOfFrames" not in ds else list(range(int(ds.NumberOfFrames or 1)))
            header = reference_header(ds)
            series = (_int(ds.get("SeriesNumber")), str(ds.get("SeriesInstanceUID", "")))
            order = (*series, _int(ds.get("InstanceNumber")), relative)
            study = str(ds.get("StudyInstanceUID") or "").strip()
            if study:
                group = studies.setdefault(study, InputGroup(Path(_safe_folder_name(study)), study))
            else:  # cannot be referenced in DICOM outputs: handled like other images of its folder
                group = folder_group(relative)
            group.items += [InputItem(path, source, frame, header, order=order + (frame or 0,)) for frame in frames]
        else:
            if kind == "nifti":
                try:
                    frames = list(range(nifti.count_slices(path, axis, max_decoded_bytes)))
                except DataError as error:
                    skipped.append((str(path), error.reason))
                    continue
            else:
                frames = [None]
            group = folder_group(relative)
            group.items += [InputItem(path, source, frame, order=(0, "", 0, relative, frame or 0)) for frame in frames]

    groups = list(folders.values()) + list(studies.values())
    for group in groups:
        group.items.sort(key=lambda item: item.order)
        taken: set[str] = set()
        for item in group.items:
            item.overlay = _overlay_name(item.source, item.frame, taken)
    groups.sort(key=lambda g: g.items[0].order[3])
    return Scan(groups, skipped, notes, ignored)


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
