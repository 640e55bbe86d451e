"""Reading one 2D image file (DICOM, PNG, JPEG) into an `Image` whose intensities lie in [0, 1].

DICOM goes through plain pydicom (not MONAI's LoadImage, about 3x slower on 16-bit files) and the
standard display pipeline: decode -> Modality LUT -> VOI LUT or window -> [0, 1] -> invert
MONOCHROME1, so that bright means dense in every image the detector sees. PNG and JPEG go through
PIL and are scaled by their bit depth. Every failure a user can meet (missing file, not an image,
a DICOM without pixels, no decoder, truncated data) is a `DataError` naming the file.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array

from medrpn.data.records import Image
from medrpn.errors import DataError

# Luminance weights of ITU-R BT.601, the ones PIL uses for its "L" mode.
_LUMA = np.array([0.299, 0.587, 0.114])

# Percentiles mapped to 0 and 1 when a DICOM file carries no VOI LUT and no window.
_PERCENTILES = (0.5, 99.5)

# Identifiers copied into `Image.meta` (never pixel data, never the patient's name).
META_KEYWORDS = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "PatientID",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def read_image(path: str | Path) -> Image:
    """Read a DICOM, PNG or JPEG file, choosing the reader from the file's content, else its suffix.

    A file whose bytes 128-131 spell ``DICM`` is DICOM whatever its name (DICOM files are often
    named by UID, e.g. ``1.2.840.113619.3``); so is one ending in ``.dcm``/``.dicom`` or with no suffix.
    """
    path = _existing_file(path)
    if _has_dicom_magic(path):
        return read_dicom(path)
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        known = ", ".join(repr(s) if s else "no suffix" for s in _READERS)
        raise DataError(path, f"unknown image type {path.suffix!r}: expected one of {known}")
    return reader(path)


def read_dicom(path: str | Path, frame: int = 0) -> Image:
    """Read one frame of a DICOM file as a grey image in [0, 1], bright = dense.

    Args:
        path: the DICOM file (compressed transfer syntaxes decode through the pylibjpeg plugins).
        frame: which frame of a multi-frame file to return (0-based).

    Grey images pass the Modality LUT (rescale slope/intercept or a LUT sequence), then the file's
    first VOI LUT, else its first window, mapped onto [0, 1] by that transform's output range; a file
    with neither is stretched between its 0.5th and 99.5th percentiles. MONOCHROME1 is inverted.
    Colour images (RGB, YBR_*, PALETTE COLOR) become their luminance, scaled by their bit depth.
    """
    path = _existing_file(path)
    ds = _read_dataset(path)
    arr = _decode_frame(ds, path, frame)
    if arr.ndim == 3:
        unit = _luminance(arr) / (2 ** int(ds.BitsStored) - 1)
    elif ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as e:
            raise DataError(path, f"the palette colour lookup table is invalid ({e})") from e
        unit = _luminance(rgb) / np.iinfo(rgb.dtype).max
    else:
        unit = _grey_to_unit(arr, ds, path)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            unit = 1.0 - unit
    return Image(array=unit.astype(np.float32), spacing=_spacing(ds), meta=_meta(ds))


def read_png(path: str | Path) -> Image:
    """Read a PNG or JPEG file with PIL as a grey image in [0, 1] (colour -> luminance).

    8-bit images are divided by 255 and 16-bit ones by 65535; there is no spacing in these formats.
    """
    path = _existing_file(path)
    try:
        with PIL.Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey ("I" in older Pillow)
                arr = np.asarray(img).astype(np.float64) / 65535.0
            elif img.mode == "L":
                arr = np.asarray(img).astype(np.float64) / 255.0
            else:  # RGB, RGBA, palette, 1-bit, grey + alpha, CMYK ...
                arr = _luminance(np.asarray(img.convert("RGB"))) / 255.0
    except PIL.UnidentifiedImageError as e:
        raise DataError(path, "not a readable PNG or JPEG image (empty file or unknown content)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(path, f"image data is truncated or corrupt ({e})") from e
    if arr.ndim != 2 or arr.size == 0:
        raise DataError(path, f"expected a 2D image, got an array of shape {arr.shape}")
    return Image(array=np.clip(arr, 0.0, 1.0).astype(np.float32), spacing=None, meta={})


_READERS: dict[str, Callable[[Path], Image]] = {
    ".dcm": read_dicom,
    ".dicom": read_dicom,
    "": read_dicom,
    ".png": read_png,
    ".jpg": read_png,
    ".jpeg": read_png,
}


def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if not path.is_file():
        raise DataError(path, "not a file (is it a directory?)")
    return path


def _has_dicom_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM"


def _read_dataset(path: Path) -> Dataset:
    """Parse the file and make sure it holds an image; pixel data stays encoded."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as e:
        raise DataError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from e
    except Exception as e:  # pydicom raises many types on damaged headers
        raise DataError(path, f"unreadable DICOM header, the file may be truncated or corrupt ({e})") from e
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        kind = sop_class.name if sop_class else "DICOM object of unknown type"
        # pydicom stops quietly where a file is cut off (dropping the whole data set when a
        # compressed pixel element is cut), so an image without pixels is a truncated one
        if len(ds) == 0 or "Rows" in ds or "Image" in kind:
            raise DataError(path, f"no pixel data in this {kind} file: it looks truncated or corrupt")
        raise DataError(
            path,
            f"this DICOM file has no pixel data: it is a {kind}, not an image "
            "(structured reports and presentation states hold no pixels)",
        )
    return ds


def _decode_frame(ds: Dataset, path: Path, frame: int) -> np.ndarray:
    """Decode one frame: (H, W) for grey and palette, (H, W, 3) RGB for colour (YBR converted)."""
    n_frames = int(ds.get("NumberOfFrames") or 1)
    if not 0 <= frame < n_frames:
        raise DataError(path, f"frame {frame} requested but the file has {n_frames} frame(s)")
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is not None:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as e:
            raise DataError(path, f"no decoder exists for transfer syntax '{ts.name}' ({ts})") from e
        if not decoder.is_available:
            options = "; ".join(decoder.missing_dependencies) or "a pydicom decoding plugin"
            raise DataError(
                path, f"no installed decoder for transfer syntax '{ts.name}' ({ts}); install one of: {options}"
            )
    try:
        return pixel_array(ds, index=frame)
    except Exception as e:  # ValueError for short data, RuntimeError from codecs, ...
        raise DataError(path, f"the pixel data is truncated or corrupt ({e})") from e


def _grey_to_unit(arr: np.ndarray, ds: Dataset, path: Path) -> np.ndarray:
    """Modality LUT, then VOI LUT / window / percentiles, mapped and clipped into [0, 1].

    A VOI LUT or window pydicom rejects (e.g. a zero window width) falls back to percentiles:
    a bad display hint should not make the pixels unusable.
    """
    try:
        values = apply_modality_lut(arr, ds)
    except Exception as e:
        raise DataError(path, f"the Modality LUT (rescale slope/intercept or LUT sequence) is invalid ({e})") from e
    try:
        out, lo, hi = _voi(values, ds)
    except (ValueError, TypeError, IndexError, AttributeError):
        out, lo, hi = values, *np.percentile(values, _PERCENTILES)
    out = np.asarray(out, dtype=np.float64)
    if hi == lo:  # a flat image: all zeros rather than a division by zero
        return np.zeros(out.shape)
    return np.clip((out - lo) / (hi - lo), 0.0, 1.0)


def _voi(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray, float, float]:
    """Apply the file's first VOI LUT, else its first window, else nothing; with the output range."""
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return apply_voi(values, ds, index=0), 0.0, 2.0**bits - 1
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # pydicom sends values below/above the window to the ends of its output range; ask it for
        # them instead of re-deriving its rules (bit depth, signedness, rescale, modality LUT).
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
        return apply_windowing(values, ds, index=0), float(lo), float(hi)
    lo, hi = np.percentile(values, _PERCENTILES)
    return values, float(lo), float(hi)


def _luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., :3].astype(np.float64) @ _LUMA


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing, else ImagerPixelSpacing, as (row, column) mm; None if absent or not positive."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return (row, col)
    return None


def _meta(ds: Dataset) -> dict[str, str | int]:
    meta: dict[str, str | int] = {}
    for keyword in META_KEYWORDS:
        value = ds.get(keyword)
        if value is not None and value != "":
            meta[keyword] = int(value) if keyword in ("Rows", "Columns") else str(value)
    return meta
