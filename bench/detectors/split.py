"""The benchmark's train/validation split: contiguous blocks of file numbers within each folder.

The brain MRI set names no patients, and one patient's slices have neighbouring file numbers, so
a random split would put a patient's slices on both sides. Within each folder (one per class),
images are sorted by the last number in their file name; the first share is training, the rest
validation. At most the one patient straddling the cut can leak.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from medrpn.data.records import Record
from medrpn.data.splits import write_split_file

_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def file_number(path: Path) -> tuple[int, str]:
    """Sort key: the last number in the file name (names without one sort last, by name)."""
    match = _NUMBER.search(path.stem)
    return (int(match.group(1)), path.name) if match else (math.inf, path.name)  # type: ignore[return-value]


def block_split(records: Sequence[Record], val_fraction: float) -> dict[str, list[Record]]:
    """Per folder, the lowest-numbered (1 - val_fraction) of the images train, the rest validate."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    by_folder: dict[Path, list[Record]] = defaultdict(list)
    for record in records:
        by_folder[Path(record.image_path).parent].append(record)
    splits: dict[str, list[Record]] = {"train": [], "val": []}
    for folder in sorted(by_folder):
        ordered = sorted(by_folder[folder], key=lambda r: file_number(Path(r.image_path)))
        n_train = len(ordered) - max(1, round(len(ordered) * val_fraction)) if len(ordered) > 1 else len(ordered)
        splits["train"] += ordered[:n_train]
        splits["val"] += ordered[n_train:]
    return splits


def write_block_split(path: Path, records: Sequence[Record], val_fraction: float) -> dict[str, list[Record]]:
    """`block_split`, written as a medrpn split file (`SplitConfig.file`) at `path`."""
    splits = block_split(records, val_fraction)
    write_split_file(path, splits)
    return splits
