"""Patient-level train/validation/test splits.

Images of one patient are correlated (same anatomy, often neighbouring slices); letting them fall
on both sides of a split inflates validation scores. Records are therefore grouped by
`patient_id` (each image is its own group when the id is unknown), and whole groups are assigned
to splits in a seeded random order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence

from medrpn.data.records import Record
from medrpn.errors import ConfigError

SPLITS = ("train", "val", "test")


def split_by_patient(
    records: Sequence[Record], val_fraction: float, test_fraction: float, seed: int = 0
) -> dict[str, list[Record]]:
    """Assigns whole patients to train/val/test so that about the given fractions of images land in each."""
    if val_fraction < 0 or test_fraction < 0 or val_fraction + test_fraction >= 1:
        raise ConfigError(
            f"split fractions must be >= 0 and leave images for training: val={val_fraction}, test={test_fraction}"
        )
    groups: dict[str, list[Record]] = defaultdict(list)
    for record in records:
        groups[record.patient_id or f"image:{record.image_path}"].append(record)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    total = len(records)
    targets = {"test": test_fraction * total, "val": val_fraction * total}
    splits: dict[str, list[Record]] = {name: [] for name in SPLITS}
    for key in keys:
        name = next((s for s in ("test", "val") if len(splits[s]) < targets[s]), "train")
        splits[name].extend(groups[key])
    return splits
