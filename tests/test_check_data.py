"""`medrpn check-data`: the report on a real (generated) DICOM dataset, broken inputs, exit codes, anchor coverage."""

from __future__ import annotations

import csv
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from medrpn.commands.check_data import AnchorSetup, anchor_best_iou
from medrpn.cli import main
from medrpn.model.anchors import AnchorConfig
from medrpn.data.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, n_images=40, image_size=64, seed=11)
    return root


def _config(tmp_path: Path, annotations: Path, **data) -> Path:
    config = {
        "model": {"backbone": {"returned_stages": [1, 2, 3]}, "anchors": {"sizes": [[8], [16], [32], [64]]}},
        "data": {"annotations": str(annotations), "image_size": 64, "num_workers": 0, **data},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, capsys) -> tuple[int, str]:
    try:
        main(["check-data", "--config", str(config)])
        code = 0
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_report_on_a_clean_dataset(synth, tmp_path, capsys):
    code, out = _run(_config(tmp_path, synth / "annotations.csv"), capsys)
    assert code == 0, out
    with open(synth / "annotations.csv") as f:
        rows = list(csv.DictReader(f))
    images = {r["image"] for r in rows}
    per_class = Counter(r["label"] for r in rows if r["label"])
    assert f"images        found {len(images)}, readable {len(images)}, unreadable 0" in out
    assert f"boxes/class   nodule {per_class['nodule']}, spiculated {per_class['spiculated']}" in out
    widths = [float(r["x2"]) - float(r["x1"]) for r in rows if r["label"]]
    assert f"box width     min {min(widths):.1f}," in out
    assert f"box width     min {min(widths) * 0.5:.1f}," in out  # 0.5 mm pixels
    empty = len(images) - len({r["image"] for r in rows if r["label"]})
    assert f"no boxes      {empty} images without boxes" in out
    assert "bad boxes     outside the image 0, inverted 0, zero-sized 0, not finite 0, duplicated 0" in out
    patients = len({r["patient_id"] for r in rows})
    split_patients = [int(line.split()[2]) for line in out.splitlines() if line.startswith("split ")]
    assert sum(split_patients) == patients
    assert "patient leak  none" in out
    assert "anchors       " in out and "of 36 boxes" not in out
    assert out.rstrip().endswith("verdict       ready to train")


def test_broken_inputs_are_listed_and_fail_policy_exits_non_zero(synth, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    images = sorted((root / "images").glob("*.dcm"))
    images[0].write_bytes(images[0].read_bytes()[:300])
    with open(root / "annotations.csv", "a") as f:
        f.write("images/gone.dcm,1,1,5,5,nodule,PZ\n")
        f.write(f"images/{images[3].name},50,50,80,60,nodule,\n")  # outside the 64 x 64 image
        f.write(f"images/{images[4].name},5,5,15,15,nodule,\n")
        f.write(f"images/{images[4].name},5,5,15,15,nodule,\n")  # the same box again
    code, out = _run(_config(tmp_path, root / "annotations.csv"), capsys)
    assert code == 0, out  # skip: what is left can be trained on
    assert "readable 39, unreadable 2" in out
    assert f"  unreadable  {images[0]}: " in out and "truncated or corrupt" in out
    assert f"  unreadable  {root / 'images' / 'gone.dcm'}: file not found" in out
    assert "outside the image 1," in out and "duplicated 1" in out
    assert "lies outside its 64x64" in out

    code, out = _run(_config(tmp_path, root / "annotations.csv", on_error="fail"), capsys)
    assert code == 1
    assert "cannot be trained on: on_error is 'fail' and there are 3 problems" in out


def test_no_validation_split_is_fatal_unless_asked_for(synth, tmp_path, capsys):
    code, out = _run(_config(tmp_path, synth / "annotations.csv", val_fraction=0.001), capsys)
    assert code == 1 and "the validation split is empty" in out
    code, out = _run(_config(tmp_path, synth / "annotations.csv", val_fraction=0.0), capsys)
    assert code == 0, out
    assert "validation    none, as asked" in out and out.rstrip().endswith("verdict       ready to train")


def test_missing_annotation_file_is_a_clear_error(tmp_path, capsys):
    code, out = _run(_config(tmp_path, tmp_path / "nope.csv"), capsys)
    assert code == 2 and f"medrpn: error: {tmp_path / 'nope.csv'}: file not found" in out


def test_poor_anchors_warn(synth, tmp_path, capsys):
    config = _config(tmp_path, synth / "annotations.csv")
    spec = yaml.safe_load(config.read_text())
    spec["model"]["anchors"] = {"sizes": [[64], [96], [128], [160]], "aspect_ratios": [1.0]}
    config.write_text(yaml.safe_dump(spec))
    code, out = _run(config, capsys)
    assert code == 0 and "WARNING       anchor coverage below 95%" in out


def test_anchor_best_iou_uses_the_detector_anchors():
    setup = AnchorSetup(AnchorConfig(sizes=[[16], [32]], aspect_ratios=[1.0]), returned_stages=[1])
    assert setup.strides == [4, 8]
    # torchvision centres anchors on multiples of the stride: a 16 px square at (16, 16) is one of them
    boxes = np.array([[8, 8, 24, 24], [0, 0, 2, 2], [16, 8, 48, 40], [10, 10, 26, 26]], dtype=np.float32)
    best = anchor_best_iou(boxes, setup, image_size=64)
    assert best[0] == pytest.approx(1.0) and best[2] == pytest.approx(1.0)  # a 32 px square centred at (32, 24)
    assert best[1] < 0.1
    assert best[3] == pytest.approx(196 / (256 * 2 - 196))  # 2 px off the nearest 16 px anchor in x and y


def test_a_nan_box_is_reported_as_a_problem_not_as_a_size(tmp_path, capsys):
    """Issue 21: a YOLO line `0 nan nan nan nan` was taken as a box, so the report said
    "box width min nan ... ready to train". It is a problem naming the label file and line, its
    image leaves training, and the box sizes are those of the real boxes."""
    from PIL import Image as PILImage

    root = tmp_path / "yolo"
    root.mkdir()
    (root / "classes.txt").write_text("lesion\n")
    for i in range(12):
        PILImage.new("L", (64, 64), 40).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text("0 0.5 0.5 0.25 0.25\n")  # a 16 x 16 px box
    (root / "05.txt").write_text("0 0.5 0.5 0.25 0.25\n0 nan nan nan nan\n")
    code, out = _run(_config(tmp_path, root), capsys)
    assert code == 0, out  # skip: the other eleven images can be trained on
    assert "problems      1 in the annotations" in out
    assert f"  not_finite    {root / '05.txt'}, row 2: x1, y1, x2, y2 are not a finite number" in out
    assert "usable        11 images (1 left out)" in out
    assert "box width     min 16.0, 5% 16.0, median 16.0, 95% 16.0, max 16.0 px" in out
    figures = [line for line in out.splitlines() if not line.startswith("  ") and str(tmp_path) not in line]
    assert not [line for line in figures if "nan" in line]  # no size, share or count computed from the nan
    assert "zero-sized 0, not finite 1, duplicated 0" in out
