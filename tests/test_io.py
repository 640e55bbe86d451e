"""Image readers on real files: pydicom's bundled test files and the pydicom-data package.

Lossless twins (RLE, JPEG 2000, JPEG-LS, JPEG lossless, big endian, implicit VR) must decode to
exactly the array of their uncompressed original; intensities are checked against the formulas of
the DICOM standard (PS3.3 C.11) computed here from the raw tags, not against our own code.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import UID, JPEGLSLossless

from bombs import deflated_dicom, nifti_bomb, one_bit_png, rle_bomb
from medrpn.data.io import ReadConfig, probe_image, read_dicom, read_image, read_raster
from medrpn.errors import ConfigError, DataError


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
    ("RG1_UNCR.dcm", "RG1_J2KR.dcm", 0),  # CR 1955x1841, MONOCHROME1 (pydicom-data)
    ("RG1_UNCI.dcm", "RG1_J2KI.dcm", 0),  # UNCI: the lossy J2KI stream decoded once and stored raw
    ("RG3_UNCI.dcm", "RG3_J2KI.dcm", 0),
    ("693_UNCI.dcm", "693_J2KI.dcm", 0),
    ("MR2_UNCI.dcm", "MR2_J2KI.dcm", 0),
    ("US1_UNCI.dcm", "US1_J2KI.dcm", 0),
    ("OBXXXX1A.dcm", "OBXXXX1A_rle.dcm", 0),  # PALETTE COLOR ultrasound
    ("OBXXXX1A.dcm", "OBXXXX1A_expb.dcm", 0),  # big endian palette (pydicom reads its LUT little endian)
    ("gdcm-US-ALOKA-16.dcm", "gdcm-US-ALOKA-16_big.dcm", 0),  # segmented 16-bit palette, big endian
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
    np.testing.assert_allclose(read_raster(path).array, values / 255.0, atol=1e-6)


def test_pgm_ppm_and_tiff_are_read_like_png(tmp_path):
    # mini-MIAS ships its mammograms as 8-bit PGM; 16-bit PGM and TIFF are common exports
    grey8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    grey16 = np.linspace(0, 65535, 48 * 32).astype(np.uint16).reshape(48, 32)
    cases = {"mdb001.pgm": (grey8, grey8 / 255.0), "scan.tif": (grey16, grey16 / 65535.0), "scan16.pgm": (grey16, grey16 / 65535.0)}
    for name, (values, expected) in cases.items():
        if name == "scan16.pgm":  # written by hand: Pillow before 11 writes no 16-bit PGM (it reads them)
            header = f"P5\n{values.shape[1]} {values.shape[0]}\n65535\n".encode()
            (tmp_path / name).write_bytes(header + values.astype(">u2").tobytes())
        else:
            PIL.Image.fromarray(values).save(tmp_path / name)
        image = read_image(tmp_path / name)
        assert image.array.shape == values.shape and image.array.dtype == np.float32, name
        np.testing.assert_allclose(image.array, expected, atol=1e-4, err_msg=name)
        assert probe_image(tmp_path / name)[:2] == values.shape
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 200
    PIL.Image.fromarray(rgb).save(tmp_path / "colour.ppm")
    np.testing.assert_allclose(read_image(tmp_path / "colour.ppm").array, 0.587 * 200 / 255.0, atol=1e-4)
    floats = np.linspace(-100.0, 300.0, 64, dtype=np.float32).reshape(8, 8)  # a float TIFF: min..max
    PIL.Image.fromarray(floats, mode="F").save(tmp_path / "float.tiff")
    np.testing.assert_allclose(read_image(tmp_path / "float.tiff").array, (floats + 100) / 400, atol=1e-6)


def test_a_multi_page_tiff_is_read_by_page_and_never_silently_cut(tmp_path):
    pages = [PIL.Image.fromarray(np.full((10, 12), value, dtype=np.uint8)) for value in (0, 128, 255)]
    path = tmp_path / "stack.tif"
    pages[0].save(path, save_all=True, append_images=pages[1:])
    assert read_image(path, 1).array.mean() == pytest.approx(128 / 255)
    assert probe_image(path, 2)[:2] == (10, 12)
    with pytest.raises(DataError, match="multi-page file of 3 pages: name the page"):
        read_image(path)
    with pytest.raises(DataError, match="frame 3 requested but the file holds 3 page"):
        probe_image(path, 3)


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



# ---------------------------------------------------------------------------------------------
# Every single-image CT, MR, CR, DX, MG and US file shipped with pydicom and pydicom-data


def _single_image_files() -> list[str]:
    """Files of the wanted modalities with one frame, pixel data and an installed decoder."""
    import warnings

    from pydicom.data import get_testdata_files

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        files = sorted(set(get_testdata_files("**/*")))
    chosen = []
    for name in files:
        try:
            ds = pydicom.dcmread(name, defer_size="1 KB")
            modality, frames = ds.get("Modality"), int(ds.get("NumberOfFrames") or 1)
        except Exception:
            continue  # not DICOM (README, DICOMDIR index ...) or a malformed header tested elsewhere
        if modality not in ("CT", "MR", "CR", "DX", "MG", "US") or frames != 1 or "PixelData" not in ds:
            continue
        if not get_decoder(ds.file_meta.TransferSyntaxUID).is_available or "truncated" in Path(name).name:
            continue
        chosen.append(name)
    return chosen


SINGLE_IMAGE_FILES = _single_image_files()


def test_the_shipped_files_include_each_family():
    names = {Path(f).name for f in SINGLE_IMAGE_FILES}
    assert len(SINGLE_IMAGE_FILES) >= 60
    assert {"CT_small.dcm", "MR_small.dcm", "RG1_UNCR.dcm", "US1_J2KR.dcm", "693_J2KI.dcm"} <= names


@pytest.mark.parametrize("name", SINGLE_IMAGE_FILES, ids=lambda n: str(Path(n).relative_to(Path(n).parents[1])))
def test_every_shipped_single_image_file_reads(name):
    ds = pydicom.dcmread(name, stop_before_pixels=True)
    image = read_image(name)
    assert image.array.dtype == np.float32 and image.array.shape == (ds.Rows, ds.Columns)
    assert np.all(np.isfinite(image.array)) and 0.0 <= image.array.min() <= image.array.max() <= 1.0


@pytest.mark.parametrize("name", ["RG1", "RG3", "MR2", "US1"])
def test_lossy_jpeg2000_stays_close_to_the_original(name):
    original = read_dicom(dicom(f"{name}_UNCR.dcm")).array
    lossy = read_dicom(dicom(f"{name}_J2KI.dcm")).array
    assert np.abs(lossy - original).mean() < 0.02


# ---------------------------------------------------------------------------------------------
# Windows, colour, default spacing

from medrpn.data.io import ReadConfig, probe_image, read_nifti  # noqa: E402
from medrpn.data.windows import NAMED_WINDOWS, WindowConfig  # noqa: E402
from medrpn.errors import ConfigError  # noqa: E402


def _hounsfield(name: str) -> np.ndarray:
    ds = pydicom.dcmread(dicom(name))
    return ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


@pytest.mark.parametrize("mode", ["ct_lung", "ct_soft_tissue", "ct_bone", "ct_brain"])
def test_named_ct_window_follows_the_dicom_linear_formula_in_hounsfield_units(mode):
    hu = _hounsfield("693_UNCR.dcm")
    c, w = NAMED_WINDOWS[mode]
    expected = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)  # PS3.3 C.11.2.1.2.1
    out = read_dicom(dicom("693_UNCR.dcm"), config=ReadConfig(window=WindowConfig(mode=mode))).array
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_lung_window_shows_air_that_the_soft_tissue_window_flattens():
    hu = _hounsfield("693_UNCR.dcm")
    air = (hu > -950) & (hu < -500)  # lung parenchyma range
    assert air.sum() > 100
    lung = read_dicom(dicom("693_UNCR.dcm"), config=ReadConfig(window=WindowConfig(mode="ct_lung"))).array
    soft = read_dicom(dicom("693_UNCR.dcm"), config=ReadConfig(window=WindowConfig(mode="ct_soft_tissue"))).array
    assert lung[air].std() > 0.05 and soft[air].max() == 0.0


def test_fixed_window_and_percentiles():
    hu = _hounsfield("CT_small.dcm")
    fixed = read_dicom(dicom("CT_small.dcm"), config=ReadConfig(window=WindowConfig(mode="fixed", center=100, width=500)))
    np.testing.assert_allclose(fixed.array, np.clip((hu - 99.5) / 499 + 0.5, 0, 1), atol=1e-6)
    pct = read_dicom(dicom("MR_small.dcm"), config=ReadConfig(window=WindowConfig(mode="percentile", percentiles=[2, 98])))
    raw = pydicom.dcmread(dicom("MR_small.dcm")).pixel_array.astype(np.float64)
    lo, hi = np.percentile(raw, [2, 98])
    np.testing.assert_allclose(pct.array, np.clip((raw - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_bad_window_settings_are_config_errors():
    with pytest.raises(ConfigError, match="unknown window 'lungs'"):
        WindowConfig(mode="lungs")
    with pytest.raises(ConfigError, match="needs a center and a width"):
        WindowConfig(mode="fixed", center=40)
    with pytest.raises(ConfigError, match="percentiles"):
        WindowConfig(mode="percentile", percentiles=[90, 10])
    with pytest.raises(ConfigError, match="channels must be 1 or 3"):
        ReadConfig(channels=2)


def test_rgb_becomes_grey_unless_colour_is_kept():
    ds = pydicom.dcmread(dicom("SC_rgb.dcm"))
    rgb = ds.pixel_array.astype(np.float64) / 255.0
    grey = read_dicom(dicom("SC_rgb.dcm")).array
    np.testing.assert_allclose(grey, rgb @ [0.299, 0.587, 0.114], atol=1e-6)
    colour = read_dicom(dicom("SC_rgb.dcm"), config=ReadConfig(channels=3)).array
    assert colour.shape == (*grey.shape, 3)
    np.testing.assert_allclose(colour, rgb, atol=1e-6)
    # a grey file with three channels asked for: the grey image three times
    mr = read_dicom(dicom("MR_small.dcm"), config=ReadConfig(channels=3)).array
    assert mr.shape == (64, 64, 3) and np.array_equal(mr[..., 0], mr[..., 2])


def test_png_window_and_default_spacing(tmp_path):
    values = np.arange(0, 1000, dtype=np.uint16).reshape(25, 40) * 60
    path = tmp_path / "scan.png"
    PIL.Image.fromarray(values).save(path)
    config = ReadConfig(window=WindowConfig(mode="fixed", center=30000, width=20001), spacing=[0.49, 0.5])
    image = read_image(path, config=config)
    np.testing.assert_allclose(image.array, np.clip((values - 29999.5) / 20000 + 0.5, 0, 1), atol=1e-6)
    assert image.spacing == (0.49, 0.5)
    assert read_image(dicom("CT_small.dcm"), config=config).spacing != (0.49, 0.5)  # the file's own wins


@pytest.mark.parametrize("name", ["CT_small.dcm", "emri_small.dcm", "RG3_J2KR.dcm"])
def test_probe_reads_the_size_and_spacing_without_pixels(name):
    image = read_image(dicom(name))
    info = probe_image(dicom(name))
    assert (info.height, info.width) == image.array.shape and info.spacing == image.spacing


# ---------------------------------------------------------------------------------------------
# NIfTI

import nibabel as nib  # noqa: E402

NIBABEL_DATA = Path(nib.__file__).parent / "tests" / "data"


def nifti_file(name: str) -> Path:
    path = NIBABEL_DATA / name
    if not path.is_file():
        pytest.skip(f"{name} is not in the installed nibabel test data")
    return path


def test_real_nifti_axial_slice_is_shown_anterior_up_and_patient_right_on_the_left():
    path = nifti_file("anatomical.nii")  # stored L-A-S: voxel x runs to the patient's left
    img = nib.load(path)
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    data = np.asarray(img.dataobj, dtype=np.float64)
    # display rows run anterior -> posterior (voxel y reversed), columns right -> left (voxel x as stored)
    expected = data[:, ::-1, 12].T
    lo, hi = np.percentile(expected, [0.5, 99.5])
    image = read_nifti(path, 12)
    np.testing.assert_allclose(image.array, np.clip((expected - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert image.spacing == (2.0, 2.0)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_a_volume_stored_in_another_voxel_order_gives_the_same_slices(tmp_path, axis):
    """nibabel's own reorientation to RAS must not change what any slice looks like."""
    source = nifti_file("anatomical.nii")
    canonical = nib.as_closest_canonical(nib.load(source))  # R-A-S: voxel x flipped
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    copy = tmp_path / "ras.nii.gz"
    nib.save(canonical, copy)
    n = nib.load(source).shape[{"sagittal": 0, "coronal": 1, "axial": 2}[axis]]
    for k in (3, n // 2):
        k_canonical = n - 1 - k if axis == "sagittal" else k  # only x was flipped
        a = read_image(source, k, ReadConfig(axis=axis)).array
        b = read_image(copy, k_canonical, ReadConfig(axis=axis)).array
        assert np.array_equal(a, b)


def test_nifti_spacing_follows_the_voxel_axes_of_the_slice():
    path = nifti_file("standard.nii.gz")  # R-A-S, voxels 1 x 3 x 2 mm
    assert read_image(path, 0, ReadConfig(axis="axial")).spacing == (3.0, 1.0)  # rows A-P, columns R-L
    assert read_image(path, 0, ReadConfig(axis="coronal")).spacing == (2.0, 1.0)  # rows S-I
    assert read_image(path, 0, ReadConfig(axis="sagittal")).spacing == (2.0, 3.0)
    assert probe_image(path, 1, ReadConfig(axis="coronal")) [:3] == (7, 4, (2.0, 1.0))


def test_marker_lands_where_a_radiologist_expects_it(tmp_path):
    """A bright voxel anterior, right and superior in a RAS volume: top-left in axial and coronal views."""
    data = np.zeros((10, 12, 8), dtype=np.float32)
    data[8, 10, 6] = 1.0  # x=8 of 10 is to the right, y=10 of 12 anterior, z=6 of 8 superior
    path = tmp_path / "marker.nii"
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), path)
    fixed = ReadConfig(window=WindowConfig(mode="fixed", center=0.5, width=1))
    axial = read_image(path, 6, fixed).array  # rows A->P (12), columns R->L (10)
    assert axial.shape == (12, 10) and np.argwhere(axial == 1).tolist() == [[1, 1]]
    coronal = read_image(path, 10, ReadConfig(axis="coronal", window=fixed.window)).array  # rows S->I, cols R->L
    assert coronal.shape == (8, 10) and np.argwhere(coronal == 1).tolist() == [[1, 1]]
    sagittal = read_image(path, 8, ReadConfig(axis="sagittal", window=fixed.window)).array  # rows S->I, cols A->P
    assert sagittal.shape == (8, 12) and np.argwhere(sagittal == 1).tolist() == [[1, 1]]


@pytest.mark.parametrize("name", ["example4d.nii.gz", "functional.nii"])
def test_nifti_time_series_is_the_wrong_dimensionality(name):
    path = nifti_file(name)
    with pytest.raises(DataError, match="expected a 2D image or a 3D volume, got a 4D array") as err:
        read_image(path, 0)
    assert err.value.path == str(path)


def test_nifti_slice_must_be_named_and_exist(tmp_path):
    path = nifti_file("anatomical.nii")
    with pytest.raises(DataError, match="25 axial slices: the annotation must say which slice"):
        read_image(path)
    with pytest.raises(DataError, match="slice 25 requested but the volume has 25 axial slices"):
        read_image(path, 25)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti(tmp_path, suffix):
    """Only the slice asked for is read: a cut before it is reported, naming the file."""
    whole_file = tmp_path / f"anatomical{suffix}"
    nib.save(nib.load(nifti_file("anatomical.nii")), whole_file)
    whole = whole_file.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        read_image(cut, 24)
    assert err.value.path == str(cut)


# ---------------------------------------------------------------------------------------------
# Decompression bombs: refused from the header, before a decoder allocates what it declares.
# A bomb is read in a child process whose address space is capped, so that code without the
# guard fails there (MemoryError, or an abort inside the decoder) instead of taking the machine.

_ADDRESS_SPACE = 2 * 2**30
_READ_BOTH_WAYS = """
import json, resource, sys, tracemalloc
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[3]), int(sys.argv[3])))
from medrpn.data.io import ReadConfig, probe_image, read_image
from medrpn.errors import DataError
config = ReadConfig(**json.loads(sys.argv[2]))
out = {}
for name, read in (("read", read_image), ("probe", probe_image)):
    tracemalloc.start()
    try:
        result = read(sys.argv[1], None, config)
        out[name] = None
        if name == "read":
            out["dtype"] = str(result.array.dtype)
    except DataError as e:
        out[name] = str(e)
    out[name + "_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
# peak RSS of this process (VmHWM: ru_maxrss would include the parent's, from before exec)
status = open("/proc/self/status").read().split("VmHWM:")[1]
out["maxrss"] = int(status.split()[0]) * 1024
print(json.dumps(out))
"""


def read_in_a_capped_process(path: Path, **settings) -> dict:
    """`read_image` and `probe_image` of `path` with `ReadConfig(**settings)` in a child process
    capped at 2 GiB of address space: their errors, numpy/Python peak bytes, and the child's peak RSS."""
    done = subprocess.run(
        [sys.executable, "-c", _READ_BOTH_WAYS, str(path), json.dumps(settings), str(_ADDRESS_SPACE)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"the reader died (rc {done.returncode}): {done.stderr[-3000:]}"
    return json.loads(done.stdout.splitlines()[-1])


def test_rle_bomb_is_refused_from_its_header_at_the_default_limit(tmp_path):
    bomb = rle_bomb(tmp_path / "bomb.dcm")  # 7.8 kB declaring 65535 x 65535 x 16 bits
    out = read_in_a_capped_process(bomb)
    for way in ("read", "probe"):
        assert out[way].startswith(f"{bomb}: declares 65535 x 65535 pixels x 1 frame(s) x 1 sample(s) x 16 bits")
        assert "= 8.0 GiB decoded, over the limit of 1.0 GiB" in out[way]
        assert "data.read.max_decoded_bytes" in out[way] and "--max-decoded-bytes" in out[way]
        assert out[way + "_peak"] < 2**20  # nothing of the 8 GiB was allocated
    assert out["maxrss"] < 400 * 2**20


def test_every_frame_sample_and_byte_counts_and_a_file_at_the_limit_reads():
    path = dicom("emri_small_RLE.dcm")  # 64 x 64 x 10 frames x 16 bits = 80 KiB decoded
    at_limit = ReadConfig(max_decoded_bytes=64 * 64 * 10 * 2)
    assert read_image(path, 3, at_limit).array.shape == (64, 64)
    with pytest.raises(DataError, match=r"64 x 64 pixels x 10 frame\(s\) x 1 sample\(s\) x 16 bits = 80.0 KiB") as err:
        read_image(path, 3, ReadConfig(max_decoded_bytes=64 * 64 * 10 * 2 - 1))
    assert err.value.path == str(path)
    rgb = dicom("SC_rgb_rle.dcm")  # 100 x 100 x 3 samples x 8 bits
    with pytest.raises(DataError, match=r"x 3 sample\(s\) x 8 bits = 29.3 KiB"):
        probe_image(rgb, None, ReadConfig(max_decoded_bytes=100 * 100 * 3 - 1))


def test_deflated_bomb_is_refused_before_pydicom_inflates_it(tmp_path):
    bomb = deflated_dicom(tmp_path / "deflated.dcm", 4096, 4096)  # 32 MiB of pixels in a 33 kB file
    assert bomb.stat().st_size < 64 * 2**10
    out = read_in_a_capped_process(bomb, max_decoded_bytes=16 * 2**20)
    for way in ("read", "probe"):
        assert out[way] == (
            f"{bomb}: its deflated data set inflates to more than 16.0 MiB, over the limit (a decompression bomb?); "
            "set data.read.max_decoded_bytes (medrpn predict: --max-decoded-bytes) higher to read it"
        )
        assert out[way + "_peak"] < 4 * 2**20  # inflated a chunk at a time, never kept
    assert read_image(bomb).array.shape == (4096, 4096)  # under the default limit it reads


def test_png_over_pillows_bomb_limit_is_a_data_error(tmp_path):
    bomb = one_bit_png(tmp_path / "huge.png", 20000, 10000)  # 200 megapixels; Pillow refuses over 179
    for read in (read_image, probe_image):
        with pytest.raises(DataError, match="Pillow refuses it as a possible decompression bomb") as err:
            read(bomb)
        assert err.value.path == str(bomb)


def test_png_over_the_limit_is_refused_before_pillow_decodes_it(tmp_path):
    bomb = one_bit_png(tmp_path / "big.png", 10000, 10000)  # 100 megapixels: Pillow only warns
    out = read_in_a_capped_process(bomb, max_decoded_bytes=64 * 2**20)
    for way in ("read", "probe"):
        assert out[way].startswith(
            f"{bomb}: declares 10000 x 10000 pixels x 1 band(s) x 1 byte(s) (Pillow mode 1) = 95.4 MiB decoded, "
            "over the limit of 64.0 MiB"
        )
    assert out["maxrss"] < 400 * 2**20


def test_one_bit_png_stays_one_float32_channel(tmp_path):
    """Decoded at 4 bytes a pixel at most: no float64, no RGB copy of a grey image."""
    image = one_bit_png(tmp_path / "mask.png", 4000, 4000)
    out = read_in_a_capped_process(image)
    assert out["read"] is None and out["dtype"] == "float32"
    assert out["read_peak"] < 16 * 4000 * 4000  # the float64 RGB path took 35 bytes a pixel


def test_nifti_volume_over_the_limit_is_refused_from_its_header(tmp_path):
    bomb = nifti_bomb(tmp_path / "volume.nii", (4096, 4096, 4096))  # 128 GiB of int16 declared
    out = read_in_a_capped_process(bomb)
    for way in ("read", "probe"):
        assert out[way].startswith(
            f"{bomb}: declares a volume of 4096 x 4096 x 4096 voxels x 2 bytes = 128.0 GiB decoded, over the limit"
        )


def test_the_limit_must_be_positive():
    with pytest.raises(ConfigError, match="max_decoded_bytes"):
        ReadConfig(max_decoded_bytes=0)
