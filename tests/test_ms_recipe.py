"""The MS lesion recipe as `bench/ms_lesions_3d.py` runs it, on stand-ins for the three imaged
patients of ../shared/data/ms-lesions-3d (which the tests must not need): four co-registered
sequences per patient and a binary lesion mask with specks, written as NIfTI. The bench's CSV and
leave-one-patient-out split files, the recipe file itself (sizes shrunk), masks turned into boxes
by `data.masks.min_voxels`, and a run without a validation split: it trains the set epochs, tests
and keeps the last weights, and says so."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from medrpn.data.annotations import read_annotations
from medrpn.data.mask_boxes import MaskConfig
from medrpn.data.problems import Problems
from medrpn.data.synth_volumes import write_synthetic_volumes
from medrpn.data.volume_files import read_volume
from medrpn.errors import ConfigError
from tests.trained_run import REPO, medrpn

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SPECK = (slice(1, 3), slice(1, 2), slice(1, 2))  # 2 voxels, in a corner: below min_voxels


def _bench():
    spec = importlib.util.spec_from_file_location("ms_lesions_3d", REPO / "bench" / "ms_lesions_3d.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _save(array: np.ndarray, affine_lps: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, LPS_TO_RAS @ affine_lps), str(path))


@pytest.fixture(scope="module")
def ms_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, int], dict[str, int]]:
    """Three patients named as in the MS data, each FLAIR/T1/T2/T1POST and lesions.nii.gz; with
    each patient's lesions (components of >= 10 voxels) and specks (fewer) counted."""
    root = tmp_path_factory.mktemp("ms_like")
    synth = root / "synth"
    write_synthetic_volumes(synth, n_volumes=3, shape=(40, 40, 16), seed=5)
    rows = (synth / "masks.csv").read_text().splitlines()[1:]
    data, lesions, specks = root / "ms-lesions-3d", {}, {}
    for patient, row in zip(_bench().PATIENTS, rows):
        image, mask_file, _ = row.split(",")
        volume, mask = read_volume(synth / image), read_volume(synth / mask_file)
        binary = (mask.array > 0).astype(np.uint8)
        binary[SPECK] = 1
        flair = volume.array.astype(np.float32)
        for name, contrast in (("FLAIR", flair), ("T1", flair.max() - flair), ("T2", np.sqrt(flair - flair.min())), ("T1POST", flair * 0.5)):
            _save(contrast, volume.affine, data / patient / f"{name}.nii.gz")
        _save(binary, volume.affine, data / patient / "lesions.nii.gz")
        components, _ = ndimage.label(binary)  # face connectivity, as the recipe's rule
        sizes = np.bincount(components.ravel())[1:]
        lesions[patient] = int((sizes >= 10).sum())
        specks[patient] = int((sizes < 10).sum())
    return root, data, lesions, specks


def test_the_bench_writes_one_csv_and_a_split_per_held_out_patient(ms_like):
    root, data, lesions, specks = ms_like
    bench = _bench()
    csv = bench.write_dataset(data, root / "out")
    problems = Problems("skip")
    records, classes = read_annotations(csv, problems=problems, masks=MaskConfig(min_voxels=10))
    assert len(problems) == 0  # specks left out by a setting are not problems, but they are said
    assert problems.notes == [
        f"{csv}: {sum(specks.values())} mask component(s) under data.masks.min_voxels = 10 voxels left out "
        f"as too small to be lesions, in 3 scan(s)"
    ]
    assert classes == ["lesion"] and [r.patient_id for r in records] == list(bench.PATIENTS)
    every = read_annotations(csv)[0]  # min_voxels 1: the specks are lesions too
    for record, all_boxes in zip(records, every):
        assert len(all_boxes.boxes) == len(record.boxes) + 1
        assert len(record.boxes) == lesions[record.patient_id]
    for k, held in enumerate(bench.PATIENTS):
        split = json.loads((root / "out" / f"fold{k}.json").read_text())
        assert split["val"] == [] and [Path(p).parent.name for p in split["test"]] == [held]
        assert sorted(Path(p).parent.name for p in split["train"]) == sorted(set(bench.PATIENTS) - {held})


def test_mask_settings_are_checked():
    with pytest.raises(ConfigError, match="data.masks.min_voxels must be at least 1"):
        MaskConfig(min_voxels=0)
    with pytest.raises(ConfigError, match="data.masks.connectivity must be 1, 2 or 3"):
        MaskConfig(connectivity=4)


def test_the_recipe_trains_without_validation_and_keeps_the_last_weights(ms_like):
    root, data, lesions, specks = ms_like
    out = root / "out"
    _bench().write_dataset(data, out)
    shrink = [
        "--data.annotations", str(out / "masks.csv"), "--data.split.file", str(out / "fold0.json"),
        "--data.patches.size", "[32, 32, 16]", "--data.patches.per_volume", "2", "--model.volume.window", "[40, 40, 16]",
    ]
    checked = medrpn("check-data", "--config", str(REPO / "configs" / "ms_lesions_3d.yaml"), *shrink, cwd=root)
    text = checked.stdout + checked.stderr
    assert checked.returncode == 0, text[-3000:]
    assert "validation    none, as asked" in text and "verdict       ready to train" in text
    train_boxes = sum(lesions[p] for p in _bench().PATIENTS[1:])
    assert f"split train   2 patients, 2 scans, {train_boxes} boxes" in text  # the specks are not lesions
    assert f"note          {out / 'masks.csv'}: {sum(specks.values())} mask component(s) under data.masks.min_voxels = 10" in text

    fit = medrpn("fit", "--config", str(REPO / "configs" / "ms_lesions_3d.yaml"), *shrink,
                 "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--model.bootstrap_samples", "20", cwd=root)
    text = fit.stdout + fit.stderr
    assert fit.returncode == 0, text[-4000:]
    assert "no validation split, as asked" in text
    final = root / "ms" / "checkpoints" / "final.ckpt"
    assert f"checkpoint      {final} (no validation: the last epoch's)" in text
    assert "held-out test   FROC sensitivity at 1 FP/scan" in text  # the held-out patient, on the last weights
    saved = torch.load(final, map_location="cpu", weights_only=True)
    assert "operating_point" not in saved  # nothing to pick it on
    assert saved["datamodule_hyper_parameters"]["masks"] == {"min_voxels": 10, "connectivity": 1}
    assert saved["state_dict"]["model.backbone.body.conv1.weight"].shape[1] == 4  # FLAIR, T1, T2, T1POST
