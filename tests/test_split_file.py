"""Split files: a fixed train/val/test split read from JSON instead of computed (`SplitConfig.file`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from medrpn.data.annotations import read_annotations
from medrpn.data.datamodule import LesionDataModule
from medrpn.data.splits import SplitConfig, read_split_file, write_split_file
from medrpn.errors import ConfigError
from medrpn.data.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, n_images=12, image_size=64, seed=4)
    return root


def _names(splits) -> dict[str, list[str]]:
    return {name: [r.image_path.name for r in part] for name, part in splits.items()}


def _by_hand(records) -> dict[str, list]:
    """A split no seed of the computed one would give: images in file order, 6 / 4 / 2."""
    ordered = sorted(records, key=lambda r: r.image_path.name)
    return {"train": ordered[:6], "val": ordered[6:10], "test": ordered[10:]}


def test_a_written_split_file_fixes_the_data_modules_split(synth, tmp_path):
    records, _ = read_annotations(synth / "annotations.csv")
    wanted = _by_hand(records)
    path = write_split_file(tmp_path / "elsewhere" / "split.json", wanted)
    entries = json.loads(path.read_text())
    assert sorted(entries) == ["test", "train", "val"] and len(entries["val"]) == 4
    assert all(not Path(e).is_absolute() and e.startswith("../") for e in entries["train"])  # relative to the file
    dm = LesionDataModule(
        str(synth / "annotations.csv"), num_workers=0, val_fraction=0.5, test_fraction=0.0, split={"file": str(path)}
    )
    assert _names(dm.splits) == _names(wanted)  # fractions and seed are not used
    assert dm.hparams["split"]["file"] == str(path)


def test_absolute_paths_and_a_missing_test_split_are_accepted(synth, tmp_path):
    records, _ = read_annotations(synth / "annotations.csv")
    absolute = {"train": [str(r.image_path.resolve()) for r in records[:9]], "val": [str(r.image_path.resolve()) for r in records[9:]]}
    path = tmp_path / "split.json"
    path.write_text(json.dumps(absolute))
    splits = read_split_file(path, records)
    assert [len(splits[n]) for n in ("train", "val", "test")] == [9, 3, 0]
    assert [r.key for r in splits["val"]] == [r.key for r in records[9:]]


def test_images_left_out_of_every_split_are_an_error_naming_file_and_examples(synth, tmp_path):
    records, _ = read_annotations(synth / "annotations.csv")
    wanted = _by_hand(records)
    left_out = wanted["test"]
    path = write_split_file(tmp_path / "split.json", {"train": wanted["train"], "val": wanted["val"]})
    with pytest.raises(ConfigError, match="2 annotated image\\(s\\) are in no split") as err:
        read_split_file(path, records)
    message = str(err.value)
    assert str(path) in message and left_out[0].image_path.name in message


def test_entries_without_an_annotated_image_are_an_error(synth, tmp_path):
    records, _ = read_annotations(synth / "annotations.csv")
    path = write_split_file(tmp_path / "split.json", {"train": records, "val": [synth / "images" / "nobody_1.dcm"]})
    with pytest.raises(ConfigError, match="1 entry names no image of the annotations") as err:
        read_split_file(path, records)
    assert "nobody_1.dcm" in str(err.value) and str(path) in str(err.value)


def test_an_image_in_two_splits_is_an_error(synth, tmp_path):
    records, _ = read_annotations(synth / "annotations.csv")
    path = write_split_file(tmp_path / "split.json", {"train": records, "val": records[:1]})
    with pytest.raises(ConfigError, match="1 image\\(s\\) in more than one split") as err:
        read_split_file(path, records)
    assert "(train and val)" in str(err.value)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("not json", "not a readable JSON file"),
        ('{"training": []}', "only the keys train, val, test"),
        ('{"train": "a.dcm"}', "must be a list of image paths"),
    ],
)
def test_malformed_split_files_are_refused_by_name(synth, tmp_path, text, reason):
    records, _ = read_annotations(synth / "annotations.csv")
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=reason) as err:
        read_split_file(path, records)
    assert str(path) in str(err.value)
    with pytest.raises(ConfigError, match="file not found"):
        read_split_file(tmp_path / "absent.json", records)


def test_a_split_file_cannot_be_combined_with_folds():
    with pytest.raises(ConfigError, match="num_folds"):
        SplitConfig(file="split.json", num_folds=3)


def test_images_skipped_for_a_reported_problem_may_stay_in_the_file(synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    records, _ = read_annotations(root / "annotations.csv")
    path = write_split_file(tmp_path / "split.json", _by_hand(records))
    victim = sorted((root / "images").glob("*.dcm"))[0]
    with open(root / "annotations.csv", "a") as f:
        f.write(f"images/{victim.name},30,30,10,10,nodule,\n")  # an inverted box: the image is left out
    dm = LesionDataModule(str(root / "annotations.csv"), num_workers=0, on_error="skip", split={"file": str(path)})
    kept = [r.image_path.name for part in dm.splits.values() for r in part]
    assert victim.name not in kept and len(kept) == len(records) - 1
    with pytest.raises(ConfigError, match="no image of the annotations"):  # without the report it is an error
        read_split_file(path, dm.records)
