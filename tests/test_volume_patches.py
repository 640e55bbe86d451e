"""Training patches from volumes: fixed size, lesions' boxes moved (and flipped) with the voxels,
crops centred on lesions as often as asked, the same patches for the same seed and epoch."""

from __future__ import annotations

import pytest
import torch

from medrpn.data.annotations import read_annotations
from medrpn.data.synth_volumes import write_synthetic_volumes
from medrpn.data.volume_patches import VolumePatches


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("volumes")
    write_synthetic_volumes(root, n_volumes=6, shape=(64, 64, 24), seed=2)
    found, classes = read_annotations(root / "annotations.csv")
    return found, classes


def test_patches_carry_their_lesions_boxes_on_the_lesions_voxels(records):
    found, classes = records
    patches = VolumePatches(found, (40, 40, 16), positive_fraction=1.0, samples_per_volume=3, seed=1)
    with_lesions = {r.key for r in found if len(r.boxes)}
    enhancing = classes.index("enhancing")
    checked = 0
    for index in range(len(patches)):
        image, target = patches[index]
        assert image.shape == (1, 40, 40, 16) and target["boxes"].shape[1] == 6
        if patches.records[index // 3].key in with_lesions:
            assert len(target["boxes"]) >= 1  # every crop centred on a lesion
        for box, label in zip(target["boxes"].round().int().tolist(), target["labels"].tolist()):
            x1, y1, z1, x2, y2, z2 = box
            assert 0 <= x1 < x2 <= 40 and 0 <= y1 < y2 <= 40 and 0 <= z1 < z2 <= 16
            if label == enhancing and (x2 - x1) * (y2 - y1) * (z2 - z1) >= 8:
                assert image[0, x1:x2, y1:y2, z1:z2].mean() > image.mean() + 0.2  # flipped with the voxels
                checked += 1
    assert checked >= 3


def test_the_same_seed_and_epoch_give_the_same_patches(records):
    found, _ = records
    a = VolumePatches(found, (32, 32, 16), seed=4)
    b = VolumePatches(found, (32, 32, 16), seed=4)
    for index in (0, 5, 11):
        assert torch.equal(a[index][0], b[index][0]) and torch.equal(a[index][1]["boxes"], b[index][1]["boxes"])
    b.epoch = 1
    assert any(not torch.equal(a[i][0], b[i][0]) for i in range(6))


def test_2d_records_are_refused(records):
    from medrpn.data.records import Record
    from medrpn.errors import ConfigError

    with pytest.raises(ConfigError, match="volume records"):
        VolumePatches([Record("a.png", [[0, 0, 1, 1]], [0])], (8, 8, 8))


def test_each_lesion_is_as_likely_a_crop_centre_whatever_its_size_and_fits_whole():
    """A scan with one lesion box larger than the crop (a confluent MS lesion) and one of 3 voxels:
    crops chosen by voxel would almost all land in the large box; chosen by lesion, half hold the
    small one, whole, and the others lie inside the large one."""
    import numpy as np

    from medrpn.data.records import Record

    large, small = [10.0, 10.0, 10.0, 90.0, 90.0, 60.0], [100.0, 20.0, 40.0, 103.0, 23.0, 43.0]
    record = Record("scan.nii.gz", [large, small], [0, 1])
    volume = np.zeros((1, 120, 100, 70), np.float32)
    patches = VolumePatches([record], (24, 24, 16), positive_fraction=1.0, samples_per_volume=200, flip=False, volumes={record.key: volume})
    holding_small = 0
    for index in range(len(patches)):
        image, target = patches[index]
        assert image.shape == (1, 24, 24, 16)
        boxes = {label: box for box, label in zip(target["boxes"].tolist(), target["labels"].tolist())}
        if 1 in boxes:
            holding_small += 1
            x1, y1, z1, x2, y2, z2 = boxes[1]
            assert (x2 - x1, y2 - y1, z2 - z1) == (3.0, 3.0, 3.0)  # whole, not cut by the crop
        else:  # inside the large lesion: its box clipped to the whole crop
            assert boxes[0] == [0.0, 0.0, 0.0, 24.0, 24.0, 16.0]
    assert 70 <= holding_small <= 130


def test_boxes_the_crop_cuts_below_min_visible_are_left_out():
    """The same scan with `min_visible` 0.5: the large lesion, never half inside a crop, is no
    crop's target any more; the small one, whole in its crops, still is."""
    import numpy as np

    from medrpn.data.records import Record
    from medrpn.data.volume_loading import PatchConfig
    from medrpn.errors import ConfigError

    large, small = [10.0, 10.0, 10.0, 90.0, 90.0, 60.0], [100.0, 20.0, 40.0, 103.0, 23.0, 43.0]
    record = Record("scan.nii.gz", [large, small], [0, 1])
    volume = np.zeros((1, 120, 100, 70), np.float32)
    patches = VolumePatches(
        [record], (24, 24, 16), positive_fraction=1.0, samples_per_volume=100, flip=False, volumes={record.key: volume}, min_visible=0.5
    )
    labels = [patches[i][1]["labels"].tolist() for i in range(len(patches))]
    assert all(0 not in crop for crop in labels)
    assert 30 <= sum(1 in crop for crop in labels) <= 70
    with pytest.raises(ConfigError, match="min_visible"):
        PatchConfig(min_visible=1.5)


def test_crops_away_from_lesions_can_be_centred_in_the_foreground():
    """A scan that is zero but for a 16-voxel cube in one corner (a skull-stripped brain in a
    large grid): crops drawn anywhere mostly miss it, crops drawn in the foreground always hold it;
    a scan with no foreground still gives crops."""
    import numpy as np

    from medrpn.data.records import Record
    from medrpn.data.volume_loading import PatchConfig
    from medrpn.errors import ConfigError

    no_box = np.zeros((0, 6), np.float32)
    record, empty = Record("scan.nii.gz", no_box, []), Record("empty.nii.gz", no_box, [])
    volume = np.zeros((1, 96, 96, 64), np.float32)
    volume[0, 8:24, 70:86, 40:56] = 0.5
    volumes = {record.key: volume, empty.key: np.zeros_like(volume)}

    def foreground_shares(negatives: str) -> list[float]:
        patches = VolumePatches([record], (24, 24, 16), samples_per_volume=60, flip=False, volumes=volumes, negatives=negatives)
        return [float((patches[i][0] > 0).float().mean()) for i in range(len(patches))]

    assert all(share > 0.1 for share in foreground_shares("foreground"))
    assert sum(share == 0 for share in foreground_shares("anywhere")) > 30
    nothing = VolumePatches([empty], (24, 24, 16), samples_per_volume=3, volumes=volumes, negatives="foreground")
    assert all(nothing[i][0].shape == (1, 24, 24, 16) for i in range(3))
    with pytest.raises(ConfigError, match="data.patches.negatives: 'inside' is not one of 'anywhere', 'foreground'"):
        PatchConfig(negatives="inside")
