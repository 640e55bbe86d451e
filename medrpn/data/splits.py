"""Patient-level train/validation/test splits and k folds, stratified by class.

Images of one patient are correlated (same anatomy, often neighbouring slices); letting them fall
on both sides of a split inflates validation scores. Records are grouped by patient, the first
of these that is known (`group_keys`):

1. the record's `patient_id` (from the annotation file);
2. the DICOM header's PatientID, else its StudyInstanceUID;
3. a grouping rule from the config: `group_blocks: N` puts images whose file numbers (the last
   number in the file name) fall in the same block of N, within one folder, together; for
   datasets without patient ids whose slices of a patient have neighbouring numbers;
4. else the image alone.

Whole groups are then assigned to splits, stratum by stratum: a group's stratum is the rarest
class among its boxes ("no box" for groups without lesions), so every class is spread over the
splits in about the requested proportions. The assignment is greedy and seeded: each group goes
to the split furthest behind its share within the stratum (ties: furthest behind overall).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medrpn.data.dicom import patient_of
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
    """

    group_blocks: int | None = None
    stratify: bool = True
    num_folds: int | None = None
    fold: int = 0

    def __post_init__(self) -> None:
        if self.group_blocks is not None and self.group_blocks < 1:
            raise ConfigError(f"data.split.group_blocks must be >= 1, got {self.group_blocks}")
        if self.num_folds is not None and (self.num_folds < 2 or not 0 <= self.fold < self.num_folds):
            raise ConfigError(f"data.split: need num_folds >= 2 and 0 <= fold < num_folds, got {self.num_folds}, {self.fold}")


def group_keys(records: Sequence[Record], group_blocks: int | None = None, read_dicom: bool = True) -> list[str]:
    """The patient group of each record (see the module docstring for the order of the rules)."""
    keys = []
    for record in records:
        key = f"patient:{record.patient_id}" if record.patient_id else None
        if key is None and read_dicom:
            key = patient_of(record.image_path)
        if key is None and group_blocks:
            match = _NUMBER.search(Path(record.image_path).stem)
            if match:
                key = f"block:{Path(record.image_path).parent}:{int(match.group(1)) // group_blocks}"
        keys.append(key or f"image:{record.key}")
    return keys


def split_by_patient(
    records: Sequence[Record],
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    groups: Sequence[str] | None = None,
    stratify: bool = True,
) -> dict[str, list[Record]]:
    """Assign whole patients to train/val/test so that about the given fractions of images land in each.

    Args:
        records: the images.
        val_fraction / test_fraction: shares of images for validation and test.
        seed: the same seed gives the same split.
        groups: the patient group of each record (`group_keys`); by default the patient id,
            else the image itself (no file is opened).
        stratify: balance each class across the splits.
    """
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"split fractions must be >= 0 and leave images for training: val={val_fraction}, test={test_fraction}"
        )
    shares = {"test": test_fraction, "val": val_fraction, "train": 1.0 - val_fraction - test_fraction}
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


def _assign(records, shares: dict, seed: int, groups, stratify: bool) -> dict:
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
