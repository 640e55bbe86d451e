"""The public chest X-ray annotation formats, on the real files shipped in the torchxrayvision package.

The counts come from the datasets' own documentation (and the issue that asked for these
readers): NIH ChestX-ray14 984 boxes on 880 images in 8 findings; RSNA Pneumonia 9,555 boxes on
6,012 positive images out of 26,684; VinDr-CXR 36,096 reader boxes on 15,000 images. No source
states how many boxes VinDr-CXR has after fusing its readers: the test works them out from the
file's rows with the documented rule, written out by hand here (not with `medrpn.data.fusion`).
torchxrayvision is only located, never imported (its import is slow and not needed).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import shutil
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from medrpn.data.annotations import detect_format, read_annotations
from medrpn.data.formats import read_nih, read_rsna, read_vindr, read_vindr_reader_boxes
from medrpn.data.fusion import FusionConfig, fuse_readers
from medrpn.data.problems import Problems
from medrpn.errors import ConfigError, DataError

_SPEC = importlib.util.find_spec("torchxrayvision")
XRV_DATA = Path(next(iter(_SPEC.submodule_search_locations))) / "data" if _SPEC else None


def xrv_file(name: str) -> Path:
    if XRV_DATA is None or not (XRV_DATA / name).is_file():
        pytest.skip(f"torchxrayvision's {name} is not installed (pip install torchxrayvision)")
    return XRV_DATA / name


@pytest.fixture(scope="module")
def rsna_csv(tmp_path_factory) -> Path:
    archive = xrv_file("kaggle_stage_2_train_labels.csv.zip")
    folder = tmp_path_factory.mktemp("rsna")
    with zipfile.ZipFile(archive) as z:
        z.extract("stage_2_train_labels.csv", folder)
    return folder / "stage_2_train_labels.csv"


@pytest.fixture(scope="module")
def vindr_records():
    return read_annotations(xrv_file("vinbigdata-train.csv.gz"))


@pytest.fixture(scope="module")
def vindr_raw():
    return read_vindr_reader_boxes(xrv_file("vinbigdata-train.csv.gz"))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def fused_counts_by_hand(path: Path, iou_threshold: float = 0.4, min_readers: int = 2) -> Counter:
    """Fused boxes per image id, from the CSV rows by the rule of `medrpn.data.fusion`'s docstring:
    per image and finding, visit the boxes by reader id then coordinates; a box joins the cluster
    with the highest mean IoU with its boxes (the first on a tie) if that is >= `iou_threshold` and
    the cluster has no box of its reader, else starts one; keep clusters of >= `min_readers` readers."""
    drawn = defaultdict(list)
    with gzip.open(path, "rt", newline="") as f:
        for row in csv.DictReader(f):
            if row["class_name"] != "No finding":
                box = tuple(float(row[c]) for c in ("x_min", "y_min", "x_max", "y_max"))
                drawn[row["image_id"], row["class_name"]].append((row["rad_id"], box))
    counts: Counter = Counter()
    for (image_id, _), boxes in drawn.items():
        clusters: list[list[tuple[str, tuple[float, ...]]]] = []
        for reader, box in sorted(boxes):
            overlaps = [
                (sum(_iou(box, b) for _, b in cluster) / len(cluster), -i)
                for i, cluster in enumerate(clusters)
                if reader not in {r for r, _ in cluster}
            ]
            best = max((o for o in overlaps if o[0] >= iou_threshold), default=None)
            if best is None:
                clusters.append([(reader, box)])
            else:
                clusters[-best[1]].append((reader, box))
        counts[image_id] += sum(len({r for r, _ in cluster}) >= min_readers for cluster in clusters)
    return counts


def _fused_count(raw, config: FusionConfig) -> int:
    return sum(
        len(fuse_readers(np.array(e.boxes), np.array(e.labels), e.readers, config)[0]) for e in raw.values() if e.boxes
    )


def test_nih_bbox_list():
    path = xrv_file("BBox_List_2017.csv.gz")
    assert detect_format(path) == "nih"
    records, names = read_annotations(path)
    assert sum(len(r.boxes) for r in records) == 984
    assert len(records) == 880
    assert names == sorted(names) and len(names) == 8 and "Infiltrate" in names
    first = records[0]  # 00013118_008.png, Atelectasis, x=225.08, y=547.02, w=86.78, h=79.19
    assert first.image_path == path.parent / "images" / "00013118_008.png"
    assert first.patient_id == "00013118"
    np.testing.assert_allclose(first.boxes[0], [225.0847, 547.0192, 225.0847 + 86.7797, 547.0192 + 79.1864], atol=1e-3)
    assert first.box_rows[0] == 2  # the line in the file
    assert all(r.boxes.max() <= 1024 for r in records)  # inside the 1024 x 1024 PNGs


def test_rsna_pneumonia_labels(rsna_csv):
    assert detect_format(rsna_csv) == "rsna"
    records, names = read_rsna(rsna_csv)
    assert names == ["Lung Opacity"]
    assert len(records) == 26_684
    positive = [r for r in records if len(r.boxes)]
    assert len(positive) == 6_012
    assert sum(len(r.boxes) for r in records) == 9_555
    assert all(r.patient_id == r.image_path.stem for r in records)
    assert records[0].image_path.parent == rsna_csv.parent / "stage_2_train_images"
    widths = np.concatenate([r.boxes[:, 2] - r.boxes[:, 0] for r in positive])
    assert widths.min() > 0 and np.concatenate([r.boxes for r in positive]).max() <= 1024


def test_vindr_reader_boxes_before_fusion(vindr_raw):
    boxes, names = vindr_raw
    assert len(boxes) == 15_000
    assert sum(len(entry.boxes) for entry in boxes.values()) == 36_096
    assert len(names) == 14 and names[0] == "Aortic enlargement" and names[-1] == "Pulmonary fibrosis"
    assert "No finding" not in names
    assert {reader for entry in boxes.values() for reader in entry.readers} >= {"R8", "R9", "R10"}


def test_vindr_fused(vindr_records, vindr_raw):
    """Default rule (IoU >= 0.4, at least 2 of the 3 readers): per image, as many boxes as the rule
    worked out by hand from the file's rows gives (8,824 boxes on 4,239 of the 15,000 images)."""
    records, names = vindr_records
    assert len(records) == 15_000 and len(names) == 14
    with_boxes = [r for r in records if len(r.boxes)]
    by_hand = fused_counts_by_hand(xrv_file("vinbigdata-train.csv.gz"))
    assert {r.image_path.stem: len(r.boxes) for r in with_boxes} == {k: n for k, n in by_hand.items() if n}
    assert sum(len(r.boxes) for r in records) == sum(by_hand.values())
    nothing_merges = fused_counts_by_hand(xrv_file("vinbigdata-train.csv.gz"), iou_threshold=1.01, min_readers=1)
    assert sum(nothing_merges.values()) == 36_096  # the hand-written rule keeps every reader box when told to
    assert all(r.image_path.suffix == ".dicom" and r.image_path.parent.name == "train" for r in records)
    raw, _ = vindr_raw
    for record in with_boxes[:500]:  # fusion never invents a class, and stays within the readers' boxes
        entry = raw[record.image_path]
        assert set(record.labels.tolist()) <= set(entry.labels)
        assert record.boxes.min() >= np.min(entry.boxes) and record.boxes.max() <= np.max(entry.boxes)


def test_vindr_fusion_settings_move_the_count_the_right_way(vindr_raw, vindr_records):
    raw, _ = vindr_raw
    assert _fused_count(raw, FusionConfig(iou_threshold=1.01, min_readers=1)) == 36_096  # nothing merges
    union = _fused_count(raw, FusionConfig(min_readers=1))
    consensus = sum(len(r.boxes) for r in vindr_records[0])
    unanimous = _fused_count(raw, FusionConfig(min_readers=3))
    assert 36_096 > union > consensus > unanimous > 0


# ---------------------------------------------------------------------------------------------
# The fusion rule itself


def test_three_readers_on_one_lesion_become_one_mean_box():
    boxes = np.array([[10, 10, 50, 50], [12, 8, 52, 48], [8, 12, 48, 52]], dtype=float)
    fused, labels, support = fuse_readers(boxes, np.zeros(3), ["R1", "R2", "R3"])
    np.testing.assert_allclose(fused, [boxes.mean(axis=0)])
    assert labels.tolist() == [0] and support.tolist() == [3]


def test_a_finding_of_one_reader_is_dropped_by_consensus_and_kept_by_union():
    boxes = np.array([[10, 10, 50, 50], [12, 10, 50, 52], [200, 200, 240, 240]], dtype=float)
    readers = ["R1", "R2", "R1"]
    fused, _, support = fuse_readers(boxes, np.zeros(3), readers, FusionConfig(min_readers=2))
    assert len(fused) == 1 and support.tolist() == [2]
    fused, _, support = fuse_readers(boxes, np.zeros(3), readers, FusionConfig(min_readers=1))
    assert len(fused) == 2 and sorted(support.tolist()) == [1, 2]


def test_one_reader_cannot_confirm_their_own_box_and_classes_never_merge():
    boxes = np.array([[10, 10, 50, 50], [10, 10, 50, 50], [11, 11, 51, 51]], dtype=float)
    fused, _, _ = fuse_readers(boxes, np.zeros(3), ["R1", "R1", "R1"], FusionConfig(min_readers=2))
    assert len(fused) == 0
    fused, labels, _ = fuse_readers(boxes, np.array([0, 1, 1]), ["R1", "R2", "R3"], FusionConfig(min_readers=1))
    assert sorted(labels.tolist()) == [0, 1] and len(fused) == 2


def test_fusion_settings_are_checked():
    with pytest.raises(ConfigError, match="min_readers"):
        FusionConfig(min_readers=0)
    with pytest.raises(ConfigError, match="iou_threshold"):
        FusionConfig(iou_threshold=0)


# ---------------------------------------------------------------------------------------------
# Bad rows in these formats


def test_bad_rows_of_the_public_formats_name_file_and_row(tmp_path):
    vindr = tmp_path / "train.csv"
    vindr.write_text(
        "image_id,class_name,class_id,rad_id,x_min,y_min,x_max,y_max\n"
        "a,Nodule/Mass,8,R1,10,10,30,30\n"
        "b,Nodule/Mass,8,R1,30,10,10,30\n"
    )
    with pytest.raises(DataError, match="empty or inverted box") as err:
        read_vindr(vindr)
    assert (err.value.path, err.value.row) == (str(vindr), 3)

    rsna = tmp_path / "labels.csv"
    rsna.write_text("patientId,x,y,width,height,Target\np1,,,,,0\np2,10,-20,30,30,1\n")
    with pytest.raises(DataError, match="y1 is negative") as err:
        read_rsna(rsna)
    assert err.value.row == 3

    nih = tmp_path / "BBox_List_2017.csv"
    nih.write_text("Image Index,Finding Label,Bbox [x,y,w,h],,,\n00000001_000.png,Mass,1,2,3,4\n00000002_000.png,Tumour,1,2,3,4\n")
    with pytest.raises(DataError, match="unknown class 'Tumour'") as err:
        read_nih(nih, class_names=["Mass", "Nodule"])
    assert err.value.row == 3


def test_skip_policy_drops_only_the_images_with_problems(tmp_path):
    rsna = tmp_path / "labels.csv"
    rsna.write_text("patientId,x,y,width,height,Target\np1,,,,,0\np2,10,10,30,30,1\np2,50,50,0,30,1\np3,1,1,5,5,2\n")
    problems = Problems("skip")
    records, _ = read_rsna(rsna, problems=problems)
    assert [r.patient_id for r in records] == ["p1"]  # p2 has a zero-width box, p3 a bad Target
    assert Counter(p.kind for p in problems) == {"zero_size": 1, "bad_row": 1}
    report = problems.write_report(tmp_path / "report.csv")
    lines = report.read_text().splitlines()
    assert lines[0] == "kind,file,row,image_left_out,reason" and len(lines) == 3
    assert "stage_2_train_images/p2.dcm" in report.read_text()


def test_gzipped_copy_reads_the_same(tmp_path):
    source = xrv_file("BBox_List_2017.csv.gz")
    plain = tmp_path / "BBox_List_2017.csv"
    import gzip

    with gzip.open(source, "rb") as f, open(plain, "wb") as out:
        shutil.copyfileobj(f, out)
    a, _ = read_nih(source, image_dir=tmp_path / "images")
    b, _ = read_nih(plain)
    assert [r.image_path for r in a] == [r.image_path for r in b]
    assert all(np.array_equal(x.boxes, y.boxes) for x, y in zip(a, b))
