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
