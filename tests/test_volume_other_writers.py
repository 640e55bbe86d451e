"""Volumes written by another tool: each NIfTI phantom rewritten by SimpleITK (ITK/GDCM) as a DICOM
series, slice by slice with the positions and orientation ITK computes (the volumes stored in RAS
order among them), reads as the same voxels on the same grid, and its annotation rows (in the
series' own column, row, slice indices) give the same boxes; `medrpn check-data` reads it."""

from __future__ import annotations

import csv
import locale
from pathlib import Path

import numpy as np
import pytest

from medrpn.data.annotations import read_annotations
from medrpn.data.synth_volumes import write_synthetic_volumes
from medrpn.data.volume_files import read_volume
from support import locale_kept
from tests.trained_run import REPO, medrpn

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


def write_gdcm_series(nifti: Path, folder: Path, uid_root: str) -> None:
    """`nifti` as a DICOM series written by SimpleITK's GDCM writer (16-bit, one file a slice),
    the process locale put back afterwards (GDCM sets it to "C": `support.locale_kept`)."""
    with locale_kept():
        _write_gdcm_series(nifti, folder, uid_root)


def _write_gdcm_series(nifti: Path, folder: Path, uid_root: str) -> None:
    import SimpleITK as sitk

    image = sitk.ReadImage(str(nifti))
    pixels = sitk.Cast(image, sitk.sitkInt16)
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    folder.mkdir(parents=True)
    for k in range(image.GetDepth()):
        slice_ = pixels[:, :, k]
        tags = {
            "0008|0016": MR_IMAGE_STORAGE, "0008|0018": f"{uid_root}.2.{k + 1}", "0008|0060": "MR",
            "0010|0020": f"GDCM-{nifti.name[:6]}", "0020|000d": uid_root, "0020|000e": f"{uid_root}.1",
            "0020|0013": str(k + 1), "0020|0037": orientation,
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
        }
        for tag, value in tags.items():
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}.dcm"))
        writer.Execute(slice_)


@pytest.fixture(scope="module")
def gdcm_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gdcm")
    write_synthetic_volumes(root, n_volumes=6, shape=(40, 40, 16), seed=5)
    with open(root / "annotations.csv") as f:
        rows = list(csv.DictReader(f))
    niftis = sorted({r["image"] for r in rows if r["image"].endswith(".nii.gz")})
    for index, name in enumerate(niftis):
        write_gdcm_series(root / name, root / name.replace(".nii.gz", "_gdcm"), f"1.2.826.0.1.3680043.9.7433.{index + 1}")
    with open(root / "gdcm.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            if r["image"] in niftis:
                writer.writerow({**r, "image": r["image"].replace(".nii.gz", "_gdcm")})
    return root


def test_a_series_written_by_gdcm_reads_as_its_nifti(gdcm_data: Path):
    niftis = sorted((gdcm_data / "volumes").glob("*.nii.gz"))
    assert len(niftis) == 3
    for nifti in niftis:
        original, series = read_volume(nifti), read_volume(gdcm_data / "volumes" / nifti.name.replace(".nii.gz", "_gdcm"))
        assert series.shape == original.shape
        np.testing.assert_allclose(series.affine, original.affine, atol=1e-4)
        np.testing.assert_array_equal(series.array, np.trunc(original.array))  # the int16 cast truncates


def test_its_annotation_rows_give_the_same_boxes(gdcm_data: Path):
    nifti_records, classes = read_annotations(gdcm_data / "annotations.csv")
    series_records, series_classes = read_annotations(gdcm_data / "gdcm.csv")
    by_name = {r.image_path.name.replace(".nii.gz", "_gdcm"): r for r in nifti_records}
    assert len(series_records) == 3
    for record in series_records:
        twin = by_name[record.image_path.name]
        np.testing.assert_allclose(record.boxes, twin.boxes, atol=1e-3)
        assert [series_classes[i] for i in record.labels] == [classes[i] for i in twin.labels]


def test_check_data_reads_the_gdcm_series(gdcm_data: Path):
    result = medrpn(
        "check-data", "--config", str(REPO / "configs" / "synth_volumes.yaml"),
        "--data.annotations", str(gdcm_data / "gdcm.csv"), "--data.val_fraction", "0.34", "--data.test_fraction", "0.0",
        cwd=gdcm_data,
    )
    output = result.stdout + result.stderr
    assert "scans         found 3, readable 3, unreadable 0" in output, output[-3000:]
    assert "40 x 40 x 16 voxels of 0.90 x 0.90 x 3.00 mm" in output


def test_writing_the_series_leaves_the_locale_as_it_was(tmp_path: Path):
    write_synthetic_volumes(tmp_path, n_volumes=2, shape=(40, 40, 16), seed=1)
    before = locale.setlocale(locale.LC_ALL)
    write_gdcm_series(tmp_path / "volumes" / "vol001.nii.gz", tmp_path / "series", "1.2.826.0.1.3680043.9.7433.99")
    assert locale.setlocale(locale.LC_ALL) == before
