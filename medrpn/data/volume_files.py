"""Volumes stored in one file: NIfTI (.nii, .nii.gz) through nibabel, MetaImage (.mhd + .raw,
LUNA16's format) and NRRD (.nrrd, .nhdr) through SimpleITK; and `read_volume`, which also takes
a DICOM series folder (`medrpn.data.dicom_series`).

Each header is read first and the volume refused (`DataError`) when it is not 3D or declares
more decoded data than `max_decoded_bytes` (the decompression-bomb guard of `medrpn.data.limits`);
then the voxels are read as float32 and turned into medrpn's LPS orientation (`medrpn.data.volume`).
NIfTI's world is RAS; ITK's (MetaImage, NRRD) and DICOM's is LPS.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES, check_decoded_size
from medrpn.data.volume import RAS_TO_LPS, Volume, VolumeGeometry
from medrpn.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".mhd", ".mha", ".nrrd", ".nhdr")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
FLOAT32_BYTES = 4


def is_volume_file(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def read_volume(path: str | Path, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> Volume:
    """A NIfTI, MetaImage or NRRD file, or a folder holding one DICOM series, as a `Volume`."""
    path = Path(path)
    if path.is_dir():
        from medrpn.data.dicom_series import read_dicom_series

        return read_dicom_series(path, max_decoded_bytes=max_decoded_bytes)
    if _kind(path) == "nifti":
        image, shape = _open_nifti(path, max_decoded_bytes)
        try:
            array = np.asarray(image.dataobj, dtype=np.float32).reshape(shape)
        except (OSError, ValueError, EOFError, zlib.error) as e:
            raise DataError(path, f"the voxel data is truncated or corrupt ({e})") from e
        return Volume.from_file_array(array, _nifti_affine(path, image), str(path))
    import SimpleITK as sitk

    reader, _ = _open_itk(path, max_decoded_bytes)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        raise DataError(path, f"the voxel data is missing, truncated or corrupt ({_itk_reason(e)})") from e
    array = sitk.GetArrayViewFromImage(image).astype(np.float32).transpose(2, 1, 0)  # ITK's (z, y, x) -> (i, j, k)
    return Volume.from_file_array(array, _itk_affine(path, image), str(path))


def read_volume_geometry(path: str | Path, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> VolumeGeometry:
    """The `VolumeGeometry` of a volume file or DICOM series folder, from its header(s) alone."""
    path = Path(path)
    if path.is_dir():
        from medrpn.data.dicom_series import read_dicom_series_geometry

        return read_dicom_series_geometry(path, max_decoded_bytes=max_decoded_bytes)
    if _kind(path) == "nifti":
        image, shape = _open_nifti(path, max_decoded_bytes)
        return VolumeGeometry.from_file_affine(shape, _nifti_affine(path, image))
    reader, shape = _open_itk(path, max_decoded_bytes)
    return VolumeGeometry.from_file_affine(shape, _itk_affine(path, reader))


def _kind(path: Path) -> str:
    if not path.exists():
        raise DataError(path, "no such file or folder")
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(ITK_SUFFIXES):
        return "itk"
    raise DataError(path, f"not a volume file: expected a DICOM series folder or one of {', '.join(VOLUME_SUFFIXES)}")


def _open_nifti(path: Path, max_decoded_bytes: int):
    """(nibabel image with its voxels unread, 3D shape), the size checked against the limit."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        image = nib.load(str(path))
    except (ImageFileError, OSError, ValueError, EOFError) as e:
        raise DataError(path, f"unreadable NIfTI header ({e})") from e
    shape = _three_d(path, tuple(int(n) for n in image.shape))
    _check_size(path, shape, max_decoded_bytes)
    return image, shape


def _open_itk(path: Path, max_decoded_bytes: int):
    """(SimpleITK reader with the header read, 3D shape), the size checked against the limit."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise DataError(path, f"unreadable image header ({_itk_reason(e)})") from e
    if reader.GetNumberOfComponents() != 1:
        raise DataError(path, f"{reader.GetNumberOfComponents()} values per voxel (a colour or vector image); medrpn reads grey volumes")
    shape = _three_d(path, tuple(int(n) for n in reader.GetSize()))
    _check_size(path, shape, max_decoded_bytes)
    return reader, shape


def _three_d(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3D shape, allowing trailing axes of length 1; a `DataError` for 2D or 4D data."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) == 4:
        raise DataError(
            path,
            f"4D data ({' x '.join(map(str, shape))}: a time series or several sequences in one file); "
            "medrpn reads one 3D volume per file: split it into 3D files",
        )
    if len(shape) != 3:
        raise DataError(path, f"not a 3D volume: its shape is {' x '.join(map(str, shape))}")
    if min(shape) < 1:
        raise DataError(path, f"an empty volume ({' x '.join(map(str, shape))} voxels)")
    return shape  # type: ignore[return-value]


def _check_size(path: Path, shape: tuple[int, ...], limit: int) -> None:
    size = int(np.prod(shape)) * FLOAT32_BYTES
    check_decoded_size(path, f"{' x '.join(map(str, shape))} voxels as float32", size, limit)


def _nifti_affine(path: Path, image) -> np.ndarray:
    """A NIfTI's voxel -> LPS mm map (its own world is RAS)."""
    return _checked(path, RAS_TO_LPS @ np.asarray(image.affine, dtype=float))


def _itk_affine(path: Path, image) -> np.ndarray:
    """An ITK image's (or image reader's) voxel -> LPS mm map, from its direction, spacing and origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3) * np.asarray(image.GetSpacing(), dtype=float)
    affine[:3, 3] = image.GetOrigin()
    return _checked(path, affine)


def _checked(path: Path, affine: np.ndarray) -> np.ndarray:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(path, "the header's voxel-to-world transform (spacing, direction) is invalid or singular")
    return affine


def _itk_reason(error: RuntimeError) -> str:
    """The last line of ITK's multi-line exception text, which says what went wrong."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else "ITK could not read it"
