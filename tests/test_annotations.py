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
        ([10, "ten", 5, 4], "values must be numbers"),
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
        ("a.png,-5,2,3,4,mass", "x1 is negative"),
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


# ---------------------------------------------------------------------------------------------
# YOLO

import os  # noqa: E402

from PIL import Image as PILImage  # noqa: E402

from medrpn.data.annotations import detect_format  # noqa: E402
from medrpn.data.formats import read_monai_datalist, read_yolo  # noqa: E402
from medrpn.data.problems import Problems  # noqa: E402


def _image(path: Path, width: int, height: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.new("L", (width, height), 40).save(path)
    return path


def test_yolo_folder_with_boxes_in_pixels(tmp_path):
    _image(tmp_path / "0" / "12.jpg", 200, 100)
    (tmp_path / "0" / "12.txt").write_text("1 0.5 0.5 0.2 0.4\n0 0.25 0.75 0.1 0.1")  # no final newline
    _image(tmp_path / "1" / "7.png", 64, 64)  # no label file: no lesion
    _image(tmp_path / "1" / "8.png", 64, 64)
    (tmp_path / "1" / "8.txt").write_text("\n")  # empty label file: no lesion
    (tmp_path / "README.txt").write_text("not a label file: no image beside it in this folder")
    assert detect_format(tmp_path) == "yolo"
    records, names = read_annotations(tmp_path, class_names=["small", "large"])
    assert names == ["small", "large"]
    assert [r.image_path.relative_to(tmp_path).as_posix() for r in records] == ["0/12.jpg", "1/7.png", "1/8.png"]
    np.testing.assert_allclose(records[0].boxes, [[80, 30, 120, 70], [40, 70, 60, 80]], atol=1e-4)
    assert records[0].labels.tolist() == [1, 0] and records[0].box_rows.tolist() == [1, 2]
    assert len(records[1].boxes) == 0 and len(records[2].boxes) == 0


def test_yolo_names_from_classes_txt_and_data_yaml(tmp_path):
    _image(tmp_path / "a.png", 10, 10)
    (tmp_path / "a.txt").write_text("2 0.5 0.5 0.5 0.5\n")
    (tmp_path / "classes.txt").write_text("cyst\nnodule\nmass\n")
    records, names = read_yolo(tmp_path)
    assert names == ["cyst", "nodule", "mass"] and records[0].labels.tolist() == [2]

    root = tmp_path / "ultra"
    _image(root / "images" / "train" / "x.png", 20, 10)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "x.txt").write_text("0 0.5 0.5 1.0 1.0\n")
    _image(root / "images" / "val" / "y.png", 20, 10)
    spec = root / "data.yaml"
    spec.write_text("path: .\ntrain: images/train\nval: images/val\nnames:\n  0: lesion\n")
    assert detect_format(spec) == "yolo"
    records, names = read_annotations(spec)
    assert names == ["lesion"]
    assert [r.image_path.name for r in records] == ["x.png", "y.png"]
    np.testing.assert_allclose(records[0].boxes, [[0, 0, 20, 10]])


def test_yolo_without_names_is_refused(tmp_path):
    _image(tmp_path / "a.png", 10, 10)
    with pytest.raises(DataError, match="YOLO class ids need names") as err:
        read_yolo(tmp_path)
    assert err.value.path == str(tmp_path)


@pytest.mark.parametrize(
    ("line", "kind", "reason"),
    [
        ("3 0.5 0.5 0.2 0.2", "unknown_class", "unknown class id 3"),
        ("0 0.95 0.5 0.3 0.2", "outside", "outside its 100x50"),
        ("0 0.5 0.5 0.2", "bad_row", "expected 'class x_center y_center width height', got 4 values"),
        ("0 0.5 0.5 0 0.2", "zero_size", "zero-sized"),
        ("zero 0.5 0.5 0.2 0.2", "bad_row", "not numbers"),
    ],
)
def test_yolo_bad_lines_name_the_label_file_and_line(tmp_path, line, kind, reason):
    _image(tmp_path / "good.png", 100, 50)
    (tmp_path / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    _image(tmp_path / "bad.png", 100, 50)
    (tmp_path / "bad.txt").write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(DataError, match=reason) as err:
        read_yolo(tmp_path, ["a", "b"])
    assert (err.value.path, err.value.row) == (str(tmp_path / "bad.txt"), 2)
    problems = Problems("skip")
    records, _ = read_yolo(tmp_path, ["a", "b"], problems)
    assert [r.image_path.name for r in records] == ["good.png"]  # the image with the bad line is left out
    assert [p.kind for p in problems] == [kind] and problems.items[0].image == str(tmp_path / "bad.png")


def test_yolo_label_without_its_image_is_a_missing_image(tmp_path):
    _image(tmp_path / "1.png", 10, 10)
    (tmp_path / "1.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (tmp_path / "2.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(DataError, match="label file without its image") as err:
        read_yolo(tmp_path, ["a"])
    assert err.value.path == str(tmp_path / "2.txt")


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    _image(tmp_path / "ok" / "1.png", 10, 10)
    locked = tmp_path / "locked"
    _image(locked / "2.png", 10, 10)
    locked.chmod(0)
    try:
        if os.access(locked, os.R_OK):  # running as root: permissions do not stop us, so the OS refusal is simulated
            real_scandir = os.scandir

            def refusing_scandir(path="."):
                if Path(path) == locked:
                    raise PermissionError(13, "Permission denied", str(path))
                return real_scandir(path)

            monkeypatch.setattr(os, "scandir", refusing_scandir)
        with pytest.raises(DataError, match="cannot list this folder") as err:
            read_yolo(tmp_path, ["a"])
        assert err.value.path == str(locked)
        problems = Problems("skip")
        records, _ = read_yolo(tmp_path, ["a"], problems)
        assert [r.image_path.name for r in records] == ["1.png"] and [p.kind for p in problems] == ["unreadable_folder"]
    finally:
        locked.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# MONAI detection datalist (2D)


def test_monai_datalist_reads_every_section(tmp_path):
    path = tmp_path / "datalist.json"
    path.write_text(
        json.dumps(
            {
                "training": [
                    {"image": "a.png", "box": [[1, 2, 11, 22], [5, 5, 9, 9]], "label": [1, 0], "patient_id": "P1"},
                    {"image": "b.png", "box": [], "label": []},
                ],
                "validation": [{"image": "/abs/c.dcm", "box": [[0, 0, 4, 4]], "label": [2]}],
            }
        )
    )
    assert detect_format(path) == "monai"
    records, names = read_annotations(path)
    assert names == ["0", "1", "2"]
    assert [r.image_path for r in records] == [tmp_path / "a.png", tmp_path / "b.png", Path("/abs/c.dcm")]
    np.testing.assert_array_equal(records[0].boxes, [[1, 2, 11, 22], [5, 5, 9, 9]])
    assert records[0].labels.tolist() == [1, 0] and records[0].patient_id == "P1"
    assert len(records[1].boxes) == 0


@pytest.mark.parametrize(("mode", "box"), [("xywh", [1, 2, 10, 20]), ("ccwh", [6, 12, 10, 20])])
def test_monai_box_modes_convert_to_xyxy(tmp_path, mode, box):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [{"image": "a.png", "box": [box], "label": [0]}]}))
    records, _ = read_monai_datalist(path, ["lesion"], box_mode=mode)
    np.testing.assert_allclose(records[0].boxes, [[1, 2, 11, 22]])


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        ({"image": "a.png", "box": [[1, 2, 3, 4, 5, 6]], "label": [0]}, r"training\[0\]: a 3D box"),
        ({"image": "a.png", "box": [[1, 2, 3, 4]], "label": [5]}, r"training\[0\]: unknown label 5"),
        ({"image": "a.png", "box": [[5, 2, 3, 4]], "label": [0]}, r"training\[0\]: empty or inverted box"),
        ({"image": "a.png", "box": [[1, 2, 3, 4]], "label": []}, r"training\[0\]: 1 boxes but 0 labels"),
        ({"box": [[1, 2, 3, 4]], "label": [0]}, r"training\[0\]: an item needs an 'image' path"),
    ],
)
def test_monai_datalist_errors_name_the_item(tmp_path, item, reason):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": [item]}))
    with pytest.raises(DataError, match=reason) as err:
        read_monai_datalist(path, ["a", "b"])
    assert err.value.path == str(path)


# ---------------------------------------------------------------------------------------------
# Policies, sizes, detection


def test_csv_skip_policy_collects_every_problem_and_keeps_the_good_images(tmp_path):
    path = write_csv(
        tmp_path / "l.csv",
        "image,x1,y1,x2,y2,label\n"
        "good.png,1,1,5,5,mass\n"
        "neg.png,-8,1,5,5,mass\n"
        "inv.png,9,1,5,5,mass\n"
        "zero.png,1,1,1,5,mass\n"
        "cls.png,1,1,5,5,tumour\n"
        "short.png,1,1\n",
    )
    problems = Problems("skip")
    records, _ = read_csv(path, ["mass"], problems)
    assert [r.image_path.name for r in records] == ["good.png"]
    assert [(p.kind, p.error.row) for p in problems] == [
        ("negative", 3), ("inverted", 4), ("zero_size", 5), ("unknown_class", 6), ("bad_row", 7)
    ]


def test_coco_box_outside_its_stated_image_size(tmp_path):
    path = write_coco(
        tmp_path / "a.json", annotations=[{"id": 5, "image_id": 7, "category_id": 5, "bbox": [90, 10, 30, 10]}]
    )
    with pytest.raises(DataError, match="annotation 5: box \\[90, 10, 120, 20\\] lies outside its 100x80"):
        read_coco(path)


def test_format_detection_by_content(tmp_path):
    for header, expected in [
        ("image,x1,y1,x2,y2,label", "csv"),
        ("image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max", "vindr"),
        ("patientId,x,y,width,height,Target", "rsna"),
        ("Image Index,Finding Label,Bbox [x,y,w,h],,,", "nih"),
    ]:
        assert detect_format(write_csv(tmp_path / f"{expected}.csv", header + "\n")) == expected
    with pytest.raises(DataError, match="unrecognised CSV header") as err:
        detect_format(write_csv(tmp_path / "other.csv", "a,b,c\n"))
    assert err.value.row == 1


# ---------------------------------------------------------------------------------------------
# A coordinate that is not a finite number, in every format


def _non_finite_yolo(tmp_path: Path) -> tuple[Path, Path, int | None, str]:
    _image(tmp_path / "good.png", 100, 50)
    (tmp_path / "good.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    _image(tmp_path / "bad.png", 100, 50)
    (tmp_path / "bad.txt").write_text("0 0.5 0.5 0.2 0.2\n0 nan nan nan nan\n")  # the line of issue 21
    (tmp_path / "classes.txt").write_text("lesion\n")
    return tmp_path, tmp_path / "bad.txt", 2, "x1, y1, x2, y2 are not a finite number"


def _non_finite_csv(tmp_path: Path) -> tuple[Path, Path, int | None, str]:
    path = write_csv(tmp_path / "l.csv", "image,x1,y1,x2,y2,label\ngood.png,1,1,5,5,mass\nbad.png,1,1,inf,5,mass\n")
    return path, path, 3, "x2 is not a finite number"


def _non_finite_coco(tmp_path: Path) -> tuple[Path, Path, int | None, str]:
    path = write_coco(  # json writes float("nan") as NaN, and reads it back
        tmp_path / "a.json",
        images=[{"id": 3, "file_name": "good.png"}, {"id": 7, "file_name": "bad.png"}],
        annotations=[
            {"id": 1, "image_id": 3, "category_id": 5, "bbox": [1, 1, 4, 4]},
            {"id": 42, "image_id": 7, "category_id": 5, "bbox": [10, float("nan"), 5, 4]},
        ],
    )
    return path, path, None, "annotation 42: y1, y2 are not a finite number"


def _non_finite_monai(tmp_path: Path) -> tuple[Path, Path, int | None, str]:
    items = [
        {"image": "good.png", "box": [[1, 2, 3, 4]], "label": [0]},
        {"image": "bad.png", "box": [[1, 2, float("inf"), 4]], "label": [0]},
    ]
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"training": items}))
    return path, path, None, r"training\[1\]: x2 is not a finite number"


def _non_finite_vindr(tmp_path: Path) -> tuple[Path, Path, int | None, str]:
    path = write_csv(
        tmp_path / "train.csv",
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        "good,Nodule/Mass,8,R1,1,1,5,5\n"
        "good,Nodule/Mass,8,R2,1,1,5,5\n"  # two readers: one fused box
        "bad,Nodule/Mass,8,R2,1,1,5,nan\n",
    )
    return path, path, 4, "y2 is not a finite number"


def _non_finite_nih(tmp_path: Path) -> tuple[Path, Path, int | None, str]:
    path = write_csv(
        tmp_path / "BBox_List_2017.csv",
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\ngood_0.png,Mass,1,1,4,4\nbad_0.png,Mass,1,-inf,4,4\n",
    )
    return path, path, 3, "y1, y2 are not a finite number"


def _non_finite_rsna(tmp_path: Path) -> tuple[Path, Path, int | None, str]:
    path = write_csv(tmp_path / "labels.csv", "patientId,x,y,width,height,Target\ngood,1,1,4,4,1\nbad,nan,1,4,4,1\n")
    return path, path, 3, "x1, x2 are not a finite number"


@pytest.mark.parametrize(
    "write",
    [_non_finite_yolo, _non_finite_csv, _non_finite_coco, _non_finite_monai, _non_finite_vindr, _non_finite_nih, _non_finite_rsna],
)
def test_a_coordinate_that_is_not_a_finite_number_is_refused_in_every_format(tmp_path, write):
    """nan or inf passes every comparison (x2 > x1 ...): each reader must refuse it, naming the
    file and the line or entry, or the augmentation drops the box silently and a lesion is
    trained as background. Under skip, the image leaves training."""
    path, source, row, reason = write(tmp_path)
    with pytest.raises(DataError, match=reason) as err:
        read_annotations(path)
    assert (err.value.path, err.value.row) == (str(source), row)
    problems = Problems("skip")
    records, _ = read_annotations(path, problems=problems)
    assert [p.kind for p in problems] == ["not_finite"]
    assert "bad" in Path(problems.items[0].image).stem
    assert [r.image_path.stem for r in records if "bad" in r.image_path.stem] == []
    assert all(np.isfinite(r.boxes).all() for r in records) and sum(len(r.boxes) for r in records) == 1
