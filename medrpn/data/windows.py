"""Intensity windows: which range of a scan's values is mapped onto [0, 1].

A detector sees intensities in [0, 1]; which values of the scan land there decides what it can
see (a lung nodule is invisible in a bone window). The choices, set in the config as
`data.read.window`:

- ``file``: the file's own display setting: a DICOM VOI LUT, else its first WindowCenter/Width
  (pydicom applies both, LINEAR/LINEAR_EXACT/SIGMOID), a NIfTI's cal_min/cal_max; percentiles
  when the file has none. PNG/JPEG: divided by the bit depth's maximum.
- a named window (``ct_lung``, ``ct_soft_tissue`` ...): a fixed centre/width in Hounsfield units,
  the usual radiology presets (see `NAMED_WINDOWS`).
- ``fixed``: `center` and `width` given in the config, in modality units (HU for CT, after the
  DICOM Modality LUT or the NIfTI scaling; stored values for PNG).
- ``percentile``: the image's `percentiles` (low, high) mapped to 0 and 1, for data whose
  absolute values mean nothing (MR, most radiographs).

Fixed and named windows follow the DICOM linear formula (PS3.3 C.11.2.1.2.1).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from medrpn.errors import ConfigError

# (center, width) in Hounsfield units; the common presets (e.g. Radiopaedia's "Windowing (CT)").
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "ct_lung": (-600.0, 1500.0),
    "ct_mediastinum": (50.0, 350.0),
    "ct_soft_tissue": (40.0, 400.0),
    "ct_abdomen": (40.0, 400.0),
    "ct_liver": (30.0, 150.0),
    "ct_bone": (400.0, 1800.0),
    "ct_brain": (40.0, 80.0),
    "ct_subdural": (75.0, 215.0),
    "ct_stroke": (32.0, 8.0),
}

MODES = ("file", "fixed", "percentile", *NAMED_WINDOWS)


@dataclass
class WindowConfig:
    """How intensities are mapped to [0, 1] (see the module docstring).

    Attributes:
        mode: "file", "fixed", "percentile" or a name from `NAMED_WINDOWS`.
        center / width: the window of mode "fixed", in modality units.
        percentiles: (low, high) percentiles of mode "percentile", and the fallback of "file"
            for a file without a window.
    """

    mode: str = "file"
    center: float | None = None
    width: float | None = None
    percentiles: list[float] = field(default_factory=lambda: [0.5, 99.5])

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"data.read.window.mode: unknown window {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.mode == "fixed" and (self.center is None or self.width is None or self.width < 1):
            raise ConfigError("data.read.window: mode 'fixed' needs a center and a width >= 1 (modality units)")
        low, high = self.percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError(f"data.read.window.percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")

    @property
    def fixed_window(self) -> tuple[float, float] | None:
        """(center, width) of a fixed or named window; None for "file" and "percentile"."""
        if self.mode == "fixed":
            return float(self.center), float(self.width)
        return NAMED_WINDOWS.get(self.mode)


def linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """The DICOM linear VOI function, scaled to [0, 1]: values below the window 0, above it 1 (float32)."""
    out = np.array(values, dtype=np.float32)  # a copy, computed in place: 2048^2 images are large
    if width <= 1:
        return (out > center - 0.5).astype(np.float32)
    out -= center - 0.5
    out /= width - 1
    out += 0.5
    return np.clip(out, 0.0, 1.0, out=out)


def percentile_window(values: np.ndarray, percentiles: list[float] | tuple[float, float]) -> np.ndarray:
    """Stretch `values` so that the low percentile maps to 0 and the high one to 1 (clipped, float32)."""
    low, high = np.percentile(values, percentiles)
    return stretch(values, float(low), float(high))


def stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Map [low, high] linearly onto [0, 1], clipped (float32); a flat range gives zeros."""
    if high <= low:
        return np.zeros(np.shape(values), dtype=np.float32)
    out = np.array(values, dtype=np.float32)
    out -= low
    out /= high - low
    return np.clip(out, 0.0, 1.0, out=out)
