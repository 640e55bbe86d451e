"""`medrpn synth --volumes`: phantoms whose three ground truths agree, written in three layouts that
a reader must tell apart by their headers (DICOM series, NIfTI in LPS order, NIfTI in RAS order)."""

from __future__ import annotations

import numpy as np

from medrpn.cli import main
from medrpn.commands.check_volume_data import check_volumes
from medrpn.data.annotations import read_annotations
from medrpn.data.synth_volumes import CLASSES, write_synthetic_volumes
from medrpn.data.volume_files import read_volume


def test_csv3d_boxes_and_masks_name_the_same_lesions_on_what_the_reader_reads(tmp_path):
    summary = write_synthetic_volumes(tmp_path, n_volumes=8, shape=(48, 48, 16), seed=3)
    assert summary["dicom_series"] == 4 and summary["nifti"] == 4 and sum(summary["lesions"].values()) > 0
    boxes, classes = read_annotations(tmp_path / "annotations.csv")
    masks, _ = read_annotations(tmp_path / "masks.csv", class_names=list(CLASSES))
    assert sorted(classes) == sorted(c for c in CLASSES if summary["lesions"][c])
    by_box = {r.image_path: r for r in boxes}
    assert {r.image_path for r in masks} == set(by_box) and len(by_box) == 8
    brain_contrast = []
    for record in masks:
        other = by_box[record.image_path]
        named = sorted(zip(map(tuple, record.boxes.tolist()), (CLASSES[i] for i in record.labels)))
        assert named == sorted(zip(map(tuple, other.boxes.tolist()), (classes[i] for i in other.labels)))
        volume = read_volume(record.image_path)
        for box, label in zip(record.boxes.astype(int), record.labels):
            inside = volume.array[box[0]:box[3], box[1]:box[4], box[2]:box[5]]
            if CLASSES[label] == "enhancing":
                brain_contrast.append(inside.mean() - np.median(volume.array[volume.array > 300]))
    assert brain_contrast and min(brain_contrast) > 100  # each enhancing lesion lies where the reader finds it bright


def test_the_command_writes_volumes_that_check_data_accepts(tmp_path, capsys):
    main(["synth", "--out", str(tmp_path), "--volumes", "6", "--seed", "1"])
    assert "'volumes': 6" in capsys.readouterr().out
    lines, fatal = check_volumes({"annotations": str(tmp_path / "masks.csv"), "val_fraction": 0.34, "test_fraction": 0.0,
                                  "class_names": list(CLASSES)})
    assert not fatal, lines
    assert any("96 x 96 x 32 voxels of 0.90 x 0.90 x 3.00 mm" in line for line in lines)
