"""Volume readers: NIfTI, MetaImage, NRRD and DICOM series written by SimpleITK (another tool than
medrpn), pydicom's own enhanced CT, and each series that cannot be one regular grid refused with
a message naming it. The reference for every position is SimpleITK's (or pydicom's) geometry."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medrpn.data.dicom_series import find_series, read_dicom_series
from medrpn.data.volume import reorient_boxes
from medrpn.data.volume_files import read_volume, read_volume_geometry
from medrpn.errors import DataError
from support import locale_kept

import SimpleITK as sitk  # noqa: E402 (a dependency: another tool writes the test files)

SIZE = (24, 20, 12)  # ITK's (x, y, z) = the file's voxel axes (i, j, k)
MARK = (5, 14, 8)  # a bright voxel at this file index
SPACING = (0.9, 0.8, 3.0)
ORIGIN = (-10.0, 20.0, -30.0)
# A file stored right-to-left... no: i towards patient Right, j towards Anterior, k towards Inferior
# (every axis the other way round from medrpn's LPS), so reading it must flip all three.
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)


def _image(direction=DIRECTION) -> "sitk.Image":
    array = np.zeros(SIZE[::-1], dtype=np.int16)  # SimpleITK arrays are (z, y, x)
    array[MARK[2], MARK[1], MARK[0]] = 1000
    array[0, 0, 0] = -50
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(direction)
    return image


def _world_of_mark(image) -> np.ndarray:
    return np.array(image.TransformIndexToPhysicalPoint(MARK))  # LPS, ITK's world


def write_series(image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.8.498.1") -> list[Path]:
    """A DICOM series written slice by slice by SimpleITK (GDCM), as SimpleITK's own example does."""
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    paths = []
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in {
            "0008|0060": "CT",
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
            "0008|0018": f"{series_uid}.{k + 1}",
            "0020|000d": "1.2.826.0.1.3680043.8.498.2",
            "0020|000e": series_uid,
            "0010|0020": "P1",
            "0020|0037": orientation,
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0013": str(k + 1),
        }.items():
            slice_.SetMetaData(tag, value)
        path = folder / f"slice{k:03d}.dcm"
        writer.SetFileName(str(path))
        with locale_kept():
            writer.Execute(slice_)
        paths.append(path)
    return paths


@pytest.mark.parametrize("suffix", [".mhd", ".nrrd", ".nii.gz"])
def test_a_file_written_by_simpleitk_is_read_in_lps_with_its_world_positions(tmp_path, suffix):
    image = _image()
    path = tmp_path / f"scan{suffix}"
    sitk.WriteImage(image, str(path))
    volume = read_volume(path)
    assert volume.shape == SIZE  # the same axes lengths, each flipped
    assert np.allclose(volume.spacing, SPACING)
    assert np.allclose(np.diag(volume.affine[:3, :3]), SPACING)  # now towards L, P, S
    found = np.argwhere(volume.array == 1000)
    assert len(found) == 1
    assert np.allclose(volume.geometry.world_of_index(found[0]), _world_of_mark(image), atol=1e-4)
    assert tuple(found[0]) == tuple(n - 1 - m for n, m in zip(SIZE, MARK))
    assert volume.array.dtype == np.float32 and volume.array.min() == -50
    geometry = read_volume_geometry(path)  # from the header alone: the same
    assert geometry.shape == volume.shape and np.allclose(geometry.affine, volume.affine)


def test_a_box_in_the_files_voxels_follows_the_reorientation(tmp_path):
    path = tmp_path / "scan.mhd"
    sitk.WriteImage(_image(), str(path))
    volume = read_volume(path)
    file_box = np.array([[MARK[0], MARK[1], MARK[2], MARK[0] + 1, MARK[1] + 1, MARK[2] + 1]])  # the marked voxel
    box = volume.geometry.boxes_from_file_index(file_box)[0].astype(int)
    inside = volume.array[box[0]:box[3], box[1]:box[4], box[2]:box[5]]
    assert inside.shape == (1, 1, 1) and inside.item() == 1000


def test_reorient_boxes_of_a_transposing_orientation():
    transform = np.array([[2, 1], [0, -1], [1, 1]])  # file axis 0 -> axis 2, axis 1 -> axis 0 flipped, axis 2 -> axis 1
    boxes = reorient_boxes(np.array([[1, 2, 3, 4, 6, 9]]), transform, (10, 20, 30))
    assert boxes.tolist() == [[20 - 6, 3, 1, 20 - 2, 9, 4]]


def test_a_dicom_series_written_by_simpleitk_matches_simpleitks_own_reading(tmp_path):
    image = _image()
    write_series(image, tmp_path / "series")
    volume = read_dicom_series(tmp_path / "series")
    assert volume.shape == SIZE
    assert np.allclose(volume.spacing, SPACING, atol=1e-4)
    found = np.argwhere(volume.array == 1000)
    assert len(found) == 1 and np.allclose(volume.geometry.world_of_index(found[0]), _world_of_mark(image), atol=1e-3)
    assert volume.meta["SeriesInstanceUID"] == "1.2.826.0.1.3680043.8.498.1" and volume.meta["Modality"] == "CT"
    assert len(volume.meta["SOPInstanceUIDs"]) == SIZE[2]
    assert read_volume_geometry(tmp_path / "series").affine.tolist() == volume.affine.tolist()

    reader = sitk.ImageSeriesReader()  # SimpleITK's own reading of the same files, into LPS by medrpn's rule
    with locale_kept():
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
        theirs = reader.Execute()
    theirs_path = tmp_path / "theirs.mhd"
    sitk.WriteImage(theirs, str(theirs_path))
    assert np.array_equal(read_volume(theirs_path).array, volume.array)


def test_the_slice_order_comes_from_positions_not_file_names(tmp_path):
    paths = write_series(_image(), tmp_path / "series")
    for i, path in enumerate(paths):  # names now run against the positions
        path.rename(path.with_name(f"x{len(paths) - i:03d}.dcm"))
    found = np.argwhere(read_dicom_series(tmp_path / "series").array == 1000)
    assert tuple(found[0]) == tuple(n - 1 - m for n, m in zip(SIZE, MARK))


def test_pydicoms_enhanced_ct_is_a_volume_with_its_per_frame_positions(tmp_path):
    from pydicom.data import get_testdata_file

    source = Path(get_testdata_file("eCT_Supplemental.dcm"))
    shutil.copy(source, tmp_path / source.name)
    volume = read_dicom_series(tmp_path)
    ds = pydicom.dcmread(source)
    assert volume.shape == (512, 512, 2)
    assert np.allclose(volume.spacing, (0.388672, 0.388672, 10.0))
    # pixel (row 3, column 7) of frame 1, where pydicom's header places it (rescale applied: intercept -1024)
    position = np.array([float(v) for v in ds.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0].ImagePositionPatient])
    orientation = np.array([float(v) for v in ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient])
    world = position + orientation[:3] * 7 * 0.388672 + orientation[3:] * 3 * 0.388672
    index = np.round(volume.geometry.index_of_world(world)[0]).astype(int)
    assert volume.array[tuple(index)] == float(ds.pixel_array[1, 3, 7]) - 1024


def _series(tmp_path: Path) -> list[Path]:
    return write_series(_image(), tmp_path / "series")


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path)


def _refusal(folder: Path) -> str:
    with pytest.raises(DataError) as info:
        read_dicom_series(folder)
    return str(info.value)


def test_a_missing_slice_is_named(tmp_path):
    paths = _series(tmp_path)
    paths[5].unlink()
    message = _refusal(tmp_path / "series")
    assert "1 slice(s) missing between slice006.dcm and slice004.dcm (6.000 mm apart" in message  # ordered along the normal
    assert "series 1.2.826.0.1.3680043.8.498.1" in message


def test_uneven_spacing_is_refused(tmp_path):
    paths = _series(tmp_path)
    ds = pydicom.dcmread(paths[6])
    _edit(paths[6], ImagePositionPatient=[ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], float(ds.ImagePositionPatient[2]) - 1.0])
    assert "uneven slice spacing" in _refusal(tmp_path / "series")


def test_duplicated_slices_are_named(tmp_path):
    paths = _series(tmp_path)
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
    ds.save_as(paths[3].with_name("copy.dcm"))
    message = _refusal(tmp_path / "series")
    assert "lie at the same position: duplicated slices" in message and "copy.dcm" in message


def test_4d_data_at_repeated_positions_is_refused_as_4d(tmp_path):
    paths = _series(tmp_path)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".2"
        ds.save_as(path.with_name("t2_" + path.name))
    assert f"2 images at each of its {SIZE[2]} positions: 4D data" in _refusal(tmp_path / "series")


def test_mixed_orientations_are_refused(tmp_path):
    paths = _series(tmp_path)
    _edit(paths[4], ImageOrientationPatient=[0, 1, 0, 0, 0, -1])
    assert "mixes orientations" in _refusal(tmp_path / "series")


def test_gantry_tilt_is_refused(tmp_path):
    paths = _series(tmp_path)
    for k, path in enumerate(paths):  # each slice 0.5 mm further along y: about 9.5 degrees over 3 mm steps
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        _edit(path, ImagePositionPatient=[x, y + 0.5 * k, z])
    assert "gantry tilt" in _refusal(tmp_path / "series")


def test_a_slice_without_position_is_named(tmp_path):
    paths = _series(tmp_path)
    _edit(paths[2], ImagePositionPatient=None)
    message = _refusal(tmp_path / "series")
    assert "slice002.dcm" in message and "cannot be placed in 3D" in message


def test_a_one_slice_series_is_a_2d_image(tmp_path):
    paths = _series(tmp_path)
    for path in paths[1:]:
        path.unlink()
    assert "single slice: it is a 2D image" in _refusal(tmp_path / "series")


def test_two_series_in_one_folder_are_listed_and_one_can_be_chosen(tmp_path):
    write_series(_image(), tmp_path / "both", series_uid="1.2.3.1")
    write_series(_image(), tmp_path / "both" / "second", series_uid="1.2.3.2")
    assert set(find_series(tmp_path / "both")) == {"1.2.3.1", "1.2.3.2"}
    assert "2 series in one folder" in _refusal(tmp_path / "both")
    assert read_dicom_series(tmp_path / "both", series_uid="1.2.3.2").meta["SeriesInstanceUID"] == "1.2.3.2"


def test_4d_and_2d_files_are_refused_with_their_shape(tmp_path):
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 3), np.float32), np.eye(4)), tmp_path / "t.nii.gz")
    with pytest.raises(DataError, match="4D data \\(4 x 5 x 6 x 3"):
        read_volume(tmp_path / "t.nii.gz")
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkInt16), str(tmp_path / "flat.mhd"))
    with pytest.raises(DataError, match="not a 3D volume: its shape is 8 x 9"):
        read_volume(tmp_path / "flat.mhd")


def test_a_volume_over_the_size_limit_is_refused_from_its_header(tmp_path):
    header = tmp_path / "bomb.mhd"  # 4096^3 voxels declared, 10 bytes of data
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4096 4096 4096\nElementType = MET_SHORT\nElementDataFile = bomb.raw\n")
    (tmp_path / "bomb.raw").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="over the limit"):
        read_volume(header)


def test_a_truncated_raw_file_is_a_data_error(tmp_path):
    sitk.WriteImage(_image(), str(tmp_path / "scan.mhd"))
    raw = tmp_path / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:100])
    with pytest.raises(DataError, match="scan.mhd: the voxel data is missing, truncated or corrupt"):
        read_volume(tmp_path / "scan.mhd")


def test_mask_components_become_boxes_by_the_stated_rule():
    from medrpn.data.mask_boxes import boxes_from_mask

    mask = np.zeros((10, 12, 8), dtype=np.uint8)
    mask[1:3, 2:5, 1:2] = 1  # 6 voxels
    mask[3, 5, 1] = 1  # touches the first only at an edge: its own lesion with face connectivity
    mask[6:9, 6:7, 3:6] = 1  # 9 voxels
    mask[6:9, 7:8, 3:6] = 2  # a class-2 lesion against it: separate, its own class
    found = boxes_from_mask(mask, min_voxels=2)
    assert found.boxes.tolist() == [[1, 2, 1, 3, 5, 2], [6, 6, 3, 9, 7, 6], [6, 7, 3, 9, 8, 6]]
    assert found.labels.tolist() == [0, 0, 1] and found.voxels.tolist() == [6, 9, 9] and found.dropped == 1
    joined = boxes_from_mask(mask, min_voxels=2, connectivity=2)  # the edge neighbour joins the first lesion
    assert joined.boxes.tolist()[0] == [1, 2, 1, 4, 6, 2] and joined.dropped == 0
    flat = boxes_from_mask(mask[:, :, 1].T.copy())  # 2D (rows = y, columns = x): boxes in x, y
    assert flat.boxes.tolist() == [[1, 2, 3, 5], [3, 5, 4, 6]]
