"""COCO and CSV annotation readers: records, label mapping, empty images, patient ids, and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medrpn.data.annotations import read_annotations, read_coco, read_csv
from medrpn.errors import DataError


def write_coco(path: Path, images=None, annotations=None, categories=None) -> Path:
    data = {
        "images": images
        if images is not None
        else [
            {"id": 7, "file_name": "a.dcm", "width": 100, "height": 80, "patient_id": "P1"},
            {"id": 3, "file_name": "sub/b.png", "width": 50, "height": 50, "patient_id": 12},
            {"id": 9, "file_name": "/data/abs/c.dcm", "width": 50, "height": 50},
        ],
        "annotations": annotations
        if annotations is not None
        else [
            {"id": 1, "image_id": 7, "category_id": 5, "bbox": [10, 20, 30, 40]},
            {"id": 2, "image_id": 7, "category_id": 2, "bbox": [0.5, 1.5, 2.0, 3.0]},
            {"id": 3, "image_id": 3, "category_id": 5, "bbox": [1, 1, 4, 4], "iscrowd": 1},
        ],
        "categories": categories
        if categories is not None
        else [{"id": 5, "name": "nodule"}, {"id": 2, "name": "mass"}],
    }
    path.write_text(json.dumps(data))
    return path


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_coco_records_labels_and_paths(tmp_path):
    records, names = read_annotations(write_coco(tmp_path / "train.json"))
    assert names == ["mass", "nodule"]  # categories sorted by id: 2 -> 0, 5 -> 1
    assert [r.image_path for r in records] == [tmp_path / "a.dcm", tmp_path / "sub/b.png", Path("/data/abs/c.dcm")]
    a, b, c = records
    np.testing.assert_array_equal(a.boxes, [[10, 20, 40, 60], [0.5, 1.5, 2.5, 4.5]])  # xywh -> xyxy
    assert a.boxes.dtype == np.float32 and a.labels.dtype == np.int64
    np.testing.assert_array_equal(a.labels, [1, 0])
    assert b.boxes.shape == (0, 4) and b.labels.shape == (0,)  # its only annotation is a crowd one
    assert c.boxes.shape == (0, 4)  # listed without any annotation
    assert (a.patient_id, b.patient_id, c.patient_id) == ("P1", "12", None)


def test_coco_with_given_class_names_maps_by_name(tmp_path):
    records, names = read_coco(write_coco(tmp_path / "a.json"), class_names=["background-free", "nodule", "mass"])
    assert names == ["background-free", "nodule", "mass"]
    np.testing.assert_array_equal(records[0].labels, [1, 2])
    with pytest.raises(DataError, match=r"categories \['mass'\] are not among the given class names") as err:
        read_coco(tmp_path / "a.json", class_names=["nodule"])
    assert err.value.path == str(tmp_path / "a.json")


@pytest.mark.parametrize(
    ("bbox", "reason"),
    [
        ([10, 10, -5, 4], "width and height must be positive"),
        ([10, 10, 5, 0], "width and height must be positive"),
        ([10, "ten", 5, 4], "finite numbers"),
        ([10, 10, 5], r"must be \[x, y, width, height\]"),
        (None, r"must be \[x, y, width, height\]"),
    ],
)
def test_coco_bad_bbox_names_file_and_annotation(tmp_path, bbox, reason):
    path = write_coco(
        tmp_path / "bad.json", annotations=[{"id": 42, "image_id": 7, "category_id": 5, "bbox": bbox}]
    )
    with pytest.raises(DataError, match=f"annotation 42: bbox .*{reason}") as err:
        read_coco(path)
    assert err.value.path == str(path)


def test_coco_structure_errors(tmp_path):
    ann = {"id": 8, "image_id": 99, "category_id": 5, "bbox": [0, 0, 1, 1]}
    path = write_coco(tmp_path / "x.json", annotations=[ann])
    with pytest.raises(DataError, match="annotation 8: image_id 99 is not in 'images'"):
        read_coco(path)
    path = write_coco(tmp_path / "x.json", annotations=[{**ann, "image_id": 7, "category_id": 1}])
    with pytest.raises(DataError, match="annotation 8: category_id 1 is not in 'categories'"):
        read_coco(path)
    path = write_coco(tmp_path / "x.json", images=[{"id": 1}])
    with pytest.raises(DataError, match="image number 1 has no 'file_name'"):
        read_coco(path)
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="not COCO detection JSON"):
        read_coco(tmp_path / "list.json")
    (tmp_path / "broken.json").write_text('{"images": [\n  {"id": 1,,}\n]}')
    with pytest.raises(DataError, match="invalid JSON") as err:
        read_coco(tmp_path / "broken.json")
    assert err.value.row == 2


CSV_TEXT = """image,x1,y1,x2,y2,label,patient_id
scans/one.png,10,20,30,40,nodule,P1
scans/two.png,,,,,,P2
scans/one.png,1.5,2.5,3.5,4.5,mass,P1
/abs/three.dcm,0,0,5,5,nodule,
"""


def test_csv_groups_rows_and_keeps_empty_images(tmp_path):
    records, names = read_annotations(write_csv(tmp_path / "labels.csv", CSV_TEXT))
    assert names == ["mass", "nodule"]
    expected = [tmp_path / "scans/one.png", tmp_path / "scans/two.png", Path("/abs/three.dcm")]
    assert [r.image_path for r in records] == expected
    one, two, three = records
    np.testing.assert_array_equal(one.boxes, [[10, 20, 30, 40], [1.5, 2.5, 3.5, 4.5]])
    np.testing.assert_array_equal(one.labels, [1, 0])
    assert two.boxes.shape == (0, 4) and two.labels.shape == (0,)
    assert (one.patient_id, two.patient_id, three.patient_id) == ("P1", "P2", None)


def test_csv_with_given_class_names_and_without_patient_column(tmp_path):
    path = write_csv(tmp_path / "l.csv", "image,x1,y1,x2,y2,label\na.png,0,0,2,2,mass\n")
    records, names = read_csv(path, class_names=["nodule", "mass", "calcification"])
    assert names == ["nodule", "mass", "calcification"]
    np.testing.assert_array_equal(records[0].labels, [1])
    assert records[0].patient_id is None


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ("a.png,1,2,x,4,mass", "x2 is not a number"),
        ("a.png,1,2,nan,4,mass", "x2 is not a finite number"),
        ("a.png,-1,2,3,4,mass", "x1 is negative"),
        ("a.png,5,2,3,4,mass", "empty or inverted box"),
        ("a.png,1,4,3,4,mass", "empty or inverted box"),
        ("a.png,1,2,3,4,tumour", "unknown class 'tumour'"),
        ("a.png,1,2,3,,mass", "incomplete box: y2 empty"),
        ("a.png,1,2,3,4", "expected 6 fields"),
        (",1,2,3,4,mass", "empty 'image' field"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, row, reason):
    path = write_csv(tmp_path / "bad.csv", f"image,x1,y1,x2,y2,label\nok.png,1,1,2,2,mass\n\n{row}\n")
    with pytest.raises(DataError, match=reason) as err:
        read_csv(path, class_names=["mass", "nodule"])
    assert err.value.path == str(path)
    assert err.value.row == 4  # header = line 1; the blank line 3 still counts
    assert f"{path}, row 4" in str(err.value)


def test_csv_missing_column_is_a_header_error(tmp_path):
    path = write_csv(tmp_path / "bad.csv", "image,x1,y1,x2,label\na.png,1,2,3,mass\n")
    with pytest.raises(DataError, match="missing column.*y2") as err:
        read_csv(path)
    assert err.value.row == 1


def test_csv_conflicting_patient_ids(tmp_path):
    path = write_csv(tmp_path / "p.csv", "image,x1,y1,x2,y2,label,patient_id\na.png,,,,,,P1\na.png,,,,,,P2\n")
    with pytest.raises(DataError, match="several patient ids"):
        read_csv(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="unknown annotation format '.xml'"):
        read_annotations(tmp_path / "labels.xml")
    for name in ("missing.csv", "missing.json"):
        with pytest.raises(DataError, match="file not found") as err:
            read_annotations(tmp_path / name)
        assert err.value.path == str(tmp_path / name)
