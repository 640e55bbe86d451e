"""Annotations on volumes: voxel boxes in a file's own axes, LUNA16's world centres and lesion masks
all end as boxes around the same voxels of the volume medrpn reads (LPS orientation). The files
are written by SimpleITK, in an orientation that medrpn must flip on every axis."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medrpn.data.annotations import detect_format, read_annotations
from medrpn.data.problems import Problems
from medrpn.data.volume_files import read_volume
from medrpn.errors import DataError

import SimpleITK as sitk  # noqa: E402 (a dependency: another tool writes the test files)

SIZE = (30, 26, 14)  # file axes (i, j, k)
SPACING = (0.8, 0.8, 2.5)
DIRECTION = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, -1.0)  # towards R, A, I: all flipped in LPS
LESION = (slice(4, 9), slice(10, 13), slice(3, 5))  # file index ranges of a bright block


def _write(path: Path, array_ijk: np.ndarray) -> "sitk.Image":
    image = sitk.GetImageFromArray(array_ijk.transpose(2, 1, 0).copy())
    image.SetSpacing(SPACING)
    image.SetOrigin((12.0, -7.0, 40.0))
    image.SetDirection(DIRECTION)
    sitk.WriteImage(image, str(path))
    return image


def _scan(tmp_path: Path, name: str = "scan.mhd") -> tuple[Path, "sitk.Image"]:
    array = np.zeros(SIZE, dtype=np.int16)
    array[LESION] = 500
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, _write(path, array)


def _covers_the_lesion(path: Path, box) -> bool:
    """The box, in the volume medrpn reads, holds exactly the bright voxels."""
    array = read_volume(path).array
    x1, y1, z1, x2, y2, z2 = (int(round(v)) for v in box)
    inside = array[x1:x2, y1:y2, z1:z2]
    return bool((inside == 500).all() and (array == 500).sum() == inside.size)


def test_voxel_boxes_in_the_files_axes_land_on_the_lesion(tmp_path):
    scan, _ = _scan(tmp_path)
    csv = tmp_path / "boxes.csv"
    box = [LESION[0].start, LESION[1].start, LESION[2].start, LESION[0].stop, LESION[1].stop, LESION[2].stop]
    csv.write_text("image,x1,y1,z1,x2,y2,z2,label,patient_id\n" f"scan.mhd,{','.join(map(str, box))},lesion,P1\n")
    assert detect_format(csv) == "csv3d"
    records, classes = read_annotations(csv)
    assert classes == ["lesion"] and records[0].spatial_dims == 3 and records[0].patient_id == "P1"
    assert records[0].boxes.shape == (1, 6) and _covers_the_lesion(scan, records[0].boxes[0])


def test_bad_voxel_boxes_are_problems_naming_the_line(tmp_path):
    _scan(tmp_path)
    csv = tmp_path / "boxes.csv"
    csv.write_text("image,x1,y1,z1,x2,y2,z2,label\nscan.mhd,1,1,nan,3,3,3,a\nscan.mhd,1,1,1,3,3,40,a\nmissing.nii.gz,1,1,1,2,2,2,a\n")
    problems = Problems("skip")
    records, _ = read_annotations(csv, problems=problems)
    assert records == []
    text = "\n".join(str(p.error) for p in problems)
    assert "row 2: z1 is not a finite number" in text
    assert "row 3: box [1, 1, 1, 3, 3, 40] lies outside its 30x26x14 voxel volume" in text
    assert "missing.nii.gz: no such file or folder" in text


def test_luna16_world_centres_become_boxes_and_every_scan_a_record(tmp_path):
    scan, image = _scan(tmp_path / "subset0", "1.3.6.1.4.1.14519.5.2.1.6279.6001.100.mhd")
    _scan(tmp_path / "subset1", "1.3.6.1.4.1.14519.5.2.1.6279.6001.200.mhd")  # no nodule listed
    centre_index = [(s.start + s.stop - 1) / 2 for s in LESION]  # the block's centre, continuous file index
    centre = image.TransformContinuousIndexToPhysicalPoint(centre_index)
    csv = tmp_path / "annotations.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n" f"1.3.6.1.4.1.14519.5.2.1.6279.6001.100,{centre[0]},{centre[1]},{centre[2]},4.0\n")
    assert detect_format(csv) == "luna16"
    records, classes = read_annotations(csv)
    assert classes == ["nodule"] and len(records) == 2
    found = {r.image_path.name: r for r in records}
    empty = found["1.3.6.1.4.1.14519.5.2.1.6279.6001.200.mhd"]
    assert len(empty.boxes) == 0 and empty.boxes.shape == (0, 6)
    box = found[scan.name].boxes[0]
    # a 4 mm sphere about the block's centre: 5 x 5 x 1.6 voxels, centred where medrpn reads the block
    assert np.allclose(box[3:] - box[:3], [4 / 0.8, 4 / 0.8, 4 / 2.5], atol=1e-4)
    array = read_volume(scan).array
    lesion_centre = np.argwhere(array == 500).mean(axis=0) + 0.5  # box coordinates of the block's centre
    assert np.allclose((box[:3] + box[3:]) / 2, lesion_centre, atol=1e-4)


def test_luna16_rows_of_unknown_series_are_problems(tmp_path):
    _scan(tmp_path, "9.9.mhd")
    csv = tmp_path / "annotations.csv"
    csv.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,0,0,0,5\n")
    with pytest.raises(DataError, match=r"row 2: no volume 1\.2\.3\.mhd"):
        read_annotations(csv)


def test_lesion_masks_become_one_box_per_lesion_on_the_images_grid(tmp_path):
    scan, _ = _scan(tmp_path)
    mask = np.zeros(SIZE, dtype=np.uint8)
    mask[LESION] = 1
    mask[20:22, 2:4, 10:12] = 1  # a second lesion
    mask[25, 20, 1] = 1  # a one-voxel speck
    _write(tmp_path / "mask.nii.gz", mask)  # written as NIfTI (RAS on disk): another orientation than the scan's
    csv = tmp_path / "masks.csv"
    csv.write_text("image,mask,patient_id\nscan.mhd,mask.nii.gz,P7\n")
    assert detect_format(csv) == "masks"
    records, classes = read_annotations(csv)
    assert classes == ["lesion"] and len(records[0].boxes) == 3
    sizes = sorted(int(np.prod(b[3:] - b[:3])) for b in records[0].boxes)
    assert sizes == [1, 8, 30]
    biggest = max(records[0].boxes, key=lambda b: np.prod(b[3:] - b[:3]))
    assert _covers_the_lesion(scan, biggest)


def test_a_mask_on_another_grid_is_refused(tmp_path):
    _scan(tmp_path)
    small = sitk.GetImageFromArray(np.zeros((5, 5, 5), np.uint8))
    sitk.WriteImage(small, str(tmp_path / "mask.nii.gz"))
    csv = tmp_path / "masks.csv"
    csv.write_text("image,mask\nscan.mhd,mask.nii.gz\n")
    with pytest.raises(DataError, match="is not on the grid of"):
        read_annotations(csv)


def test_check_data_reports_volumes_per_scan_and_skips_a_truncated_one(tmp_path, capsys):
    from medrpn.cli import main

    rows = ["image,mask,patient_id"]
    for n in range(4):
        scan, _ = _scan(tmp_path / f"p{n}", "scan.mhd")
        mask = np.zeros(SIZE, dtype=np.uint8)
        mask[LESION] = 1
        _write(scan.parent / "mask.nii.gz", mask)
        rows.append(f"p{n}/scan.mhd,p{n}/mask.nii.gz,P{n}")
    raw = tmp_path / "p3" / "scan.raw"
    raw.write_bytes(raw.read_bytes()[:200])  # its header reads; its voxels do not
    (tmp_path / "masks.csv").write_text("\n".join(rows) + "\n")
    try:
        main(["check-data", "--data.annotations", str(tmp_path / "masks.csv"), "--data.val_fraction", "0.34", "--data.test_fraction", "0"])
        code = 0
    except SystemExit as exit:
        code = exit.code
    out = capsys.readouterr().out
    assert code == 0, out
    assert "scans         found 4, readable 3, unreadable 1" in out
    assert f"{tmp_path / 'p3' / 'scan.mhd'}: the voxel data is missing, truncated or corrupt" in out
    assert "p0/scan.mhd: 30 x 26 x 14 voxels of 0.80 x 0.80 x 2.50 mm, patient P0, 1 boxes" in out
    # the lesion block is 5 x 3 x 2 voxels: 4.0 x 2.4 x 5.0 mm
    assert "box x         min 5.0, 5% 5.0, median 5.0, 95% 5.0, max 5.0 voxels; min 4.0" in out
    assert "box z         min 2.0, 5% 2.0, median 2.0, 95% 2.0, max 2.0 voxels; min 5.0" in out
    assert "split train   2 patients, 2 scans, 2 boxes" in out and "patient leak  none" in out
    assert "verdict       ready to train" in out
