"""DICOM files read with plain pydicom into an `Image` in [0, 1], bright = dense.

Plain pydicom, not MONAI's LoadImage (about 3x slower on 2048x2048 16-bit radiographs, see
bench/data_speed.py), and the standard display pipeline: decode (compressed transfer syntaxes
through the pylibjpeg plugins or gdcm) -> Modality LUT -> window (`medrpn.data.windows`) ->
[0, 1] -> invert MONOCHROME1. Every failure a user can meet (not DICOM, no pixel data, no
decoder, truncated data, a frame that does not exist, more decoded pixels declared than allowed)
is a `DataError` naming the file.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset as read_elements
from pydicom.filereader import read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_windowing, get_decoder, pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES, SETTING, check_decoded_size, human_bytes
from medrpn.data.windows import WindowConfig, linear_window, percentile_window, stretch
from medrpn.errors import DataError

# Luminance weights of ITU-R BT.601, the ones PIL uses for its "L" mode.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

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


def decode_dicom(
    path: str | Path,
    frame: int = 0,
    window: WindowConfig | None = None,
    keep_colour: bool = False,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> tuple[np.ndarray, tuple[float, float] | None, dict]:
    """Decode one frame of a DICOM file into [0, 1].

    Args:
        path: the DICOM file.
        frame: which frame of a multi-frame file (0-based).
        window: how grey values are mapped to [0, 1] (default: the file's own window).
        keep_colour: return colour images (RGB, YBR_*, PALETTE COLOR) as (H, W, 3) instead of
            their luminance.
        max_decoded_bytes: refuse a file whose header declares more decoded pixel data
            (`medrpn.data.limits`); checked before anything is decoded or inflated.

    Returns:
        (array float32 (H, W) or (H, W, 3) in [0, 1], spacing (row, col) mm or None, meta).
        Colour images are scaled by their bit depth (a window applies to grey images only).
    """
    path = Path(path)
    window = window or WindowConfig()
    ds = read_dataset(path, max_decoded_bytes)
    arr = _decode_frame(ds, path, frame)
    if arr.ndim == 3:
        rgb = arr.astype(np.float32) / (2 ** int(ds.BitsStored) - 1)
        unit = np.clip(rgb if keep_colour else luminance(rgb), 0.0, 1.0)
    elif ds.get("PhotometricInterpretation") == "PALETTE COLOR":
        _fix_big_endian_palette(ds)
        try:
            rgb = apply_color_lut(arr, ds)
        except Exception as e:
            raise DataError(path, f"the palette colour lookup table is invalid ({e})") from e
        rgb = rgb.astype(np.float32) / np.iinfo(rgb.dtype).max
        unit = np.clip(rgb if keep_colour else luminance(rgb), 0.0, 1.0)
    else:
        unit = _grey_to_unit(arr, ds, path, window)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            unit = 1.0 - unit
    return unit, spacing_of(ds), meta_of(ds)


def _fix_big_endian_palette(ds: Dataset) -> None:
    """Byte-swap 16-bit palette LUT data of a big endian file, which pydicom 3.0 reads as little endian."""
    ts = ds.file_meta.get("TransferSyntaxUID")
    if ts is None or ts.is_little_endian:
        return
    for colour in ("Red", "Green", "Blue"):
        element = f"{colour}PaletteColorLookupTableData"
        descriptor = ds.get(f"{colour}PaletteColorLookupTableDescriptor")
        if element in ds and descriptor is not None:
            entries = int(descriptor[0]) or 2**16
            data = ds[element].value
            if len(data) == 2 * entries:  # 16-bit entries
                ds[element].value = np.frombuffer(data, dtype=">u2").astype("<u2").tobytes()


def probe_dicom(
    path: str | Path, frame: int = 0, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES
) -> tuple[int, int, tuple[float, float] | None, dict]:
    """(rows, columns, spacing, meta) from the header, checking pixel data, its decoded size, decoder
    and frame; pixels stay undecoded."""
    path = Path(path)
    ds = read_dataset(path, max_decoded_bytes, defer=True)
    _check_frame_and_decoder(ds, path, frame)
    return int(ds.Rows), int(ds.Columns), spacing_of(ds), meta_of(ds)


def read_dataset(path: Path, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES, defer: bool = False) -> Dataset:
    """Parse the file and make sure it holds an image of at most `max_decoded_bytes` decoded;
    pixel data stays encoded (or unread when `defer`)."""
    check_inflated_size(path, max_decoded_bytes)
    try:
        ds = pydicom.dcmread(path, defer_size="64 KB" if defer else None)
    except InvalidDicomError as e:
        raise DataError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from e
    except PermissionError as e:
        raise DataError(path, "permission denied") from e
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
    check_declared_size(ds, path, max_decoded_bytes)
    return ds


def check_declared_size(ds: Dataset, path: Path, max_decoded_bytes: int) -> None:
    """Refuse (`DataError`) an image whose header declares more than `max_decoded_bytes` of decoded
    pixels: Rows x Columns x NumberOfFrames x SamplesPerPixel x BitsAllocated (rounded up to whole
    bytes, as decoders hand them out)."""
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as e:
        raise DataError(
            path, f"the image size in the header (Rows, Columns, BitsAllocated ...) is missing or invalid ({e})"
        ) from e
    size = rows * columns * frames * samples * -(-bits // 8)
    declared = f"{rows} x {columns} pixels x {frames} frame(s) x {samples} sample(s) x {bits} bits"
    check_decoded_size(path, declared, size, max_decoded_bytes)


def check_inflated_size(path: Path, max_decoded_bytes: int, chunk: int = 2**20) -> None:
    """Refuse (`DataError`) a Deflated Explicit VR Little Endian file whose data set inflates to more
    than `max_decoded_bytes`; other files pass untouched.

    pydicom inflates such a data set whole, before reading even its header (`stop_before_pixels`
    does not help), so a few hundred kilobytes can become gigabytes there. Here the stream is
    inflated a chunk at a time and only counted, never kept.
    """
    start = _deflated_data_start(path)
    if start is None:
        return
    inflater, inflated = zlib.decompressobj(-zlib.MAX_WBITS), 0
    try:
        with open(path, "rb") as f:
            f.seek(start)
            while not inflater.eof:
                data = inflater.unconsumed_tail or f.read(chunk)
                if not data:
                    break
                inflated += len(inflater.decompress(data, chunk))
                if inflated > max_decoded_bytes:
                    raise DataError(
                        path,
                        f"its deflated data set inflates to more than {human_bytes(max_decoded_bytes)}, over the "
                        f"limit (a decompression bomb?); set {SETTING} higher to read it",
                    )
    except zlib.error as e:
        raise DataError(path, f"the deflated data set is corrupt ({e})") from e


def _deflated_data_start(path: Path) -> int | None:
    """Where the data set of a deflated file starts (after the file meta); None for any other file
    (unreadable ones included: dcmread reports those with its own reason)."""
    try:
        with open(path, "rb") as f:
            read_preamble(f, force=True)
            meta = read_elements(f, is_implicit_VR=False, is_little_endian=True, stop_when=_past_file_meta)
            return f.tell() if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian else None
    except Exception:  # pydicom raises many types on damaged headers
        return None


def _past_file_meta(tag, vr, length) -> bool:
    return tag >> 16 != 2


def _check_frame_and_decoder(ds: Dataset, path: Path, frame: int) -> None:
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


def _decode_frame(ds: Dataset, path: Path, frame: int) -> np.ndarray:
    """Decode one frame: (H, W) for grey and palette, (H, W, 3) RGB for colour (YBR converted)."""
    _check_frame_and_decoder(ds, path, frame)
    try:
        return pixel_array(ds, index=frame)
    except Exception as e:  # ValueError for short data, RuntimeError from codecs, ...
        raise DataError(path, f"the pixel data is truncated or corrupt ({e})") from e


def _grey_to_unit(arr: np.ndarray, ds: Dataset, path: Path, window: WindowConfig) -> np.ndarray:
    """Modality LUT, then the configured window, into [0, 1] (float32).

    The common case (rescale slope/intercept, a LINEAR window) is computed here in float32, in
    place: about twice as fast on 2048x2048 radiographs as pydicom's float64 functions, which
    handle the rest (Modality and VOI LUT sequences, SIGMOID and LINEAR_EXACT windows). A VOI LUT
    or window that cannot be applied (e.g. a zero width) falls back to percentiles: a bad display
    hint should not make the pixels unusable.
    """
    values = modality_values(arr, ds, path)
    fixed = window.fixed_window
    if fixed is not None:
        return linear_window(values, *fixed)
    if window.mode == "percentile":
        return percentile_window(values, window.percentiles)
    linear = _linear_file_window(ds)
    if linear is not None:
        return linear_window(values, *linear)
    try:
        out, lo, hi = _file_window(values, ds)
    except (ValueError, TypeError, IndexError, AttributeError):
        return percentile_window(values, window.percentiles)
    if out is None:
        return percentile_window(values, window.percentiles)
    return stretch(out, lo, hi)


def modality_values(arr: np.ndarray, ds: Dataset, path: Path) -> np.ndarray:
    """Stored values -> modality values (e.g. Hounsfield units)."""
    try:
        if "ModalityLUTSequence" in ds:
            return apply_modality_lut(arr, ds)
        slope = float(ds.get("RescaleSlope") if ds.get("RescaleSlope") not in (None, "") else 1.0)
        intercept = float(ds.get("RescaleIntercept") if ds.get("RescaleIntercept") not in (None, "") else 0.0)
    except Exception as e:
        raise DataError(path, f"the Modality LUT (rescale slope/intercept or LUT sequence) is invalid ({e})") from e
    values = arr.astype(np.float32)
    if slope != 1.0:
        values *= slope
    if intercept != 0.0:
        values += intercept
    return values


def _linear_file_window(ds: Dataset) -> tuple[float, float] | None:
    """The file's first window when it is a plain LINEAR one that applies (no VOI LUT first, width >= 1)."""
    if ds.get("VOILUTSequence") or ds.get("WindowCenter") is None or ds.get("WindowWidth") is None:
        return None
    if str(ds.get("VOILUTFunction") or "LINEAR").upper() != "LINEAR":
        return None
    try:
        center, width = (float(v[0] if isinstance(v, MultiValue) else v) for v in (ds.WindowCenter, ds.WindowWidth))
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width >= 1 else None


def _file_window(values: np.ndarray, ds: Dataset) -> tuple[np.ndarray | None, float, float]:
    """Apply the file's first VOI LUT, else its first window; with the output range. None if it has neither."""
    if ds.get("VOILUTSequence"):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return apply_voi(values, ds, index=0), 0.0, 2.0**bits - 1
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        # pydicom sends values below/above the window to the ends of its output range; ask it for
        # them instead of re-deriving its rules (bit depth, signedness, rescale, modality LUT).
        lo, hi = apply_windowing(np.array([-np.inf, np.inf]), ds, index=0)
        return apply_windowing(values, ds, index=0), float(lo), float(hi)
    return None, 0.0, 0.0


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Grey value of colour pixels (..., 3 or 4), ITU-R BT.601 weights."""
    return rgb[..., :3].astype(np.float32) @ LUMA


def spacing_of(ds: Dataset) -> tuple[float, float] | None:
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


def meta_of(ds: Dataset) -> dict[str, str | int]:
    """The identifiers of `META_KEYWORDS` present in the file."""
    meta: dict[str, str | int] = {}
    for keyword in META_KEYWORDS:
        value = ds.get(keyword)
        if value is not None and value != "":
            meta[keyword] = int(value) if keyword in ("Rows", "Columns") else str(value)
    return meta


def patient_of(path: str | Path, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> str | None:
    """A patient key from a DICOM header: "PatientID:<id>", else "StudyInstanceUID:<uid>"; None if not
    DICOM, neither is set, or a deflated file inflates to more than `max_decoded_bytes`."""
    try:
        check_inflated_size(Path(path), max_decoded_bytes)
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"])
    except Exception:  # not DICOM, missing, unreadable: the dataset reports those files itself
        return None
    for keyword in ("PatientID", "StudyInstanceUID"):
        value = str(ds.get(keyword) or "").strip()
        if value:
            return f"{keyword}:{value}"
    return None
