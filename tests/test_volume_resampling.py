"""`data.target_spacing`: scans of different voxel sizes resampled to one grid, their boxes moved
with them, and the anchors planned on that grid."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from medrpn.data.resampling import grid_zoom, record_on_grid, resample_channels, zoom_boxes
from medrpn.data.records import Record
from medrpn.data.synth_volumes import write_synthetic_volumes
from medrpn.errors import ConfigError


def _extent(mask: np.ndarray) -> np.ndarray:
    """Voxel-edge box x1, y1, z1, x2, y2, z2 of a mask's voxels."""
    where = np.argwhere(mask)
    return np.concatenate([where.min(axis=0), where.max(axis=0) + 1]).astype(float)


def test_a_block_lands_where_its_zoomed_box_says_worked_by_hand():
    # 0.9 x 0.9 x 3 mm to 1.8 x 1.8 x 1.5 mm: half the voxels in x and y, twice in z
    zoom = grid_zoom((20, 20, 8), (0.9, 0.9, 3.0), (1.8, 1.8, 1.5))
    assert zoom.tolist() == [0.5, 0.5, 2.0]
    volume = np.zeros((1, 20, 20, 8), np.float32)
    volume[0, 4:12, 6:10, 2:5] = 1.0  # voxel-edge box [4, 6, 2, 12, 10, 5]
    resampled = resample_channels(volume, zoom)
    assert resampled.shape == (1, 10, 10, 16) and resampled.dtype == np.float32
    box = zoom_boxes(np.array([[4, 6, 2, 12, 10, 5]]), zoom)
    assert box.tolist() == [[2.0, 3.0, 4.0, 6.0, 5.0, 10.0]]
    assert _extent(resampled[0] > 0.5).tolist() == box[0].tolist()
    # a 7-voxel axis at 1 mm to 2 mm rounds to 4 voxels (3.5 rounds to even, then at least 1)
    assert grid_zoom((7, 1, 3), (1.0, 1.0, 1.0), (2.0, 4.0, 1.0)).tolist() == [4 / 7, 1.0, 1.0]
    assert resample_channels(volume, np.ones(3)) is volume  # nothing to do: no copy
    record = Record("scan.nii.gz", np.array([[4, 6, 2, 12, 10, 5]]), [1], patient_id="P1")
    moved = record_on_grid(record, zoom)
    assert moved.boxes.tolist() == box.tolist() and moved.patient_id == "P1" and record.boxes[0, 2] == 2


@pytest.fixture(scope="module")
def mixed_spacings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantoms at 0.9 x 0.9 x 3 mm and at 1.2 x 1.2 x 1.5 mm in one csv3d file."""
    root = tmp_path_factory.mktemp("spacings")
    write_synthetic_volumes(root / "thick", n_volumes=4, shape=(40, 40, 16), spacing_mm=(0.9, 0.9, 3.0), seed=1)
    write_synthetic_volumes(root / "thin", n_volumes=4, shape=(32, 32, 32), spacing_mm=(1.2, 1.2, 1.5), seed=2)
    rows = []
    for part in ("thick", "thin"):
        with open(root / part / "annotations.csv") as f:
            for row in csv.DictReader(f):
                row["image"] = f"{part}/{row['image']}"
                row["patient_id"] = f"{part}-{row['patient_id']}"
                rows.append(row)
    with open(root / "annotations.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_the_data_module_resamples_every_scan_and_moves_its_boxes(mixed_spacings: Path):
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.data.volume_files import read_volume
    from medrpn.data.volume_loading import WholeVolumes

    dm = LesionDataModule(
        annotations=str(mixed_spacings / "annotations.csv"), val_fraction=0.25, test_fraction=0.25, num_workers=0,
        target_spacing=[1.2, 1.2, 3.0],
    )
    assert dm.hparams["target_spacing"] == [1.2, 1.2, 3.0]
    native = {r.key: r for r in dm.records}
    dm.setup("fit")
    records = [r for part in dm.splits.values() for r in part]
    assert len(records) == 8
    for record in records:
        channels = dm.volumes.arrays[record.key]
        thick = "thick" in str(record.image_path)
        assert channels.shape[1:] == ((30, 30, 16) if thick else (32, 32, 16))
        assert dm.volumes.spacings[record.key] == pytest.approx((1.2, 1.2, 3.0))
        zoom = np.array([30 / 40, 30 / 40, 1.0]) if thick else np.array([1.0, 1.0, 0.5])
        assert record.boxes == pytest.approx(native[record.key].boxes * np.tile(zoom, 2))
    # the boxes on the grid are where the lesions are: each scan's mask, resampled, fills them
    record = next(r for r in records if len(r.boxes) and "thin" in str(r.image_path))
    mask_path = Path(str(record.image_path).replace("/volumes/", "/masks/"))
    if not mask_path.name.endswith(".nii.gz"):
        mask_path = mask_path.with_name(mask_path.name + ".nii.gz")
    mask = read_volume(mask_path).array > 0
    grid_mask = resample_channels(mask[None].astype(np.float32), dm.volumes.zooms[record.key])[0] > 0.5
    union = np.concatenate([record.boxes[:, :3].min(axis=0), record.boxes[:, 3:].max(axis=0)])
    assert np.abs(_extent(grid_mask) - union).max() <= 1.0
    whole = WholeVolumes(dm.splits["test"], dm.volumes)[0]
    assert whole["meta"]["spacing"] == pytest.approx((1.2, 1.2, 3.0))
    assert whole["target"]["boxes"].numpy() == pytest.approx(dm.splits["test"][0].boxes)


def test_the_3d_anchor_plan_reads_the_boxes_on_the_resampled_grid(mixed_spacings: Path):
    from medrpn.commands.plan_volumes import plan_volume_anchors

    config = {"data": {"annotations": str(mixed_spacings / "annotations.csv"), "val_fraction": 0.25, "test_fraction": 0.25}}
    _, native, *_ = plan_volume_anchors(config, 1, "test")
    _, grid, *_ = plan_volume_anchors({"data": {**config["data"], "target_spacing": [1.2, 1.2, 3.0]}}, 1, "test")
    assert len(native) == len(grid)
    ratio = (grid[:, 3:] - grid[:, :3]) / (native[:, 3:] - native[:, :3])
    thick, thin = np.isclose(ratio, [0.75, 0.75, 1.0]).all(axis=1), np.isclose(ratio, [1.0, 1.0, 0.5]).all(axis=1)
    assert (thick | thin).all() and thick.any() and thin.any()


def test_a_bad_target_spacing_is_refused_by_name(mixed_spacings: Path, tmp_path: Path):
    from medrpn.data.datamodule import LesionDataModule

    with pytest.raises(ConfigError, match=r"data.target_spacing needs three positive sizes in mm \(x, y, z\), got \[1.0, 0.0, 1.0\]"):
        LesionDataModule(annotations=str(mixed_spacings / "annotations.csv"), target_spacing=[1.0, 0.0, 1.0])
    with pytest.raises(ConfigError, match="target_spacing"):
        LesionDataModule(annotations=str(mixed_spacings / "annotations.csv"), target_spacing=[1.0, 1.0])
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(np.zeros((16, 16), np.uint8)).save(images / "a.png")
    (tmp_path / "boxes.csv").write_text("image,x1,y1,x2,y2,label\nimages/a.png,1,1,5,5,lesion\n")
    with pytest.raises(ConfigError, match="data.target_spacing resamples volumes"):
        LesionDataModule(annotations=str(tmp_path / "boxes.csv"), target_spacing=[1.0, 1.0, 1.0])
