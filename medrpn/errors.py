"""Errors a user can act on: each names the file (and row, where there is one) and the problem."""

from __future__ import annotations

from pathlib import Path


class MedrpnError(Exception):
    """Base class of every error medrpn raises on purpose."""


class DataError(MedrpnError):
    """A data file (image or annotation) that cannot be used, with where and why."""

    def __init__(self, path: str | Path, reason: str, row: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.row = row
        where = self.path if row is None else f"{self.path}, row {row}"
        super().__init__(f"{where}: {reason}")


class ConfigError(MedrpnError):
    """A setting that cannot work, with the setting and the reason."""
