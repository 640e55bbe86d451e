"""Patient-level train/validation/test splits and k folds, stratified by class.

Images of one patient are correlated (same anatomy, often neighbouring slices); letting them fall
on both sides of a split inflates validation scores. Records are grouped by patient, the first
of these that is known (`group_keys`):

1. the record's `patient_id` (from the annotation file);
2. the DICOM header's PatientID, else its StudyInstanceUID (for a DICOM series folder, of its first file);
3. a grouping rule from the config: `group_blocks: N` puts images whose file numbers (the last
   number in the file name) fall in the same block of N, within one folder, together; for
   datasets without patient ids whose slices of a patient have neighbouring numbers;
4. else the image alone.

Whole groups are then assigned to splits, stratum by stratum: a group's stratum is the rarest
class among its boxes ("no box" for groups without lesions), so every class is spread over the
splits in about the requested proportions. The assignment is greedy and seeded: each group goes
to the split furthest behind its share within the stratum (ties: furthest behind overall).

With `ordered: true` the groups are not shuffled but taken in the order of their file numbers
(folder, then the lowest number of their images), and each stratum is cut in that order: the
first share trains, the next validates, the last tests. For a dataset numbered in the order it
was collected, the test split is then the latest patients, as new patients will be: a random
split scatters patients of every period over all three splits, so its test figure reads higher
than what a model meets on a later cohort.

A split file (`SplitConfig.file`) replaces all of this with a fixed split, for a split made
elsewhere (a challenge's official one, a benchmark's) or one to keep across runs and machines:
JSON ``{"train": [image paths], "val": [...], "test": [...]}``, paths relative to the file's
folder or absolute; ``path#N`` names frame/slice N of a multi-frame file, a bare path all of
its frames. Every annotated image must be in exactly one split: `write_split_file` writes one.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from medrpn.data.dicom import patient_of
from medrpn.data.limits import DEFAULT_MAX_DECODED_BYTES
from medrpn.data.records import Record
from medrpn.errors import ConfigError

SPLITS = ("train", "val", "test")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


@dataclass
class SplitConfig:
    """How patients are found and split (the fractions and seed are data module arguments).

    Attributes:
        group_blocks: when neither the annotations nor DICOM headers name the patient, group
            images whose file numbers fall in the same block of this many numbers (per folder).
        stratify: balance each class's share across the splits.
        num_folds: when set, k-fold cross-validation: the test split is held out first, the
            rest is cut into this many folds, and fold `fold` is the validation split.
        fold: which fold validates (0-based).
        ordered: cut the groups in the order of their file numbers instead of at random (see
            the module docstring): the highest numbers test.
        file: a split file (see the module docstring) that fixes the split; the fractions,
            seed, grouping and folds are then not used.
    """

    group_blocks: int | None = None
    stratify: bool = True
    num_folds: int | None = None
    fold: int = 0
    ordered: bool = False
    file: str | None = None

    def __post_init__(self) -> None:
        if self.group_blocks is not None and self.group_blocks < 1:
            raise ConfigError(f"data.split.group_blocks must be >= 1, got {self.group_blocks}")
        if self.num_folds is not None and (self.num_folds < 2 or not 0 <= self.fold < self.num_folds):
            raise ConfigError(f"data.split: need num_folds >= 2 and 0 <= fold < num_folds, got {self.num_folds}, {self.fold}")
        if self.ordered and self.num_folds is not None:
            raise ConfigError("data.split: ordered cuts train, val and test in file-number order; it cannot be combined with num_folds")
        if self.file is not None and self.num_folds is not None:
            raise ConfigError(f"data.split: a split file ({self.file}) fixes the split; it cannot be combined with num_folds")


def group_keys(
    records: Sequence[Record],
    group_blocks: int | None = None,
    read_dicom: bool = True,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> list[str]:
    """The patient group of each record (see the module docstring for the order of the rules); a
    deflated DICOM inflating to more than `max_decoded_bytes` is not read for its patient."""
    keys = []
    for record in records:
        key = f"patient:{record.patient_id}" if record.patient_id else None
        if key is None and read_dicom:
            key = patient_of(_first_file(Path(record.image_path)), max_decoded_bytes)
        if key is None and group_blocks:
            match = _NUMBER.search(Path(record.image_path).stem)
            if match:
                key = f"block:{Path(record.image_path).parent}:{int(match.group(1)) // group_blocks}"
        keys.append(key or f"image:{record.key}")
    return keys


def _first_file(path: Path) -> Path:
    """A DICOM series folder's first file (by name), whose header names the series' patient; a file itself."""
    if not path.is_dir():
        return path
    return next((p for p in sorted(path.rglob("*")) if p.is_file()), path)


def split_by_patient(
    records: Sequence[Record],
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    groups: Sequence[str] | None = None,
    stratify: bool = True,
    ordered: bool = False,
) -> dict[str, list[Record]]:
    """Assign whole patients to train/val/test so that about the given fractions of images land in each.

    Args:
        records: the images.
        val_fraction / test_fraction: shares of images for validation and test.
        seed: the same seed gives the same split.
        groups: the patient group of each record (`group_keys`); by default the patient id,
            else the image itself (no file is opened).
        stratify: balance each class across the splits.
        ordered: cut in file-number order (train, val, test) instead of at random.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"split fractions must be >= 0 and leave images for training: val={val_fraction}, test={test_fraction}"
        )
    shares = {"test": test_fraction, "val": val_fraction, "train": 1.0 - val_fraction - test_fraction}
    if ordered:
        parts = _assign_in_order(records, shares, groups, stratify)
    else:
        parts = _assign(records, shares, seed, groups, stratify)
    return {name: parts[name] for name in SPLITS}


def kfold_by_patient(
    records: Sequence[Record], num_folds: int, seed: int = 0, groups: Sequence[str] | None = None, stratify: bool = True
) -> list[list[Record]]:
    """Cut the records into `num_folds` folds of whole patients, stratified by class."""
    if num_folds < 2:
        raise ConfigError(f"num_folds must be at least 2, got {num_folds}")
    parts = _assign(records, {i: 1.0 / num_folds for i in range(num_folds)}, seed, groups, stratify)
    return [parts[i] for i in range(num_folds)]


def _grouped(records, groups, stratify: bool):
    """The records of each group, the stratum of a group (its rarest class, -1 for none), and the
    number of boxes of each class."""
    if groups is None:
        groups = [f"patient:{r.patient_id}" if r.patient_id else f"image:{r.key}" for r in records]
    if len(groups) != len(records):
        raise ValueError(f"{len(groups)} group keys for {len(records)} records")
    members: dict[str, list[Record]] = defaultdict(list)
    for record, key in zip(records, groups):
        members[key].append(record)
    box_counts = Counter(int(label) for r in records for label in r.labels)

    def stratum(key: str) -> int:
        labels = {int(label) for r in members[key] for label in r.labels}
        if not stratify or not labels:
            return -1
        return min(labels, key=lambda lab: (box_counts[lab], lab))  # the rarest class

    return members, stratum, box_counts


def _file_order(record: Record) -> tuple[str, float, str]:
    """Sort key of an image by file number: its folder, the last number in its name, its name."""
    path = Path(record.image_path)
    match = _NUMBER.search(path.stem)
    return (str(path.parent), int(match.group(1)) if match else float("inf"), path.name)


def _assign_in_order(records, shares: dict, groups, stratify: bool) -> dict:
    """Each stratum's groups in file-number order, cut into train, val and test by image share."""
    members, stratum, _ = _grouped(records, groups, stratify)
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for key in sorted(members, key=lambda k: min(_file_order(r) for r in members[k])):
        by_stratum[stratum(key)].append(key)
    parts: dict = {name: [] for name in shares}
    cuts = (("train", shares["train"]), ("val", shares["train"] + shares["val"]), ("test", 1.0))
    for keys in by_stratum.values():
        n_total, done = sum(len(members[k]) for k in keys), 0
        for key in keys:
            name = next(name for name, upto in cuts if done < upto * n_total - 1e-9 or name == "test")
            parts[name].extend(members[key])
            done += len(members[key])
    return parts


def _assign(records, shares: dict, seed: int, groups, stratify: bool) -> dict:
    members, stratum, box_counts = _grouped(records, groups, stratify)
    keys = sorted(members)
    random.Random(seed).shuffle(keys)
    by_stratum: dict[int, list[str]] = defaultdict(list)
    for key in keys:
        by_stratum[stratum(key)].append(key)
    order = list(shares)  # ties go to the first listed (test before val before train)
    total: Counter = Counter()
    parts: dict = {name: [] for name in shares}
    for s in sorted(by_stratum, key=lambda s: (s < 0, box_counts[s], s)):  # rarest classes first
        local: Counter = Counter()
        for key in by_stratum[s]:
            n = len(members[key])
            local_n, total_n = sum(local.values()) + n, sum(total.values()) + n
            name = max(
                order,
                key=lambda p: (shares[p] * local_n - local[p], shares[p] * total_n - total[p], -order.index(p)),
            )
            parts[name].extend(members[key])
            local[name] += n
            total[name] += n
    return parts


_FRAME = re.compile(r"^(.*)#(\d+)$")
_EXAMPLES = 3


def write_split_file(path: str | Path, splits: Mapping[str, Sequence[Record | str | Path]]) -> Path:
    """Write a split file that `read_split_file` (and `SplitConfig.file`) reads back.

    Args:
        path: the JSON file to write (its folder is created).
        splits: split name ("train", "val", "test") -> the records or image paths in it. Paths
            are written relative to the file's folder (absolute where no relative path exists).

    Returns:
        The path written.
    """
    path = Path(path)
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ConfigError(f"split file {path}: unknown split name(s) {sorted(unknown)}; use {', '.join(SPLITS)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()

    def entry(item: Record | str | Path) -> str:
        image = Path(item.image_path if isinstance(item, Record) else item).resolve()
        try:
            name = Path(os.path.relpath(image, folder)).as_posix()
        except ValueError:  # another drive (Windows): no relative path
            name = image.as_posix()
        frame = item.frame if isinstance(item, Record) else None
        return name if frame is None else f"{name}#{frame}"

    data = {name: [entry(item) for item in splits.get(name, [])] for name in SPLITS}
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def read_split_file(
    path: str | Path, records: Sequence[Record], skipped: set[str] | frozenset[str] = frozenset()
) -> dict[str, list[Record]]:
    """The split a split file fixes, as lists of `records`.

    Args:
        path: the JSON split file (see the module docstring).
        records: every annotated image.
        skipped: keys (`Record.key`) of images already left out for a reported problem; the
            file may name them (they are left out silently).

    Raises:
        ConfigError (naming the file and a few examples) if the file cannot be read, names an
        image twice, names images that are not in the annotations, or leaves annotated images
        out of every split.
    """
    path = Path(path)
    where = f"data.split.file {path}"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{where}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{where}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict) or set(data) - set(SPLITS):
        raise ConfigError(f'{where}: expected a JSON object with only the keys {", ".join(SPLITS)} (lists of image paths)')
    for name, entries in data.items():
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ConfigError(f"{where}: {name!r} must be a list of image paths (strings)")

    by_file: dict[Path, list[Record]] = defaultdict(list)
    for record in records:
        by_file[Path(record.image_path).resolve()].append(record)
    skipped_files = {Path(_FRAME.sub(r"\1", key)).resolve() for key in skipped}
    folder = path.parent
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    placed: dict[str, str] = {}  # record key -> split
    twice: list[str] = []
    unknown: list[str] = []
    for name in SPLITS:
        for entry in data.get(name, []):
            file_part, frame = entry, None
            match = _FRAME.match(entry)
            if match and not (folder / entry).exists():
                file_part, frame = match.group(1), int(match.group(2))
            image = Path(file_part)
            image = (image if image.is_absolute() else folder / image).resolve()
            found = [r for r in by_file.get(image, []) if frame is None or r.frame == frame]
            if not found:
                if image not in skipped_files:
                    unknown.append(entry)
                continue
            for record in found:
                if record.key in placed:
                    twice.append(f"{entry} ({placed[record.key]} and {name})")
                    continue
                placed[record.key] = name
                splits[name].append(record)
    if twice:
        raise ConfigError(f"{where}: {len(twice)} image(s) in more than one split, e.g. {'; '.join(twice[:_EXAMPLES])}")
    if unknown:
        raise ConfigError(
            f"{where}: {len(unknown)} entr{'y names' if len(unknown) == 1 else 'ies name'} no image of the annotations, "
            f"e.g. {', '.join(unknown[:_EXAMPLES])} (paths are relative to the split file's folder {folder})"
        )
    missing = [r.key for r in records if r.key not in placed]
    if missing:
        raise ConfigError(
            f"{where}: {len(missing)} annotated image(s) are in no split, e.g. {', '.join(missing[:_EXAMPLES])}; "
            "put every image of the annotations in one split (write_split_file writes such a file)"
        )
    return splits
