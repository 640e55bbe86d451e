"""The dependency floors in pyproject.toml are the versions `make test-lowest` installs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parent.parent


def test_every_floor_is_pinned_for_the_lowest_versions_run_and_nothing_else():
    requirements = [Requirement(r) for r in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]]
    floors = {}
    for r in requirements:
        lows = [Version(s.version) for s in r.specifier if s.operator == ">="]
        assert lows, f"{r.name} has no floor"
        floors[r.name.lower()] = lows[0]
    pins = {}
    for line in (REPO / ".ci" / "lowest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = re.split(r"==", line)
            pins[name.strip().lower()] = Version(version.strip())
    unpinned = {"torch", "torchvision"}  # only the versions on the machine's disk install here
    assert set(pins) == set(floors) - unpinned, (set(pins) ^ (set(floors) - unpinned))
    wrong = {name: (str(floors[name]), str(pin)) for name, pin in pins.items() if pin != floors[name]}
    assert not wrong, f"floor in pyproject.toml vs .ci/lowest.txt: {wrong}"
