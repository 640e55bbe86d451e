"""A DICOM series as one `Volume`: its slices grouped, ordered, checked and stacked.

The slices of a folder are grouped by SeriesInstanceUID and ordered by their position along the
slice normal (ImagePositionPatient projected on the cross product of ImageOrientationPatient's
row and column directions), never by InstanceNumber or file name. The slice spacing comes from
those positions, not from SliceThickness (which is the slab's thickness, not the step). An
enhanced multi-frame file (one file, one position per frame in its functional groups) is a series
of its own.

What cannot be stacked into one regular grid is refused with a `DataError` naming the series and
the files concerned, instead of being stacked wrong: slices without position or orientation,
mixed orientations or sizes, two slices at one position (or a time series / several echoes at the
same positions: 4D), missing slices and unevenly spaced ones, gantry tilt (slices that shift
in-plane along the stack), colour images, and a series of one slice (a 2D image: read it as one).
Voxel values are modality values (rescale slope and intercept applied: HU for CT), as float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import pixel_array

from medrpn.data.dicom import modality_values, read_dataset
from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES, check_decoded_size
from medrpn.data.volume import Volume, VolumeGeometry
from medrpn.errors import DataError

# Slice steps may differ by this fraction of their median (scanners write positions rounded to a
# few decimals); a larger difference is a missing slice or an uneven series.
STEP_TOLERANCE = 0.05
# Orientation cosines within this are the same orientation.
ORIENTATION_TOLERANCE = 1e-3
# A stack whose step leaves the slice normal by more than this angle has a gantry tilt.
TILT_TOLERANCE_DEG = 0.5
META_KEYWORDS = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID", "Modality", "SeriesDescription")


@dataclass
class _Slice:
    """One 2D slice of a series: a file, or one frame of a multi-frame file."""

    path: Path
    frame: int | None
    position: np.ndarray
    orientation: np.ndarray
    spacing: tuple[float, float]
    size: tuple[int, int]

    @property
    def name(self) -> str:
        return self.path.name if self.frame is None else f"{self.path.name} frame {self.frame}"


def find_series(folder: str | Path) -> dict[str, list[Path]]:
    """DICOM image files under `folder` (recursively) by SeriesInstanceUID, read header only.
    Files that are not DICOM, or hold no pixels (DICOMDIR, reports), are left out."""
    folder = Path(folder)
    series: dict[str, list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, AttributeError, KeyError, TypeError):
            continue
        if "Rows" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID") or "")
        if not uid:
            raise DataError(path, "a DICOM image without SeriesInstanceUID: it cannot be grouped into a series")
        series.setdefault(uid, []).append(path)
    return series


def read_dicom_series(
    folder: str | Path, series_uid: str | None = None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> Volume:
    """The DICOM series in `folder` (the one named by `series_uid` when it holds several) as a `Volume`."""
    stack = _Stack.of(folder, series_uid, max_decoded_bytes)
    rows, columns = stack.slices[0].size
    array = np.empty((columns, rows, len(stack.slices)), dtype=np.float32)
    for k, s in enumerate(stack.slices):
        array[:, :, k] = _modality_slice(stack.datasets[s.path], s).T  # (rows, columns) -> (i, j)
    return Volume.from_file_array(array, stack.affine, stack.where, stack.meta())


def read_dicom_series_geometry(
    folder: str | Path, series_uid: str | None = None, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> VolumeGeometry:
    """The `VolumeGeometry` of the series in `folder`, from its headers alone."""
    stack = _Stack.of(folder, series_uid, max_decoded_bytes)
    rows, columns = stack.slices[0].size
    return VolumeGeometry.from_file_affine((columns, rows, len(stack.slices)), stack.affine)


@dataclass
class _Stack:
    """A series' slices checked and ordered along the normal, with their headers (pixels unread)."""

    where: str
    datasets: dict[Path, Dataset]
    slices: list[_Slice]
    affine: np.ndarray

    @classmethod
    def of(cls, folder: str | Path, series_uid: str | None, max_decoded_bytes: int) -> _Stack:
        folder = Path(folder)
        groups = find_series(folder)
        if not groups:
            raise DataError(folder, "no DICOM images in this folder")
        if series_uid is None:
            if len(groups) > 1:
                listed = "; ".join(f"{uid} ({len(files)} files)" for uid, files in groups.items())
                raise DataError(folder, f"{len(groups)} series in one folder ({listed}): give one folder per series, or name the series")
            series_uid = next(iter(groups))
        if series_uid not in groups:
            raise DataError(folder, f"no series {series_uid} here; found {', '.join(groups)}")
        where = f"{folder} (series {series_uid})"
        datasets = {path: read_dataset(path, max_decoded_bytes, defer=True) for path in groups[series_uid]}
        slices, step = _order([s for path, ds in datasets.items() for s in _slices_of(path, ds, where)], where)
        rows, columns = slices[0].size
        size = columns * rows * len(slices) * 4
        check_decoded_size(where, f"{columns} x {rows} x {len(slices)} voxels as float32", size, max_decoded_bytes)
        first = slices[0]
        row_dir, col_dir = first.orientation[:3], first.orientation[3:]
        affine = np.eye(4)
        affine[:3, 0] = row_dir * first.spacing[1]  # i moves along a row: one column apart
        affine[:3, 1] = col_dir * first.spacing[0]  # j moves down a column: one row apart
        affine[:3, 2] = np.cross(row_dir, col_dir) * step
        affine[:3, 3] = first.position
        return cls(where, datasets, slices, affine)

    def meta(self) -> dict:
        ds = self.datasets[self.slices[0].path]
        meta = {k: str(ds.get(k)) for k in META_KEYWORDS if ds.get(k) not in (None, "")}
        # for references (SR, GSPS) to each slice: its instance, and its frame in a multi-frame file
        meta["SOPInstanceUIDs"] = [str(self.datasets[s.path].SOPInstanceUID) for s in self.slices]
        meta["SliceFiles"] = [str(s.path) for s in self.slices]
        if self.slices[0].frame is not None:
            meta["SliceFrames"] = [s.frame + 1 for s in self.slices]  # DICOM counts frames from 1
        return meta


def _slices_of(path: Path, ds: Dataset, where: str) -> list[_Slice]:
    """The slice(s) of one file, with position, orientation and spacing from its header."""
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise DataError(path, f"a colour image in {where}: volumes are grey")
    size = (int(ds.Rows), int(ds.Columns))
    frames = int(ds.get("NumberOfFrames") or 1)
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
        out = []
        for frame, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
            position = _group_value(group, shared, "PlanePositionSequence", "ImagePositionPatient")
            orientation = _group_value(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
            spacing = _group_value(group, shared, "PixelMeasuresSequence", "PixelSpacing")
            out.append(_make_slice(path, frame, position, orientation, spacing, size, where))
        return out
    if frames > 1:
        raise DataError(path, f"a multi-frame file without a position per frame in {where}: its frames cannot be placed in 3D")
    return [_make_slice(path, None, ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient"), ds.get("PixelSpacing"), size, where)]


def _group_value(group: Dataset, shared: Dataset, sequence: str, keyword: str):
    for source in (group, shared):
        items = source.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return None


def _make_slice(path: Path, frame: int | None, position, orientation, spacing, size, where: str) -> _Slice:
    what = path.name if frame is None else f"{path.name} frame {frame}"
    try:
        pos = np.array([float(v) for v in position], dtype=float)
        ori = np.array([float(v) for v in orientation], dtype=float)
        sp = tuple(float(v) for v in spacing)
    except (TypeError, ValueError) as e:
        raise DataError(
            path, f"{what} of {where} lacks a valid ImagePositionPatient, ImageOrientationPatient or PixelSpacing: it cannot be placed in 3D"
        ) from e
    if pos.shape != (3,) or ori.shape != (6,) or len(sp) != 2 or min(sp) <= 0 or not (np.isfinite(pos).all() and np.isfinite(ori).all()):
        raise DataError(path, f"{what} of {where} has an invalid position ({position}), orientation ({orientation}) or spacing ({spacing})")
    row, col = ori[:3], ori[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-2 or abs(np.linalg.norm(col) - 1) > 1e-2 or abs(row @ col) > 1e-2:
        raise DataError(path, f"{what} of {where}: ImageOrientationPatient {list(ori)} is not two perpendicular unit vectors")
    return _Slice(path, frame, pos, ori, sp, size)  # type: ignore[arg-type]


def _order(slices: list[_Slice], where: str) -> tuple[list[_Slice], float]:
    """Slices sorted along the normal, and the step between them; a `DataError` for what cannot be a regular grid."""
    if len(slices) == 1:
        raise DataError(slices[0].path, f"{where} has a single slice: it is a 2D image, not a volume (read it as an image)")
    first = slices[0]
    for s in slices[1:]:
        if s.size != first.size:
            raise DataError(s.path, f"{where} mixes image sizes: {s.name} is {s.size[1]} x {s.size[0]}, {first.name} {first.size[1]} x {first.size[0]}")
        if np.abs(s.orientation - first.orientation).max() > ORIENTATION_TOLERANCE:
            raise DataError(
                s.path,
                f"{where} mixes orientations ({s.name}: {np.round(s.orientation, 4).tolist()}, "
                f"{first.name}: {np.round(first.orientation, 4).tolist()}); a localizer or a second plane in the series?",
            )
        if not np.allclose(s.spacing, first.spacing, rtol=1e-3):
            raise DataError(s.path, f"{where} mixes pixel spacings: {s.name} {s.spacing}, {first.name} {first.spacing}")
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    ordered = sorted(slices, key=lambda s: float(s.position @ normal))
    depth = np.array([s.position @ normal for s in ordered])
    steps = np.diff(depth)
    same = steps < 1e-3
    if same.any():
        _refuse_same_positions(ordered, same, depth, where)
    step = float(np.median(steps))
    uneven = np.abs(steps - step) > STEP_TOLERANCE * step
    if uneven.any():
        at = int(np.argmax(uneven))
        a, b = ordered[at], ordered[at + 1]
        gap = steps[at]
        missing = round(gap / step) - 1
        what = f"{missing} slice(s) missing" if missing >= 1 and abs(gap - (missing + 1) * step) <= STEP_TOLERANCE * step else "uneven slice spacing"
        raise DataError(
            a.path,
            f"{where}: {what} between {a.name} and {b.name} ({gap:.3f} mm apart, the series' step is {step:.3f} mm); "
            "a volume needs evenly spaced slices",
        )
    shift = ordered[-1].position - ordered[0].position
    tilt = np.degrees(np.arccos(min(1.0, abs(shift @ normal) / np.linalg.norm(shift))))
    if tilt > TILT_TOLERANCE_DEG:
        raise DataError(
            first.path,
            f"{where}: the slices shift in-plane along the stack ({tilt:.1f} degrees from the slice normal: gantry tilt); "
            "resample the series to an orthogonal grid first (e.g. dcm2niix, which corrects tilt)",
        )
    return ordered, step


def _refuse_same_positions(ordered: list[_Slice], same: np.ndarray, depth: np.ndarray, where: str) -> None:
    """A `DataError` for slices sharing a position: 4D data when every position holds the same
    number of images, duplicated slices otherwise."""
    _, counts = np.unique(np.round(depth, 3), return_counts=True)
    if counts.min() == counts.max() > 1:
        raise DataError(
            ordered[0].path,
            f"{where} holds {counts[0]} images at each of its {len(counts)} positions: 4D data (a time series, "
            "several echoes or b-values); split it into one 3D series per time point or echo",
        )
    at = int(np.argmax(same))
    raise DataError(
        ordered[at].path,
        f"{where}: {ordered[at].name} and {ordered[at + 1].name} lie at the same position: duplicated slices",
    )


def _modality_slice(ds: Dataset, s: _Slice) -> np.ndarray:
    """One slice's stored values through its rescale (modality values), (rows, columns) float32."""
    try:
        arr = pixel_array(ds, index=s.frame) if s.frame is not None else pixel_array(ds)
    except Exception as e:  # codecs raise many types on damaged data
        raise DataError(s.path, f"the pixel data is truncated or corrupt ({e})") from e
    if s.frame is None:
        return modality_values(arr, ds, s.path)
    group = ds.PerFrameFunctionalGroupsSequence[s.frame]
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    slope = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleSlope")
    intercept = _group_value(group, shared, "PixelValueTransformationSequence", "RescaleIntercept")
    values = arr.astype(np.float32)
    values *= float(slope) if slope not in (None, "") else 1.0
    values += float(intercept) if intercept not in (None, "") else 0.0
    return values
