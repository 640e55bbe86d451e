"""Reading one 2D image (DICOM, NIfTI slice, PNG, JPEG, PGM/PPM, TIFF) into an `Image` in [0, 1].

`read_image` picks the reader from the file's content (a DICOM preamble), else its suffix. How
intensities are windowed, whether colour is kept, which NIfTI axis is sliced and what spacing a
PNG has are the `ReadConfig` (`data.read` in a config). DICOM goes through plain pydicom
(`medrpn.data.dicom`), NIfTI through nibabel (`medrpn.data.nifti`), the raster formats
(`RASTER_SUFFIXES`) through PIL.
Every failure a user can meet is a `DataError` naming the file, a file whose header declares more
decoded pixels than `ReadConfig.max_decoded_bytes` included (refused before decoding: `medrpn.data.limits`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import PIL.Image
import PIL.ImageMode

from medrpn.data import dicom, nifti
from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES, check_decoded_size
from medrpn.data.records import Image
from medrpn.data.windows import WindowConfig, linear_window, percentile_window, stretch
from medrpn.errors import ConfigError, DataError

META_KEYWORDS = dicom.META_KEYWORDS


@dataclass
class ReadConfig:
    """How image files become arrays in [0, 1].

    Attributes:
        window: intensity window (see `medrpn.data.windows`): the file's own, a named CT window,
            a fixed centre/width or percentiles.
        channels: 1 turns colour images grey (ITU-R BT.601 luminance); 3 keeps colour as
            (H, W, 3) and repeats grey images into three channels (set the backbone's
            in_channels to match).
        axis: the plane NIfTI volumes are sliced in: "axial", "coronal" or "sagittal".
        spacing: pixel spacing (row, column) in mm assumed for images that carry none (PNG,
            JPEG); None leaves it unknown (no millimetres in check-data or findings).
        max_decoded_bytes: a file whose header declares more decoded pixel data (all frames,
            samples and bytes per sample; a NIfTI's whole volume) is refused before decoding
            and reported as unreadable: a guard against decompression bombs (`medrpn.data.limits`).
    """

    window: WindowConfig = field(default_factory=WindowConfig)
    channels: int = 1
    axis: str = "axial"
    spacing: list[float] | None = None
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES

    def __post_init__(self) -> None:
        if isinstance(self.window, dict):
            self.window = WindowConfig(**self.window)
        if self.channels not in (1, 3):
            raise ConfigError(f"data.read.channels must be 1 or 3, got {self.channels}")
        if self.axis not in nifti.AXES:
            raise ConfigError(f"data.read.axis: unknown slice axis {self.axis!r}; choose one of {', '.join(nifti.AXES)}")
        if self.spacing is not None and (len(self.spacing) != 2 or min(self.spacing) <= 0):
            raise ConfigError(f"data.read.spacing must be two positive numbers (row, column) mm, got {self.spacing}")
        if self.max_decoded_bytes < 1:
            raise ConfigError(f"data.read.max_decoded_bytes must be a positive byte count, got {self.max_decoded_bytes}")

    @classmethod
    def parse(cls, value: ReadConfig | dict[str, Any] | None) -> ReadConfig:
        """Accept the dataclass, the plain dict stored in a checkpoint, or None (defaults)."""
        if isinstance(value, cls):
            return value
        return cls(**(value or {}))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_image(path: str | Path, frame: int | None = None, config: ReadConfig | None = None) -> Image:
    """Read a DICOM, NIfTI, PNG or JPEG file as one 2D image.

    A file whose bytes 128-131 spell ``DICM`` is DICOM whatever its name (DICOM files are often
    named by UID, e.g. ``1.2.840.113619.3``); so is one ending in ``.dcm``/``.dicom`` or with no suffix.

    Args:
        path: the image file.
        frame: frame of a multi-frame DICOM, or slice of a NIfTI volume; None for the first/only one.
        config: reading settings; defaults to `ReadConfig()`.
    """
    path = _existing_file(path)
    config = config or ReadConfig()
    reader = _reader_for(path)
    image = reader(path, frame, config)
    if image.spacing is None and config.spacing is not None:
        image.spacing = (float(config.spacing[0]), float(config.spacing[1]))
    return image


def read_dicom(path: str | Path, frame: int = 0, config: ReadConfig | None = None) -> Image:
    """One frame of a DICOM file (see `medrpn.data.dicom.decode_dicom`)."""
    config = config or ReadConfig()
    array, spacing, meta = dicom.decode_dicom(
        _existing_file(path), frame or 0, config.window, config.channels == 3, config.max_decoded_bytes
    )
    return Image(_channels(array, config.channels), spacing, meta)


def read_nifti(path: str | Path, frame: int | None = None, config: ReadConfig | None = None) -> Image:
    """One slice of a NIfTI volume (see `medrpn.data.nifti.decode_nifti`)."""
    config = config or ReadConfig()
    array, spacing, meta = nifti.decode_nifti(
        _existing_file(path), frame, config.axis, config.window, config.max_decoded_bytes
    )
    return Image(_channels(array, config.channels), spacing, meta)


def read_raster(path: str | Path, frame: int | None = None, config: ReadConfig | None = None) -> Image:
    """Read a PNG, JPEG, PGM/PPM/PBM or TIFF file with PIL into [0, 1]; these formats carry no spacing.

    Window "file": 8-bit images are divided by 255, 16-bit ones by 65535, 32-bit float ones
    (TIFF) stretched from their minimum to their maximum. "fixed" and named windows apply to the
    stored values, "percentile" to the image's own percentiles. Colour images become their
    luminance (or stay RGB with `channels: 3`). A multi-page TIFF is read page by page: `frame`
    is the page, and must be given when there are several.
    """
    path = _existing_file(path)
    config = config or ReadConfig()
    try:
        with _open_raster(path) as img:
            _seek_page(path, img, frame)
            _check_raster_size(path, img, config.max_decoded_bytes)
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey ("I" in older Pillow)
                raw, full = np.asarray(img).astype(np.float32), 65535.0
            elif img.mode == "F":  # 32-bit float grey (TIFF)
                raw = np.asarray(img).astype(np.float32)
                full = None
            elif img.mode in ("L", "LA", "1"):  # grey, grey + alpha, 1-bit: one channel, exactly
                raw, full = np.asarray(img.convert("L")).astype(np.float32), 255.0
            else:  # RGB, RGBA, palette, CMYK ...
                raw, full = np.asarray(img.convert("RGB")), 255.0
                raw = dicom.luminance(raw) if config.channels == 1 else raw.astype(np.float32)
    except PIL.UnidentifiedImageError as e:
        raise DataError(path, f"not a readable {_raster_kind(path)} image (empty file or unknown content)") from e
    except PermissionError as e:
        raise DataError(path, "permission denied") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(path, f"image data is truncated or corrupt ({e})") from e
    if raw.ndim not in (2, 3) or raw.size == 0:
        raise DataError(path, f"expected a 2D image, got an array of shape {raw.shape}")
    if not np.isfinite(raw).all():
        raise DataError(path, "the image holds values that are not finite numbers (nan or inf)")
    window = config.window
    if window.fixed_window is not None:
        unit = linear_window(raw, *window.fixed_window)
    elif window.mode == "percentile":
        unit = percentile_window(raw, window.percentiles)
    elif full is None:
        unit = stretch(raw, float(raw.min()), float(raw.max()))
    else:
        unit = raw / full
    return Image(_channels(np.clip(unit, 0.0, 1.0), config.channels), None, {})


def _raster_kind(path: Path) -> str:
    return {".pgm": "PGM", ".ppm": "PPM", ".pbm": "PBM", ".pnm": "PNM", ".tif": "TIFF", ".tiff": "TIFF"}.get(
        path.suffix.lower(), "PNG or JPEG"
    )


def _seek_page(path: Path, img: PIL.Image.Image, frame: int | None) -> None:
    """Go to page `frame` of a multi-page file (TIFF); a file of one page holds only frame 0 (or None)."""
    pages = int(getattr(img, "n_frames", 1) or 1)
    if frame is None:
        if pages > 1:
            raise DataError(path, f"a multi-page file of {pages} pages: name the page (the annotation's frame column)")
        return
    if not 0 <= frame < pages:
        raise DataError(path, f"frame {frame} requested but the file holds {pages} page(s)")
    img.seek(frame)


class ImageInfo(NamedTuple):
    """What the header of an image file says: size, spacing (row, col) mm or None, identifiers."""

    height: int
    width: int
    spacing: tuple[float, float] | None
    meta: dict[str, Any]


def probe_image(path: str | Path, frame: int | None = None, config: ReadConfig | None = None) -> ImageInfo:
    """Size, spacing and identifiers of an image without decoding its pixels.

    Checks what can be checked cheaply (file exists, header parses, a DICOM holds pixel data with an
    installed decoder, the frame/slice exists, a NIfTI has the right dimensionality); a file cut
    inside its pixel data still passes and fails later in `read_image`.
    """
    path = _existing_file(path)
    config = config or ReadConfig()
    reader = _reader_for(path)
    default = None if config.spacing is None else (float(config.spacing[0]), float(config.spacing[1]))
    if reader is _read_dicom_any:
        height, width, spacing, meta = dicom.probe_dicom(path, frame or 0, config.max_decoded_bytes)
        return ImageInfo(height, width, spacing or default, meta)
    if reader is _read_nifti_any:
        return ImageInfo(*nifti.probe_nifti(path, frame, config.axis, config.max_decoded_bytes))
    try:
        with _open_raster(path) as img:
            _seek_page(path, img, frame)
            _check_raster_size(path, img, config.max_decoded_bytes)
            width, height = img.size
    except PIL.UnidentifiedImageError as e:
        raise DataError(path, f"not a readable {_raster_kind(path)} image (empty file or unknown content)") from e
    except OSError as e:
        raise DataError(path, f"unreadable image ({e})") from e
    return ImageInfo(height, width, default, {})


def _open_raster(path: Path) -> PIL.Image.Image:
    """Open a PNG/JPEG/PGM/TIFF (header only). Pillow's own decompression bomb guard is replaced by
    `_check_raster_size`: its warning is silenced, and its error (over twice
    `PIL.Image.MAX_IMAGE_PIXELS`) becomes a `DataError`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            return PIL.Image.open(path)
    except PIL.Image.DecompressionBombError as e:
        raise DataError(path, f"too many pixels, Pillow refuses it as a possible decompression bomb ({e})") from e


def _check_raster_size(path: Path, img: PIL.Image.Image, max_decoded_bytes: int) -> None:
    """Refuse a raster image whose decoded pixels (Pillow's mode: bands x bytes per band) exceed the limit."""
    width, height = img.size
    mode = PIL.ImageMode.getmode(img.mode)
    bands, band_bytes = len(mode.bands), np.dtype(mode.typestr).itemsize
    declared = f"{width} x {height} pixels x {bands} band(s) x {band_bytes} byte(s) (Pillow mode {img.mode})"
    check_decoded_size(path, declared, width * height * bands * band_bytes, max_decoded_bytes)


def _read_dicom_any(path: Path, frame: int | None, config: ReadConfig) -> Image:
    return read_dicom(path, frame or 0, config)


def _read_nifti_any(path: Path, frame: int | None, config: ReadConfig) -> Image:
    return read_nifti(path, frame, config)


# Files PIL reads: PNG, JPEG, the Netpbm family (mini-MIAS mammograms ship as PGM) and TIFF.
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".ppm", ".pbm", ".pnm", ".tif", ".tiff")
_READERS: dict[str, Callable[[Path, int | None, ReadConfig], Image]] = {
    ".dcm": _read_dicom_any,
    ".dicom": _read_dicom_any,
    "": _read_dicom_any,
    **{suffix: read_raster for suffix in RASTER_SUFFIXES},
    ".nii": _read_nifti_any,
    ".nii.gz": _read_nifti_any,
}
IMAGE_SUFFIXES = tuple(_READERS)


def _reader_for(path: Path) -> Callable[[Path, int | None, ReadConfig], Image]:
    if _has_dicom_magic(path):
        return _read_dicom_any
    suffix = ".nii.gz" if nifti.is_nifti(path) and path.name.lower().endswith(".gz") else path.suffix.lower()
    reader = _READERS.get(suffix)
    if reader is None:
        known = ", ".join(repr(s) if s else "no suffix" for s in _READERS)
        raise DataError(path, f"unknown image type {path.suffix!r}: expected one of {known}")
    return reader


def _channels(array: np.ndarray, channels: int) -> np.ndarray:
    """float32 (H, W) for one channel, (H, W, 3) for three (grey repeated)."""
    array = np.asarray(array, dtype=np.float32)
    if channels == 3 and array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    return array


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    try:
        if not path.exists():
            raise DataError(path, "file not found")
        if not path.is_file():
            raise DataError(path, "not a file (is it a directory?)")
    except PermissionError as e:
        raise DataError(path, "permission denied (its folder cannot be read)") from e
    return path


def _has_dicom_magic(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except PermissionError as e:
        raise DataError(path, "permission denied") from e
    except OSError as e:
        raise DataError(path, f"unreadable file ({e})") from e
    return head[128:132] == b"DICM"
