"""2D slices out of NIfTI volumes, shown the way a radiologist looks at them, with their spacing.

A slice is taken along an anatomical axis (axial, coronal or sagittal), whatever the order in
which the file stores its voxel axes: the orientation comes from the file's affine (nibabel's
`io_orientation`), and the slice is flipped/transposed to the radiological display convention
used by DICOM viewers:

    axial:    rows anterior -> posterior,  columns patient right -> left
    coronal:  rows superior -> inferior,   columns patient right -> left
    sagittal: rows superior -> inferior,   columns anterior -> posterior

Boxes of a NIfTI slice are in the pixels of that displayed slice. The slice number (the
record's `frame`) counts along the file's own voxel axis (the "k" of ITK-SNAP or 3D Slicer), so
annotation tools and medrpn agree on it. Only the slice is read from disk (nibabel proxies).
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError

from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES, check_decoded_size
from medrpn.data.windows import WindowConfig, linear_window, percentile_window, stretch
from medrpn.errors import ConfigError, DataError

# Anatomical axis -> index of the RAS world axis it is perpendicular to.
AXES = {"sagittal": 0, "coronal": 1, "axial": 2}
# Display rows and columns of each slice plane: (world axis, True if the index runs towards -R/-A/-S).
_DISPLAY = {
    "axial": ((1, True), (0, True)),
    "coronal": ((2, True), (0, True)),
    "sagittal": ((2, True), (1, True)),
}
SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(SUFFIXES)


def decode_nifti(
    path: str | Path,
    frame: int | None,
    axis: str = "axial",
    window: WindowConfig | None = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> tuple[np.ndarray, tuple[float, float], dict]:
    """One slice of a 3D (or 2D) NIfTI file in [0, 1].

    Args:
        path: a ``.nii`` or ``.nii.gz`` file.
        frame: slice number along the file's voxel axis closest to `axis`; may be None only
            when the volume has a single slice along it.
        axis: "axial", "coronal" or "sagittal".
        window: intensity window; "file" uses the header's cal_min/cal_max when set, else percentiles.
        max_decoded_bytes: refuse a volume whose header declares more voxel data (`medrpn.data.limits`).

    Returns:
        (array float32 (H, W) in [0, 1], spacing (row, col) mm, meta with the orientation code).
    """
    path = Path(path)
    window = window or WindowConfig()
    img, voxel_axis, n_slices = _open(path, axis, max_decoded_bytes)
    frame = _check_frame(path, frame, n_slices, axis)
    slicer = [slice(None)] * 3
    slicer[voxel_axis] = frame
    try:
        if img.ndim == 3:  # only this slice is read
            data = np.asarray(img.dataobj[tuple(slicer)], dtype=np.float32)
        else:  # 2D, or 3D with a trailing axis of length 1
            data = np.asarray(img.dataobj, dtype=np.float32).reshape(_shape3(img))[tuple(slicer)]
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise DataError(path, f"the image data is truncated or corrupt ({e})") from e
    pixels, (row_axis, col_axis) = _display(data, img, voxel_axis, axis)
    spacing = _spacing(img, row_axis, col_axis)
    fixed = window.fixed_window
    if fixed is not None:
        unit = linear_window(pixels, *fixed)
    elif window.mode == "file" and float(img.header["cal_max"]) > float(img.header["cal_min"]):
        unit = stretch(pixels, float(img.header["cal_min"]), float(img.header["cal_max"]))
    else:
        unit = percentile_window(pixels, window.percentiles)
    meta = {"orientation": "".join(nib.aff2axcodes(img.affine)), "slice_axis": axis, "slice": frame}
    return unit, spacing, meta


def probe_nifti(
    path: str | Path, frame: int | None, axis: str = "axial", max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> tuple[int, int, tuple[float, float], dict]:
    """(height, width, spacing, meta) of the displayed slice, checking dimensionality, size and slice
    number; reads no voxels."""
    path = Path(path)
    img, voxel_axis, n_slices = _open(path, axis, max_decoded_bytes)
    frame = _check_frame(path, frame, n_slices, axis)
    shape = _shape3(img)
    _, (row_axis, col_axis) = _display(None, img, voxel_axis, axis)
    spacing = _spacing(img, row_axis, col_axis)
    return shape[row_axis], shape[col_axis], spacing, {"slice_axis": axis, "slice": frame}


def count_slices(path: str | Path, axis: str = "axial", max_decoded_bytes: int | None = None) -> int:
    """How many slices the volume has along `axis` (with `max_decoded_bytes`, refusing a volume that
    declares more voxel data)."""
    return _open(Path(path), axis, max_decoded_bytes)[2]


def _open(path: Path, axis: str, max_decoded_bytes: int | None = None):
    """The image (header only), the voxel axis perpendicular to `axis`, and the number of slices along it;
    with `max_decoded_bytes`, a volume declaring more voxel data is refused before any is read."""
    if axis not in AXES:
        raise ConfigError(f"data.read.axis: unknown slice axis {axis!r}; choose one of {', '.join(AXES)}")
    try:
        img = nib.load(path)
    except FileNotFoundError as e:
        raise DataError(path, "file not found") from e
    except PermissionError as e:
        raise DataError(path, "permission denied") from e
    except (ImageFileError, EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as e:
        raise DataError(path, f"not a readable NIfTI file, it may be truncated or corrupt ({e})") from e
    shape = img.shape
    extra = [s for s in shape[3:] if s != 1]
    if len(shape) < 2 or extra:
        raise DataError(
            path,
            f"expected a 2D image or a 3D volume, got a {len(shape)}D array of shape {tuple(shape)} "
            "(give one 3D volume per file: medrpn reads 2D slices, not time series or channels)",
        )
    if max_decoded_bytes is not None:
        voxel_bytes = img.header.get_data_dtype().itemsize
        size = math.prod(int(n) for n in shape) * voxel_bytes
        declared = f"a volume of {' x '.join(str(int(n)) for n in shape)} voxels x {voxel_bytes} bytes"
        check_decoded_size(path, declared, size, max_decoded_bytes)
    ornt = nib.orientations.io_orientation(img.affine)
    voxel_axis = int(np.flatnonzero(ornt[:, 0] == AXES[axis])[0])
    return img, voxel_axis, _shape3(img)[voxel_axis]


def _spacing(img, row_axis: int, col_axis: int) -> tuple[float, float]:
    """Voxel sizes (mm) along the voxel axes that became rows and columns."""
    zooms = img.header.get_zooms()
    zooms = tuple(float(z) for z in zooms[:3]) + (1.0,) * (3 - len(zooms[:3]))
    return (zooms[row_axis], zooms[col_axis])


def _shape3(img) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in img.shape[:3])
    return shape + (1,) * (3 - len(shape))


def _check_frame(path: Path, frame: int | None, n_slices: int, axis: str) -> int:
    if frame is None:
        if n_slices == 1:
            return 0
        raise DataError(
            path, f"a volume of {n_slices} {axis} slices: the annotation must say which slice (its frame number)"
        )
    if not 0 <= frame < n_slices:
        raise DataError(path, f"slice {frame} requested but the volume has {n_slices} {axis} slices")
    return frame


def _display(data: np.ndarray | None, img, voxel_axis: int, axis: str):
    """Orient a slice for display; returns it and the voxel axes that became its rows and columns."""
    ornt = nib.orientations.io_orientation(img.affine)
    in_plane = [a for a in range(3) if a != voxel_axis]  # voxel axes left in `data`, in order
    placed = []
    for world, towards_negative in _DISPLAY[axis]:
        a = next(a for a in in_plane if ornt[a, 0] == world)
        # ornt[a, 1] == 1: the voxel index runs towards +R/+A/+S; flip when display wants the other way
        placed.append((a, (ornt[a, 1] == 1) == towards_negative))
    if data is not None:
        order = [in_plane.index(a) for a, _ in placed]
        data = np.transpose(data, order)
        for dim, (_, flip) in enumerate(placed):
            if flip:
                data = np.flip(data, axis=dim)
        data = np.ascontiguousarray(data)
    return data, (placed[0][0], placed[1][0])
