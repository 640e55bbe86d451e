"""What is wrong with a dataset, collected under a policy: `fail` stops at the first problem, `skip` goes on.

Every problem is a `DataError` (file, row where there is one, reason) with a kind, so that
`medrpn check-data` can count boxes outside the image apart from unreadable files. Under `skip`
the image a problem touches is left out of training as a whole (an image with a lesion whose box
is wrong would otherwise teach "no lesion here"), and `write_report` lists what was left out.
What a setting leaves out on purpose (mask components below `data.masks.min_voxels`) is not a
problem but is said too: a note, logged and listed by `medrpn check-data`.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from medrpn.errors import ConfigError, DataError

log = logging.getLogger(__name__)

POLICIES = ("skip", "fail")

# The kinds of problem, in the order a report lists them.
KINDS = {
    "unreadable_folder": "folder that cannot be listed",
    "bad_file": "annotation file that cannot be read",
    "bad_row": "annotation row that cannot be parsed",
    "unknown_class": "box of a class not in the class names",
    "not_finite": "box with a coordinate that is not a finite number (nan, inf)",
    "negative": "box with a negative coordinate",
    "inverted": "inverted box (x2 < x1 or y2 < y1)",
    "zero_size": "zero-sized box",
    "outside": "box outside its image",
    "missing_image": "image file not found",
    "unreadable_image": "image that cannot be read",
}


@dataclass
class Problem:
    """One problem: its kind (a key of `KINDS`), the error, and the image it makes unusable (if any)."""

    kind: str
    error: DataError
    image: str | None = None


class Problems:
    """Collects problems under a policy.

    Args:
        policy: "fail" raises the first problem's `DataError` at once; "skip" records it (and
            logs a warning) so that the run goes on without the image it touches.
    """

    def __init__(self, policy: str = "fail") -> None:
        if policy not in POLICIES:
            raise ConfigError(f"on_error must be one of {', '.join(POLICIES)}, got {policy!r}")
        self.policy = policy
        self.items: list[Problem] = []
        self.notes: list[str] = []

    def add(self, kind: str, error: DataError, image: str | Path | None = None) -> None:
        """Raise `error` (policy fail) or record it (policy skip)."""
        if kind not in KINDS:
            raise ValueError(f"unknown problem kind {kind!r}")
        if self.policy == "fail":
            raise error
        self.items.append(Problem(kind, error, None if image is None else str(image)))
        if kind in ("missing_image", "unreadable_image"):
            log.warning("Skipping unreadable image %s: %s", error.path, error.reason)
        else:
            log.warning("Skipping %s: %s", "an image" if image else "an entry", error)

    def note(self, message: str) -> None:
        """Record (and log) something a setting left out on purpose, under either policy."""
        self.notes.append(message)
        log.warning("%s", message)

    @property
    def images(self) -> set[str]:
        """Image keys (see `Record.key`) that a problem makes unusable."""
        return {p.image for p in self.items if p.image is not None}

    def counts(self) -> Counter:
        """Number of problems of each kind."""
        return Counter(p.kind for p in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        return iter(self.items)

    def write_report(self, path: str | Path) -> Path:
        """Write the problems as CSV (kind, file, row, image left out, reason), in `KINDS` order."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        order = list(KINDS)
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["kind", "file", "row", "image_left_out", "reason"])
            for p in sorted(self.items, key=lambda p: (order.index(p.kind), p.error.path, p.error.row or 0)):
                writer.writerow([p.kind, p.error.path, "" if p.error.row is None else p.error.row, p.image or "", p.error.reason])
        return path
