"""`medrpn fit` on volumes, as a user runs it: 3D annotations (csv3d, DICOM series and NIfTI
phantoms) make the data module one of volumes, the model the 3D detector, training runs on
patches and validation and test on whole scans, counted per scan; one truncated scan is reported
and left out, not fatal."""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from medrpn.data.synth_volumes import write_synthetic_volumes
from medrpn.data.volume_loading import EpochPatchSampler, PatchConfig, TrainingPatches
from medrpn.data.volume_patches import VolumePatches
from medrpn.errors import ConfigError
from tests.trained_run import REPO, medrpn


@pytest.fixture(scope="module")
def volume_run(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("volume_fit")
    write_synthetic_volumes(work / "data", n_volumes=7, shape=(48, 48, 16), seed=3)
    annotations = work / "data" / "annotations.csv"
    with open(annotations) as f:
        rows = list(csv.DictReader(f))
    broken = next(work / "data" / r["image"] for r in rows if r["image"].endswith(".nii.gz"))
    # a scan whose header reads but whose voxels stop short: found at setup, reported, left out
    data = gzip.decompress(broken.read_bytes())
    broken.write_bytes(gzip.compress(data[: len(data) // 2]))
    # one scan as MetaImage written by SimpleITK (LUNA16's format), its boxes unchanged: ITK and
    # nibabel number a file's voxels alike
    import SimpleITK as sitk

    nifti = next(work / "data" / r["image"] for r in rows if r["image"].endswith(".nii.gz") and work / "data" / r["image"] != broken)
    mhd = nifti.with_name(nifti.name.replace(".nii.gz", ".mhd"))
    sitk.WriteImage(sitk.ReadImage(str(nifti)), str(mhd))
    nifti.unlink()
    annotations.write_text(annotations.read_text().replace(nifti.name, mhd.name))
    config = work / "config.yaml"
    config.write_text(
        (REPO / "configs" / "synth_volumes.yaml").read_text()
        .replace("demo/volumes/annotations.csv", str(annotations))
        .replace("window: [64, 64, 32]", "window: [40, 40, 16]")
        .replace("size: [48, 48, 16]", "size: [32, 32, 16]")
        .replace("num_workers: 2", "num_workers: 0")
        .replace("batch_size: 4", "batch_size: 2")
        .replace("val_fraction: 0.15", "val_fraction: 0.2")
        .replace("test_fraction: 0.25", "test_fraction: 0.3")
    )
    result = medrpn(
        "fit", "--config", str(config),
        "--trainer.max_epochs", "1", "--trainer.check_val_every_n_epoch", "1", "--trainer.limit_train_batches", "3",
        "--model.bootstrap_samples", "50",
        cwd=work,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    return work, broken, output, config, mhd


def test_fit_on_volumes_trains_the_3d_detector_and_counts_per_scan(volume_run):
    work, _, output, _, _ = volume_run
    assert "held-out test   FROC sensitivity at 1 FP/scan" in output
    ckpt = work / "demo" / "volume_checkpoints" / "best.ckpt"
    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    hp = checkpoint["hyper_parameters"]
    assert hp["spatial_dims"] == 3 and hp["volume"]["window"] == [40, 40, 16]
    assert "operating_point" in checkpoint  # picked per scan on the validation scans
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlruns.db'}")
    run = client.search_runs([client.get_experiment_by_name("medrpn-volumes").experiment_id])[0]
    for key in ("val/cpm", "test/cpm", "test/map50", "train/loss_epoch"):
        assert key in run.data.metrics, sorted(run.data.metrics)
    assert "test/rpn_recall100" in run.data.metrics  # proposals merged across windows


def test_check_data_reads_every_scan_series_nifti_and_metaimage(volume_run):
    work, broken, _, config, mhd = volume_run
    result = medrpn("check-data", "--config", str(config), cwd=work)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert mhd.name in output and "vol000" in output  # a MetaImage and a DICOM series, each per scan
    assert broken.name in output and "truncated or corrupt" in output
    assert "spacing       median 0.90 x 0.90 x 3.00 mm" in output  # the usual data.target_spacing


def test_a_truncated_scan_is_reported_and_left_out(volume_run):
    work, broken, *_ = volume_run
    report = (work / "demo" / "volume_runs" / "data_problems.csv").read_text()
    assert str(broken) in report and "truncated or corrupt" in report


def test_the_trained_module_finds_lesions_on_a_whole_scan_in_scan_voxels(volume_run):
    from medrpn.data.volume_files import read_volume
    from medrpn.data.volume_patches import scale_to_unit
    from medrpn.training.lightning_module import module_from_checkpoint

    work, broken, *_ = volume_run
    module = module_from_checkpoint(work / "demo" / "volume_checkpoints" / "best.ckpt")
    scan = next(p for p in sorted((work / "data" / "volumes").iterdir()) if p != broken)
    volume = read_volume(scan)
    with torch.no_grad():
        found = module.detect_scan(torch.from_numpy(scale_to_unit(volume.array))[None])
    assert found["boxes"].shape[1] == 6 and len(found["boxes"]) == len(found["scores"]) == len(found["labels"])
    if len(found["boxes"]):
        assert (found["boxes"][:, :3] >= -1).all()
        assert (found["boxes"][:, 3:] <= torch.tensor(volume.shape, dtype=torch.float32) + 1).all()
        assert (found["scores"][:-1] >= found["scores"][1:]).all()


def test_the_epoch_sampler_shards_every_patch_once_and_reshuffles_each_epoch():
    ranks = [EpochPatchSampler(10, seed=1, num_replicas=3, rank=r) for r in range(3)]
    assert isinstance(ranks[0], torch.utils.data.DistributedSampler)  # so Lightning does not shard it again
    first = [list(s) for s in ranks]
    assert all(len(part) == 4 for part in first)  # padded to 12, 4 each
    assert set(sum(first, [])) == set(range(10))
    for s in ranks:
        s.set_epoch(2)
    second = [list(s) for s in ranks]
    assert set(sum(second, [])) == set(range(20, 30))  # epoch 2's items
    assert [i - 20 for i in second[0]] != first[0]


def test_patches_of_a_scan_smaller_than_the_patch_are_padded_to_stack(tmp_path: Path):
    from medrpn.data.annotations import read_annotations

    write_synthetic_volumes(tmp_path, n_volumes=2, shape=(40, 40, 16), seed=5)
    records, _ = read_annotations(tmp_path / "annotations.csv")
    patches = TrainingPatches(VolumePatches(records, (32, 32, 24), samples_per_volume=2, seed=0))
    items = [patches[i] for i in range(len(patches))]
    assert all(tuple(item["image"].shape) == (1, 32, 32, 24) for item in items)
    assert all(item["target"]["boxes"].shape[1] == 6 for item in items)
    # the padding is zeros beyond the scan's 16 slices
    assert float(items[0]["image"][..., 16:].abs().sum()) == 0.0 and float(items[0]["image"][..., :16].sum()) > 0


def test_patch_settings_are_checked():
    with pytest.raises(ConfigError, match="patches.size"):
        PatchConfig(size=[32, 32])
    with pytest.raises(ConfigError, match="positive_fraction"):
        PatchConfig(positive_fraction=1.5)


def test_evaluate_on_volumes_reports_per_scan(volume_run):
    work, *_ = volume_run
    result = medrpn("evaluate", "--ckpt", str(work / "demo" / "volume_checkpoints" / "best.ckpt"), cwd=work)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "false positives counted per scan" in output and "FP per scan" in output
    assert "IoU >= 0.1 (3D)" in output


def test_predict_on_volumes_writes_findings_per_scan_and_goes_on_past_a_broken_one(volume_run, tmp_path):
    import json

    work, broken, *_ = volume_run
    ckpt = work / "demo" / "volume_checkpoints" / "best.ckpt"
    out = tmp_path / "findings"
    result = medrpn("predict", "--ckpt", str(ckpt), "--input", str(work / "data" / "volumes"), "--output", str(out),
                    "--score-threshold", "0", cwd=work)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert f"{broken.name}: skipped: the voxel data is truncated or corrupt" in output
    folders = sorted(p.name for p in out.iterdir())
    # 4 series + 2 NIfTI + 1 MetaImage - 1 broken
    assert len(folders) == 6 and all((out / f / "montage.png").is_file() for f in folders)
    document = json.loads((out / folders[0] / "findings.json").read_text())
    assert document["schema_version"] == "volume-1.0" and document["scan"]["spacing_mm"] == [0.9, 0.9, 3.0]
    affine = np.array(document["scan"]["affine_lps"])
    assert document["findings"], "a threshold of 0 keeps every detection"
    for finding in document["findings"][:5]:
        world = affine @ np.array([*finding["centre_voxel"], 1.0])
        assert world[:3] == pytest.approx(finding["centre_mm_lps"], abs=0.02)
    documents = [json.loads((out / f / "findings.json").read_text()) for f in folders]
    series = [d for d in documents if d["scan"]["series_instance_uid"] is not None]
    assert len(series) == 4  # the DICOM series keep their UIDs, and get an SR
    assert all(d["dicom"]["sr"] == "sr.dcm" and d["dicom"]["gsps"] == ["gsps.dcm"] for d in series)
    assert all(d["dicom"]["sr"] is None and "not DICOM" in d["dicom"]["notes"][0] for d in documents if d not in series)
    assert sum((out / f / "sr.dcm").is_file() and (out / f / "gsps.dcm").is_file() for f in folders) == 4
    assert all(f["tracking_uid"] for d in series for f in d["findings"])
    # a second run keeps what is there; image-only options are refused for a 3D model
    again = medrpn("predict", "--ckpt", str(ckpt), "--input", str(work / "data" / "volumes"), "--output", str(out), cwd=work)
    assert again.returncode == 0 and "6 kept" in again.stdout
    refused = medrpn("predict", "--ckpt", str(ckpt), "--input", str(work / "data"), "--output", str(out), "--proposals", cwd=work)
    assert refused.returncode == 2 and "--proposals: not available for volumes yet" in refused.stderr
    # the decompression-bomb guard: a scan declaring more voxel data than allowed is not decoded
    small = medrpn("predict", "--ckpt", str(ckpt), "--input", str(work / "data" / "volumes"), "--output", str(tmp_path / "small"),
                   "--max-decoded-bytes", "10000", cwd=work)
    assert small.returncode == 0 and "0 scan(s) analysed" in small.stdout and "7 could not be read" in small.stdout


def test_volume_findings_in_voxels_and_patient_millimetres_worked_by_hand():
    from medrpn.data.volume import VolumeGeometry
    from medrpn.outputs.volume_findings import make_volume_findings

    affine = np.array([[0.5, 0, 0, 10.0], [0, 0.5, 0, 20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    geometry = VolumeGeometry((20, 20, 10), affine)
    boxes = np.array([[2, 4, 6, 6, 8, 10], [0, 0, 0, 25, 2, 1]], dtype=float)
    found = make_volume_findings(boxes, np.array([0.4, 0.9]), np.array([0, 1]), ["a", "b"], geometry, 0.3)
    assert [f.label for f in found] == ["b", "a"]  # best first
    a = found[1]
    assert a.centre_voxel == [3.5, 5.5, 7.5]  # voxel i spans [i, i+1): the box centre 4 is voxel 3.5
    assert a.centre_mm_lps == [11.75, 22.75, 45.0]
    assert a.size_mm == [2.0, 2.0, 8.0] and a.slices == [6, 9]
    assert found[0].box_voxels[3] == 20.0  # clipped to the scan
    assert make_volume_findings(boxes, np.array([0.4, 0.9]), np.array([0, 1]), ["a", "b"], geometry, 0.95) == []


def test_a_dicom_series_without_a_patient_column_is_grouped_by_its_patient_id(tmp_path: Path):
    import pydicom

    from medrpn.data.records import Record
    from medrpn.data.splits import group_keys

    write_synthetic_volumes(tmp_path, n_volumes=2, shape=(40, 40, 16), seed=6)
    series = tmp_path / "volumes" / "vol000"
    patient = pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).PatientID
    nifti = tmp_path / "volumes" / "vol001.nii.gz"
    keys = group_keys([Record(series, np.zeros((0, 6)), []), Record(nifti, np.zeros((0, 6)), [])])
    assert keys == [f"PatientID:{patient}", f"image:{nifti}"]


def test_a_folder_holding_another_scans_findings_is_not_taken_as_this_ones(tmp_path: Path):
    import json

    from medrpn.inference.predict_volumes import FINDINGS_NAME, _folder_name, _written_for_another

    (tmp_path / "vol000").mkdir()
    (tmp_path / "vol000" / FINDINGS_NAME).write_text(json.dumps({"scan": {"source": "other/vol000"}}))
    assert _written_for_another(tmp_path / "vol000", "vol000")
    assert not _written_for_another(tmp_path / "vol000", "other/vol000")  # its own: kept or overwritten
    assert not _written_for_another(tmp_path / "absent", "vol000")
    taken: set[str] = set()
    assert [_folder_name("vol000", taken), _folder_name("vol000", taken), _folder_name("a/b.nii.gz", taken)] == ["vol000", "vol000-2", "a_b"]


def test_predict_resamples_a_scan_to_the_target_spacing_and_maps_findings_back_to_its_voxels(volume_run, tmp_path):
    """A model trained with `data.target_spacing` 3 mm, given a scan of 1.5 mm slices: predict
    runs it on the scan resampled to 3 mm (16 slices, not 32) and writes the boxes in the file's
    own voxels (z twice the model's), where the world coordinates are computed."""
    import json

    import nibabel as nib

    from medrpn.data.resampling import resample_channels
    from medrpn.data.volume_files import read_volume
    from medrpn.data.volume_patches import scale_to_unit
    from medrpn.training.lightning_module import module_from_checkpoint

    work, broken, *_ = volume_run
    checkpoint = torch.load(work / "demo" / "volume_checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    checkpoint["datamodule_hyper_parameters"]["target_spacing"] = [0.9, 0.9, 3.0]
    ckpt = tmp_path / "spaced.ckpt"
    torch.save(checkpoint, ckpt)
    scans = tmp_path / "scans"
    scans.mkdir()
    source = next(p for p in sorted((work / "data" / "volumes").glob("*.nii.gz")) if p != broken)
    image = nib.load(source)
    fine = resample_channels(np.asarray(image.dataobj, dtype=np.float32)[None], np.array([1.0, 1.0, 2.0]))[0]
    affine = image.affine.copy()
    affine[:3, 3] -= 0.25 * affine[:3, 2]  # voxel k of the fine grid is k / 2 - 0.25 of the thick one
    affine[:3, 2] /= 2
    nib.save(nib.Nifti1Image(fine.astype(np.int16), affine), scans / "fine.nii.gz")
    out = tmp_path / "findings"
    result = medrpn("predict", "--ckpt", str(ckpt), "--input", str(scans), "--output", str(out), "--score-threshold", "0", cwd=work)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    document = json.loads((out / "fine" / "findings.json").read_text())
    assert document["scan"]["shape"][2] == 32 and document["scan"]["spacing_mm"] == [0.9, 0.9, 1.5]
    assert document["findings"], "a threshold of 0 keeps every detection"
    # the model's own view: the scan on the 3 mm grid (16 slices), its boxes x (1, 1, 2) in the file
    volume = read_volume(scans / "fine.nii.gz")
    grid = resample_channels(scale_to_unit(volume.array)[None], np.array([1.0, 1.0, 0.5]))
    assert grid.shape[1:] == (48, 48, 16)
    with torch.no_grad():
        found = module_from_checkpoint(ckpt).detect_scan(torch.from_numpy(grid))
    expected = found["boxes"].numpy() * np.array([1, 1, 2, 1, 1, 2])
    for finding, box in zip(document["findings"][:5], expected[:5]):
        assert finding["box_voxels"] == pytest.approx(box.tolist(), abs=0.01)
        world = np.array(document["scan"]["affine_lps"]) @ np.array([*finding["centre_voxel"], 1.0])
        assert world[:3] == pytest.approx(finding["centre_mm_lps"], abs=0.02)
    assert max(f["box_voxels"][5] for f in document["findings"]) > 16  # in the file's 32 slices, not the grid's 16


def test_predict_on_an_enhanced_multi_frame_file_writes_an_sr_on_its_frames(volume_run, tmp_path):
    """pydicom's enhanced CT (one file, two frames) through `medrpn predict`: the SR references
    the file's frames, and the run says why no presentation state is written."""
    import json

    import highdicom as hd
    import pydicom
    from pydicom.data import get_testdata_file

    work, *_ = volume_run
    scans = tmp_path / "scans" / "ect"
    scans.mkdir(parents=True)
    # its 512 x 512 frames taken down to 64 x 64 (every 8th pixel, 8 x the spacing): the same
    # enhanced CT header and frame placement, at a size the small test model runs in seconds
    ds = pydicom.dcmread(get_testdata_file("eCT_Supplemental.dcm"))
    pixels = ds.pixel_array[:, ::8, ::8]
    ds.Rows, ds.Columns = pixels.shape[1:]
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    measures = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    measures.PixelSpacing = [float(v) * 8 for v in measures.PixelSpacing]
    ds.save_as(scans / "ect.dcm")
    out = tmp_path / "findings"
    result = medrpn("predict", "--ckpt", str(work / "demo" / "volume_checkpoints" / "best.ckpt"), "--input", str(tmp_path / "scans"),
                    "--output", str(out), "--score-threshold", "0", cwd=work)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (findings_file,) = out.rglob("findings.json")
    document = json.loads(findings_file.read_text())
    assert document["findings"], "a threshold of 0 keeps every detection"
    assert document["dicom"]["sr"] == "sr.dcm" and document["dicom"]["gsps"] == []
    assert any("enhanced multi-frame" in note for note in document["dicom"]["notes"])
    sr = hd.sr.srread(findings_file.parent / "sr.dcm")
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(document["findings"])
    uid = str(pydicom.dcmread(scans / "ect.dcm", stop_before_pixels=True).SOPInstanceUID)
    for group, finding in zip(groups, document["findings"]):
        references = [region.ContentSequence[0].ReferencedSOPSequence[0] for region in group.roi]
        assert {r.ReferencedSOPInstanceUID for r in references} == {uid}
        frames = [int(r.ReferencedFrameNumber) for r in references]
        assert len(frames) == finding["slices"][1] - finding["slices"][0] + 1 and set(frames) <= {1, 2}
