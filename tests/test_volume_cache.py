"""Volumes kept on disk (`data.cache.mode: disk`): the same voxels as in memory, memory-mapped;
served again by a later run without reading the scan (same files, same settings), made again
when a file or a setting changes or an entry is damaged; the data module's patches and whole
scans are those of the memory mode."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from medrpn.data.annotations import read_annotations
from medrpn.data.datamodule import LesionDataModule
from medrpn.data.synth_volumes import write_synthetic_volumes
from medrpn.data.volume_cache import VolumeDiskCache
from medrpn.data.volume_loading import VolumeStore
from medrpn.errors import ConfigError


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("volume_cache")
    write_synthetic_volumes(root, n_volumes=6, shape=(40, 40, 16), seed=2)  # DICOM series and NIfTI
    return root


def _never(record, error):
    raise AssertionError(f"{record.key}: {error}")


def test_disk_entries_hold_the_voxels_of_memory_and_are_memory_mapped(phantoms: Path, tmp_path: Path):
    records, _ = read_annotations(phantoms / "annotations.csv")
    memory = VolumeStore(target_spacing=[1.8, 1.8, 3.0])
    memory.fill(records, _never)
    disk = VolumeStore(target_spacing=[1.8, 1.8, 3.0], disk=VolumeDiskCache(tmp_path / "cache"))
    disk.fill(records, _never)
    assert any(r.image_path.is_dir() for r in records) and any(r.image_path.is_file() for r in records)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == len(records)
    for record in records:
        array = disk.arrays[record.key]
        assert isinstance(array, np.memmap) and Path(array.filename).is_relative_to(tmp_path / "cache")
        np.testing.assert_array_equal(array, memory.arrays[record.key])
        assert disk.spacings[record.key] == memory.spacings[record.key]
        np.testing.assert_array_equal(disk.zooms[record.key], memory.zooms[record.key])
    assert disk.nbytes == 0 < memory.nbytes


def test_a_later_run_is_served_from_disk_until_the_file_changes(phantoms: Path, tmp_path: Path):
    records, _ = read_annotations(phantoms / "annotations.csv")
    record = next(r for r in records if r.image_path.name.endswith(".nii.gz"))
    cache = VolumeDiskCache(tmp_path / "cache")
    first = VolumeStore(disk=cache)
    first.fill([record], _never)
    kept = np.array(first.arrays[record.key])
    # the scan's bytes spoilt in place, its size and modification time as they were: the entry
    # (keyed by path, size and time) is served, so the file is not read again
    path = record.image_path
    stat = path.stat()
    original = path.read_bytes()
    try:
        path.write_bytes(b"\0" * len(original))
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        again = VolumeStore(disk=cache)
        again.fill([record], _never)
        np.testing.assert_array_equal(again.arrays[record.key], kept)
        # a newer modification time: read again (and now it cannot be)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        failed = []
        VolumeStore(disk=cache).fill([record], lambda r, e: failed.append(str(e)))
        assert failed and str(path) in failed[0]
    finally:
        path.write_bytes(original)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    # another setting is another entry
    VolumeStore(target_spacing=[1.8, 1.8, 3.0], disk=cache).fill([record], _never)
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 2


def test_a_damaged_entry_is_made_again(phantoms: Path, tmp_path: Path):
    records, _ = read_annotations(phantoms / "annotations.csv")
    cache = VolumeDiskCache(tmp_path / "cache")
    first = VolumeStore(disk=cache)
    first.fill(records[:1], _never)
    expected = np.array(first.arrays[records[0].key])
    (entry,) = (tmp_path / "cache").rglob("*.npy")
    del first
    entry.write_bytes(entry.read_bytes()[:100])  # cut short
    again = VolumeStore(disk=cache)
    again.fill(records[:1], _never)
    np.testing.assert_array_equal(again.arrays[records[0].key], expected)


def test_the_data_module_serves_the_same_patches_and_scans_from_disk(phantoms: Path, tmp_path: Path):
    settings = dict(
        annotations=str(phantoms / "annotations.csv"), val_fraction=0.2, test_fraction=0.2, num_workers=0, batch_size=2,
        patches={"size": [32, 32, 16], "per_volume": 2},
    )
    memory = LesionDataModule(**settings)
    disk = LesionDataModule(**settings, cache={"mode": "disk", "dir": str(tmp_path / "cache")})
    for dm in (memory, disk):
        dm.setup("fit")
    assert isinstance(next(iter(disk.volumes.arrays.values())), np.memmap)
    a, b = next(iter(memory.train_dataloader())), next(iter(disk.train_dataloader()))
    assert torch.equal(a["images"], b["images"])
    assert all(torch.equal(x["boxes"], y["boxes"]) for x, y in zip(a["targets"], b["targets"]))
    a, b = next(iter(memory.val_dataloader())), next(iter(disk.val_dataloader()))
    assert all(torch.equal(x, y) for x, y in zip(a["images"], b["images"]))  # whole scans
    with pytest.raises(ConfigError, match='volumes are kept in "memory" or on "disk"'):
        LesionDataModule(**settings, cache={"mode": "none"})
