"""Image readers on real files: pydicom's bundled test files and the pydicom-data package.

Lossless twins (RLE, JPEG 2000, JPEG-LS, JPEG lossless, big endian, implicit VR) must decode to
exactly the array of their uncompressed original; intensities are checked against the formulas of
the DICOM standard (PS3.3 C.11) computed here from the raw tags, not against our own code.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import PIL.Image
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEGLSLossless

from medrpn.data.io import read_dicom, read_image, read_png
from medrpn.errors import DataError


def dicom(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not in the installed pydicom test data")
    return Path(path)


LOSSLESS_TWINS = [
    # (uncompressed original, lossless copy, frame)
    ("MR_small.dcm", "MR_small_RLE.dcm", 0),  # RLE Lossless, signed 16-bit
    ("MR_small.dcm", "MR_small_jp2klossless.dcm", 0),  # JPEG 2000 Lossless
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", 0),  # JPEG-LS Lossless
    ("MR_small.dcm", "MR_small_bigendian.dcm", 0),  # Explicit VR Big Endian
    ("MR_small.dcm", "MR_small_implicit.dcm", 0),  # Implicit VR Little Endian
    ("emri_small.dcm", "emri_small_RLE.dcm", 5),  # multi-frame enhanced MR, 12-bit
    ("emri_small.dcm", "emri_small_jpeg_2k_lossless.dcm", 5),
    ("emri_small.dcm", "emri_small_jpeg_ls_lossless.dcm", 5),
    ("693_UNCR.dcm", "693_J2KR.dcm", 0),  # CT 512x512, signed, rescaled (pydicom-data)
    ("MR2_UNCR.dcm", "MR2_J2KR.dcm", 0),  # MR 1024x1024 (pydicom-data)
    ("RG3_UNCR.dcm", "RG3_J2KR.dcm", 0),  # CR 1760x1760, MONOCHROME1, 10-bit (pydicom-data)
    ("US1_UNCR.dcm", "US1_J2KR.dcm", 0),  # RGB vs JPEG 2000 YBR_RCT colour
    ("SC_rgb.dcm", "SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG Lossless P14 SV1, RGB
    ("SC_rgb.dcm", "SC_rgb_rle.dcm", 0),
    ("SC_rgb_16bit.dcm", "SC_rgb_rle_16bit.dcm", 0),
]


@pytest.mark.parametrize(("original", "copy", "frame"), LOSSLESS_TWINS)
def test_lossless_copy_decodes_to_the_same_array(original, copy, frame):
    expected = read_dicom(dicom(original), frame=frame).array
    assert np.array_equal(read_dicom(dicom(copy), frame=frame).array, expected)


@pytest.mark.parametrize(
    ("original", "ybr_copy", "tolerance"),
    [
        ("SC_rgb.dcm", "SC_ybr_full_uncompressed.dcm", 0.01),  # YBR_FULL, only rounding differs
        ("SC_rgb.dcm", "SC_rgb_jpeg_dcmtk.dcm", 0.01),  # JPEG baseline YBR_FULL
        ("SC_rgb.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", 0.04),  # JPEG baseline YBR_FULL_422 (lossy)
    ],
)
def test_ybr_colour_becomes_the_same_grey_as_rgb(original, ybr_copy, tolerance):
    expected = read_dicom(dicom(original)).array
    np.testing.assert_allclose(read_dicom(dicom(ybr_copy)).array, expected, atol=tolerance)


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",
        "MR_small.dcm",
        "JPEG-LL.dcm",  # JPEG Lossless P14 grey
        "JPGLosslessP14SV1_1s_1f_8b.dcm",
        "JPGExtended.dcm",  # JPEG Extended 12-bit
        "vlut_04.dcm",
        "mlut_18.dcm",
        "emri_small.dcm",
        "SC_rgb_32bit.dcm",
        "examples_palette.dcm",
        "rtdose.dcm",  # 32-bit
        "image_dfl.dcm",  # Deflated Explicit VR Little Endian
        "dicomdirtests/77654033/CR1/6154",
    ],
)
def test_output_is_float32_in_unit_range_with_the_file_shape(name):
    ds = pydicom.dcmread(dicom(name), stop_before_pixels=True)
    image = read_image(dicom(name))
    assert image.array.dtype == np.float32
    assert image.array.shape == (ds.Rows, ds.Columns)
    assert 0.0 <= image.array.min() < image.array.max() <= 1.0


def test_meta_keeps_identifiers_and_never_the_patient_name():
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    meta = read_dicom(dicom("CT_small.dcm")).meta
    assert meta["SOPInstanceUID"] == ds.SOPInstanceUID
    assert meta["StudyInstanceUID"] == ds.StudyInstanceUID
    assert meta["SeriesInstanceUID"] == ds.SeriesInstanceUID
    assert meta["PatientID"] == ds.PatientID
    assert meta["Modality"] == "CT"
    assert (meta["Rows"], meta["Columns"]) == (128, 128)
    assert str(ds.PatientName) not in map(str, meta.values())
    assert "PixelData" not in meta


def test_spacing_is_pixel_spacing_then_imager_pixel_spacing():
    ct = pydicom.dcmread(dicom("CT_small.dcm"), stop_before_pixels=True)
    assert read_dicom(dicom("CT_small.dcm")).spacing == (float(ct.PixelSpacing[0]), float(ct.PixelSpacing[1]))
    cr = pydicom.dcmread(dicom("dicomdirtests/77654033/CR1/6154"), stop_before_pixels=True)
    assert "PixelSpacing" not in cr
    expected = (float(cr.ImagerPixelSpacing[0]), float(cr.ImagerPixelSpacing[1]))
    assert read_dicom(dicom("dicomdirtests/77654033/CR1/6154")).spacing == expected
    # RG1 states a pixel spacing of 0.000 mm: that is no spacing at all
    assert read_dicom(dicom("RG1_UNCR.dcm")).spacing is None


@pytest.mark.parametrize("name", ["MR_small.dcm", "693_UNCR.dcm"])
def test_window_follows_the_dicom_linear_formula(name):
    ds = pydicom.dcmread(dicom(name))
    values = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1
    np.testing.assert_allclose(read_dicom(dicom(name)).array, expected, atol=1e-6)


def test_voi_lut_sequence_is_applied():
    ds = pydicom.dcmread(dicom("vlut_04.dcm"))
    item = ds.VOILUTSequence[0]
    n_entries, first, bits = item.LUTDescriptor
    lut = np.asarray(item.LUTData, dtype=np.float64)
    index = np.clip(ds.pixel_array.astype(int) - first, 0, n_entries - 1)
    np.testing.assert_allclose(read_dicom(dicom("vlut_04.dcm")).array, lut[index] / (2**bits - 1), atol=1e-6)


def test_without_a_window_the_percentiles_set_the_range():
    ds = pydicom.dcmread(dicom("CT_small.dcm"))
    assert "WindowCenter" not in ds and "VOILUTSequence" not in ds
    raw = ds.pixel_array.astype(np.float64)
    out = read_dicom(dicom("CT_small.dcm")).array
    lo, hi = np.percentile(raw, [0.5, 99.5])
    assert np.all(out[raw <= lo] == 0) and np.all(out[raw >= hi] == 1)
    inside = (raw > lo) & (raw < hi)
    np.testing.assert_allclose(out[inside], (raw[inside] - lo) / (hi - lo), atol=1e-6)


def test_monochrome1_is_inverted(tmp_path):
    """RG3 is a real MONOCHROME1 radiograph; the same pixels declared MONOCHROME2 must read as 1 - x."""
    source = dicom("RG3_UNCR.dcm")
    ds = pydicom.dcmread(source)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    ds.PhotometricInterpretation = "MONOCHROME2"
    naive = tmp_path / "rg3_mono2.dcm"
    ds.save_as(naive)
    inverted = read_dicom(source).array
    np.testing.assert_allclose(inverted, 1.0 - read_dicom(naive).array, atol=1e-6)
    # bright = dense: in MONOCHROME1 high stored values are dark, so output falls as raw rises
    assert np.corrcoef(ds.pixel_array.ravel(), inverted.ravel())[0, 1] < -0.5


def test_frames_of_a_multiframe_file_differ_and_out_of_range_is_an_error():
    path = dicom("emri_small.dcm")
    assert not np.array_equal(read_dicom(path, frame=0).array, read_dicom(path, frame=9).array)
    with pytest.raises(DataError, match="frame 10 requested but the file has 10"):
        read_dicom(path, frame=10)


def test_dispatch_by_magic_and_by_missing_suffix(tmp_path):
    expected = read_dicom(dicom("CT_small.dcm")).array
    for name in ("1.2.840.113619.2.55.3", "IM0001"):
        copy = tmp_path / name
        shutil.copy(dicom("CT_small.dcm"), copy)
        assert np.array_equal(read_image(copy).array, expected)


def test_missing_file_and_unknown_type_name_the_file(tmp_path):
    with pytest.raises(DataError, match="file not found") as err:
        read_image(tmp_path / "nope.dcm")
    assert str(tmp_path / "nope.dcm") in str(err.value)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    with pytest.raises(DataError, match="unknown image type") as err:
        read_image(notes)
    assert err.value.path == str(notes)


def test_not_a_dicom_file(tmp_path):
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"this is not a scan\n" * 20)
    with pytest.raises(DataError, match="not a DICOM file") as err:
        read_image(fake)
    assert err.value.path == str(fake)


@pytest.mark.parametrize("name", ["test-SR.dcm", "reportsi.dcm", "rtplan.dcm"])
def test_dicom_without_pixel_data_says_so(name):
    with pytest.raises(DataError, match="has no pixel data: it is a .*, not an image") as err:
        read_image(dicom(name))
    assert err.value.path == str(dicom(name))


@pytest.mark.parametrize("keep", [0.8, 0.1])
def test_truncated_copy_of_a_real_file(tmp_path, keep):
    """Cut in the pixel data (0.8) or in the header (0.1): both are reported, never decoded."""
    data = dicom("CT_small.dcm").read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        read_image(cut)
    assert err.value.path == str(cut)


@pytest.mark.filterwarnings("ignore:End of file reached")  # pydicom's own note on the short file
@pytest.mark.parametrize("name", ["MR_truncated.dcm", "emri_small_jpeg_2k_lossless_too_short.dcm"])
def test_truncated_files_shipped_with_pydicom(name):
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        read_image(dicom(name))
    assert err.value.path == str(dicom(name))


def test_transfer_syntax_without_decoder_is_named(tmp_path):
    ds = pydicom.dcmread(dicom("MR_small_RLE.dcm"))
    ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.4.100")  # MPEG2: no image decoder exists
    path = tmp_path / "mpeg2.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(DataError, match="MPEG2 Main Profile") as err:
        read_image(path)
    assert err.value.path == str(path)


def test_missing_decoder_plugin_is_named(monkeypatch):
    # Take the plugins away from pydicom's own JPEG-LS decoder, as on a machine without pylibjpeg.
    monkeypatch.setattr(get_decoder(JPEGLSLossless), "_available", {})
    with pytest.raises(DataError, match="no installed decoder for transfer syntax 'JPEG-LS Lossless"):
        read_image(dicom("MR_small_jpeg_ls_lossless.dcm"))


def test_16bit_png(tmp_path):
    values = np.linspace(0, 65535, 48 * 32).astype(np.uint16).reshape(48, 32)
    path = tmp_path / "scan.png"
    PIL.Image.fromarray(values).save(path)
    image = read_image(path)
    assert image.array.dtype == np.float32 and image.spacing is None
    np.testing.assert_allclose(image.array, values / 65535.0, atol=1e-6)


def test_8bit_grey_png(tmp_path):
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    path = tmp_path / "scan.png"
    PIL.Image.fromarray(values).save(path)
    np.testing.assert_allclose(read_png(path).array, values / 255.0, atol=1e-6)


def test_rgb_png_and_jpeg_become_luminance(tmp_path):
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[:, :20] = (200, 30, 10)
    rgb[:, 20:40] = (10, 220, 40)
    rgb[:, 40:] = (30, 30, 250)
    luminance = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255.0  # ITU-R BT.601
    png, jpeg = tmp_path / "photo.png", tmp_path / "photo.JPG"
    PIL.Image.fromarray(rgb).save(png)
    PIL.Image.fromarray(rgb).save(jpeg, quality=95)
    np.testing.assert_allclose(read_image(png).array, luminance, atol=1e-6)
    # JPEG is lossy: compare away from the colour edges
    columns = [5, 15, 25, 35, 45, 55]
    np.testing.assert_allclose(read_image(jpeg).array[4:-4, columns], luminance[4:-4, columns], atol=0.03)


def test_empty_and_truncated_png(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="not a readable PNG or JPEG") as err:
        read_image(empty)
    assert err.value.path == str(empty)
    whole = tmp_path / "whole.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(whole)
    cut = tmp_path / "cut.png"
    cut.write_bytes(whole.read_bytes()[:2000])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        read_image(cut)
    assert err.value.path == str(cut)

