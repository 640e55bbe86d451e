"""The built-in demo dataset: X-ray-like phantoms with two lesion classes, written as real DICOM files.

Why: every part of medrpn (DICOM reading, annotation readers, patient splits, training, FROC) can be
run end to end without downloading anything, on files that exercise the awkward parts of real data:
MONOCHROME1 next to MONOCHROME2, varied rescale slope/intercept, 12-bit stored values, windowing,
several images per patient and images without findings.

The scene is built in a display-like intensity `f` (bright = dense, roughly 0..1): a body outline
with two darker lung fields, rib-like arches, a spine band, a smooth large-scale trend, band-limited
noise at three scales, then lesions added on top (X-ray superposition), a slight system blur and
signal-dependent quantum noise. Lesions come in two classes that differ only in appearance
(same size and position distributions):

* class 0 ``nodule``: smooth, round to mildly elliptical, soft edge, homogeneous;
* class 1 ``spiculated``: lobulated border with a sharp edge, radial spicules, heterogeneous interior.

Lesions sit in the lung fields, 3 to 40 mm across (log-uniform). Their contrast is set at each
lesion's own scale: seen through a band-pass filter tuned to its size, a lesion stands 2x to 5x the
local clutter std above the lesion-free scene (texture, ribs and lung edges alike). So small and
large lesions are equally hard, always visible to a careful eye yet competing with ribs and texture;
in plain terms the peak contrast is about 2x to 9x the std of the fine texture around it. The
ground-truth box is the tight box of the lesion's visible mask (profile >= 0.3 of its peak),
spicules included.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import DSfloat

from medrpn.errors import ConfigError

CLASS_NAMES: tuple[str, ...] = ("nodule", "spiculated")
"""Class names, indexed by the 0-based label (COCO category id = label + 1)."""

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
"""SOP Class UID of Digital X-Ray Image Storage - For Presentation."""

_MAX_STORED = 4095  # BitsStored 12
_DIAMETER_MM = (3.0, 40.0)  # log-uniform lesion diameter range
_CONTRAST_X_CLUTTER = (2.0, 5.0)  # lesion band-pass response over the local clutter std there (log-uniform)
_LESION_COUNT_P = (0.2, 0.3, 0.25, 0.15, 0.1)  # P(0..4 lesions in an image)
_MASK_LEVEL = 0.3  # a lesion pixel is "visible" where its profile reaches this fraction of the peak
_MARGIN_PX = 3  # lesions keep this far from the image border and from each other
_REACH = 1.5  # a lesion's visible mask stays within _REACH * radius + _MARGIN_PX of its centre


@dataclass(frozen=True)
class _Lesion:
    """One placed lesion: class label and tight box of its visible mask (xyxy, x2/y2 = max + 1)."""

    label: int
    box: tuple[int, int, int, int]


def write_synthetic_dataset(
    out_dir: str | Path,
    n_images: int = 400,
    image_size: int = 256,
    pixel_spacing_mm: float = 0.5,
    seed: int = 0,
) -> dict:
    """Write the demo dataset: DICOM images plus the same boxes as COCO JSON and CSV.

    Layout under `out_dir`: ``images/<patient>_<k>.dcm`` (1 to 3 images per patient, patients
    ``P0001``...), ``annotations.json`` (COCO, every image listed, categories 1 ``nodule`` and
    2 ``spiculated``) and ``annotations.csv`` (``image,x1,y1,x2,y2,label,patient_id``; an image
    without lesions gets one row with empty box and label). The same seed gives identical files.

    Args:
        out_dir: folder to write into (created if missing; existing files of the same names are
            overwritten).
        n_images: total number of images.
        image_size: rows = columns of every image, in pixels (at least 64).
        pixel_spacing_mm: pixel spacing written to PixelSpacing/ImagerPixelSpacing; lesion sizes
            (3 to 40 mm) are drawn in millimetres, so it sets their size in pixels. A lesion that
            cannot be placed inside the image (too large for a small image) is left out.
        seed: seed of everything random, DICOM UIDs included.

    Returns:
        Summary: ``images``, ``patients``, ``lesions`` (count per class name),
        ``images_without_lesions``, ``coco`` and ``csv`` (paths of the annotation files).
    """
    if n_images < 1:
        raise ConfigError(f"n_images must be at least 1, got {n_images}")
    if image_size < 64:
        raise ConfigError(f"image_size must be at least 64 pixels, got {image_size}")
    if not pixel_spacing_mm > 0:
        raise ConfigError(f"pixel_spacing_mm must be positive, got {pixel_spacing_mm}")

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    plan_rng = np.random.default_rng([seed, 0])
    coco_images, coco_anns, csv_rows = [], [], []
    counts = {name: 0 for name in CLASS_NAMES}
    empty = 0
    patient = 0
    while len(coco_images) < n_images:
        patient += 1
        pid = f"P{patient:04d}"
        study_uid = generate_uid(entropy_srcs=["medrpn-synth", str(seed), pid, "study"])
        for k in range(1, int(plan_rng.integers(1, 4)) + 1):
            if len(coco_images) == n_images:
                break
            index = len(coco_images) + 1
            rng = np.random.default_rng([seed, 1, index])
            f, lesions = _render_image(rng, image_size, pixel_spacing_mm)
            rel = f"images/{pid}_{k}.dcm"
            _write_dicom(out / rel, f, rng, pid, k, study_uid, seed, pixel_spacing_mm)
            coco_images.append(
                {"id": index, "file_name": rel, "width": image_size, "height": image_size, "patient_id": pid}
            )
            for lesion in lesions:
                x1, y1, x2, y2 = lesion.box
                coco_anns.append(
                    {
                        "id": len(coco_anns) + 1,
                        "image_id": index,
                        "category_id": lesion.label + 1,
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "area": (x2 - x1) * (y2 - y1),
                        "iscrowd": 0,
                    }
                )
                csv_rows.append([rel, x1, y1, x2, y2, CLASS_NAMES[lesion.label], pid])
                counts[CLASS_NAMES[lesion.label]] += 1
            if not lesions:
                csv_rows.append([rel, "", "", "", "", "", pid])
                empty += 1

    coco_path, csv_path = out / "annotations.json", out / "annotations.csv"
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASS_NAMES)]
    coco_path.write_text(json.dumps({"images": coco_images, "annotations": coco_anns, "categories": categories}), encoding="utf-8")
    with csv_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "x1", "y1", "x2", "y2", "label", "patient_id"])
        writer.writerows(csv_rows)
    return {
        "images": len(coco_images),
        "patients": patient,
        "lesions": counts,
        "images_without_lesions": empty,
        "coco": str(coco_path),
        "csv": str(csv_path),
    }


# ----------------------------------------------------------------------------------------------
# Scene


@lru_cache(maxsize=64)
def _gaussian_kernel(shape: tuple[int, int], sigma: float, half: bool = True) -> np.ndarray:
    """Fourier transform of a Gaussian of std `sigma` pixels on the (r)fft2 frequency grid of `shape`
    (cached: most sigmas repeat from image to image; callers must not modify it)."""
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = (np.fft.rfftfreq if half else np.fft.fftfreq)(shape[1])[None, :]
    return np.exp(-2.0 * (np.pi * sigma) ** 2 * (fy**2 + fx**2)).astype(np.float32)


@lru_cache(maxsize=64)
def _gaussian_noise_std(shape: tuple[int, int], sigma: float) -> float:
    """Std of unit white noise of `shape` after a Gaussian blur of `sigma` pixels (Parseval)."""
    return float(np.sqrt(np.mean(_gaussian_kernel(shape, sigma, half=False).astype(np.float64) ** 2)))


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation `sigma` pixels, in the Fourier domain (periodic edges)."""
    return np.fft.irfft2(np.fft.rfft2(x) * _gaussian_kernel(x.shape, sigma), s=x.shape)


def _noise_bands(
    rng: np.random.Generator, shape: tuple[int, int], bands: list[list[tuple[float, float]]]
) -> list[np.ndarray]:
    """Correlated noise fields from one white-noise draw: each field is a sum of (amplitude, sigma)
    Gaussian-filtered components, every component scaled so that `amplitude` is its own std."""
    spectrum = np.fft.rfft2(rng.standard_normal(shape, dtype=np.float32))
    fields = []
    for components in bands:
        kernel = 0.0
        for amplitude, sigma in components:
            kernel = kernel + amplitude / _gaussian_noise_std(shape, sigma) * _gaussian_kernel(shape, sigma)
        field = np.fft.irfft2(spectrum * kernel, s=shape)
        fields.append(field - field.mean())
    return fields


def _soft_ellipse(u, v, cu, cv, au, av, angle, edge) -> np.ndarray:
    """1 inside the ellipse (centre cu,cv; semi-axes au,av; rotation angle), 0 outside, soft edge."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    du, dv = u - cu, v - cv
    rho = np.sqrt(((c * du + s * dv) / au) ** 2 + ((-s * du + c * dv) / av) ** 2)
    return 1.0 / (1.0 + np.exp((rho - 1.0) / edge))


def _render_image(rng: np.random.Generator, size: int, spacing: float) -> tuple[np.ndarray, list[_Lesion]]:
    """One phantom in display intensity (bright = dense), with its lesions' labels and boxes."""
    scale = size / 256.0  # anatomy and texture scale with the image, lesions with the spacing
    v, u = (np.mgrid[0:size, 0:size] / (size / 2.0) - 1.0).astype(np.float32)  # u = column, v = row, in [-1, 1)

    body = _soft_ellipse(
        u, v, rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.15),
        rng.uniform(0.82, 1.0), rng.uniform(1.05, 1.35), rng.uniform(-0.05, 0.05), 0.03,
    )
    lungs = np.zeros_like(u)
    lung_v, lung_du = rng.uniform(-0.12, 0.05), rng.uniform(0.36, 0.46)
    for side in (-1, 1):
        lungs = np.maximum(lungs, _soft_ellipse(
            u, v, side * (lung_du + rng.uniform(-0.03, 0.03)), lung_v + rng.uniform(-0.04, 0.04),
            rng.uniform(0.26, 0.34), rng.uniform(0.58, 0.75), side * rng.uniform(0.0, 0.15), 0.06,
        ))
    lungs *= body
    trend, texture = _noise_bands(rng, u.shape, [
        [(rng.uniform(0.03, 0.06), 40 * scale)],
        [(a * rng.uniform(0.6, 1.4), sigma * scale) for a, sigma in ((0.006, 0.9), (0.012, 2.5), (0.022, 6.0))],
    ])
    f = body * rng.uniform(0.5, 0.62) - lungs * rng.uniform(0.2, 0.3) + 0.04
    f += body * rng.uniform(0.03, 0.07) * np.exp(-((u / rng.uniform(0.07, 0.11)) ** 4))  # spine
    f += body * (_ribs(rng, u, v) + trend + rng.uniform(-0.04, 0.04) * v + rng.uniform(-0.03, 0.03) * u)
    f += texture * (0.3 + 0.7 * body) * (0.7 + 0.6 * lungs)  # most texture in the lung fields
    lesions = _add_lesions(rng, f, lungs, spacing)
    f = _gaussian_blur(f, rng.uniform(0.4, 0.8))  # detector/system blur
    quantum = rng.uniform(0.004, 0.009)  # std at f = 0.5, growing with the signal
    f += quantum * np.sqrt(np.clip(f, 0.02, None) / 0.5) * rng.standard_normal(f.shape, dtype=np.float32)
    return f, lesions


def _ribs(rng: np.random.Generator, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Rib-like arches on both sides of the spine: parallel flat-topped bands with brighter edges.

    The ribs of one side are copies of one arch shifted down by a fixed gap, so they are drawn in
    one pass: the distance to the nearest rib is the remainder of the offset from the first one.
    """
    ribs = np.zeros_like(u)
    for side in (-1, 1):
        x = side * u  # distance from the midline towards this side
        apex, bend = rng.uniform(0.2, 0.35), rng.uniform(0.6, 1.2)
        top, gap, n = rng.uniform(-0.95, -0.8), rng.uniform(0.2, 0.27), int(rng.integers(6, 9))
        phase = (v - top - bend * (x - apex) ** 2) / gap
        index = np.rint(phase)
        d = (phase - index) * gap / np.sqrt(1 + (2 * bend * (x - apex)) ** 2)  # ~perpendicular distance
        half = rng.uniform(0.03, 0.045)
        profile = np.exp(-((d / half) ** 6)) + 0.35 * np.exp(-(((np.abs(d) - 0.85 * half) / (0.2 * half)) ** 2))
        strength = rng.uniform(0.04, 0.09, size=n)[np.clip(index, 0, n - 1).astype(int)]
        lateral = 1.0 / (1.0 + np.exp(-(x - 0.08) / 0.02))
        ribs += np.where((index >= 0) & (index < n), strength * profile * lateral, 0.0)
    return ribs


# ----------------------------------------------------------------------------------------------
# Lesions


def _add_lesions(rng: np.random.Generator, f: np.ndarray, lungs: np.ndarray, spacing: float) -> list[_Lesion]:
    """Draw 0-4 non-overlapping lesions centred in the lung fields, add them to `f` in place, return
    their boxes.

    Contrast is set at the lesion's own scale, so that small and large lesions, nodules and
    spiculated ones, are equally hard: the lesion's response to a band-pass filter tuned to its
    radius (that of a disc of the same visible area) is `_CONTRAST_X_CLUTTER` times the local std
    of the lesion-free scene through the same filter (texture, ribs and lung edges alike).
    """
    size = f.shape[0]
    clutter = _Clutter(f, lungs > 0.5)
    placed: list[tuple[float, float, float]] = []  # centre row, centre col, outer radius
    lesions: list[_Lesion] = []
    for _ in range(rng.choice(len(_LESION_COUNT_P), p=_LESION_COUNT_P)):
        label = int(rng.integers(len(CLASS_NAMES)))
        radius = np.exp(rng.uniform(*np.log(_DIAMETER_MM))) / spacing / 2
        spot = _place(rng, _REACH * radius + _MARGIN_PX, size, lungs, placed)
        if spot is None:
            continue
        cy, cx, reach = spot
        half = int(np.ceil(reach))
        r0, c0 = int(round(cy)) - half, int(round(cx)) - half
        yy, xx = np.mgrid[r0 : r0 + 2 * half + 1, c0 : c0 + 2 * half + 1]
        profile = (_nodule if label == 0 else _spiculated)(rng, yy - cy, xx - cx, radius)
        mask = profile >= _MASK_LEVEL
        if not mask.any():
            continue
        disc_r = np.sqrt(mask.sum() / np.pi)  # radius of a disc of the same visible area
        noise = clutter.std(disc_r, cy, cx, 2 * half) / clutter.response(profile, yy - cy, xx - cx, disc_r)
        contrast = np.exp(rng.uniform(*np.log(_CONTRAST_X_CLUTTER))) * noise
        f[r0 : r0 + 2 * half + 1, c0 : c0 + 2 * half + 1] += contrast * profile
        placed.append(spot)
        rows, cols = np.nonzero(mask)
        box = (int(c0 + cols.min()), int(r0 + rows.min()), int(c0 + cols.max() + 1), int(r0 + rows.max() + 1))
        lesions.append(_Lesion(label, box))
    return lesions


class _Clutter:
    """The lesion-free scene seen through difference-of-Gaussians band-pass filters, one per
    lesion scale (radii rounded to powers of two): what a lesion of that size must stand out from.
    Its std is measured over the lung fields (`region`), where the lesions are."""

    def __init__(self, f: np.ndarray, region: np.ndarray):
        self._shape = f.shape
        self._region = region
        self._spectrum = np.fft.rfft2(f)
        self._bands: dict[float, np.ndarray] = {}

    @staticmethod
    def _level(radius: float) -> float:
        return float(2.0 ** np.round(np.log2(max(radius, 1.5))))

    def std(self, radius: float, cy: float, cx: float, half: int) -> float:
        """Robust (median absolute deviation) std of the band for `radius` in a window around (cy, cx),
        over the window's part of the region (or all of it, if the region covers under a quarter)."""
        level = self._level(radius)
        if level not in self._bands:
            kernel = _gaussian_kernel(self._shape, level / 2) - _gaussian_kernel(self._shape, 2 * level)
            self._bands[level] = np.fft.irfft2(self._spectrum * kernel, s=self._shape)
        half = max(half, 12)
        window = np.s_[max(int(cy) - half, 0) : int(cy) + half + 1, max(int(cx) - half, 0) : int(cx) + half + 1]
        win, inside = self._bands[level][window], self._region[window]
        if inside.mean() >= 0.25:
            win = win[inside]
        return float(1.4826 * np.median(np.abs(win - np.median(win))))

    def response(self, profile: np.ndarray, dy: np.ndarray, dx: np.ndarray, radius: float) -> float:
        """The same band-pass filter's output at the lesion centre for a lesion `profile` sampled at
        offsets (dy, dx) from it (the profile is zero beyond the patch, so the sum is exact)."""
        level, d2 = self._level(radius), dy**2 + dx**2
        dog = sum(sign * np.exp(-d2 / (2 * s**2)) / (2 * np.pi * s**2) for sign, s in ((1, level / 2), (-1, 2 * level)))
        return float(max(np.sum(profile * dog), 1e-6))


def _place(
    rng: np.random.Generator, reach: float, size: int, region: np.ndarray, placed: list[tuple[float, float, float]]
) -> tuple[float, float, float] | None:
    """A centre for a lesion of outer radius `reach`: inside the image with a margin, where `region`
    exceeds 0.5, clear of the lesions already placed. None after 50 failed tries."""
    lo, hi = reach + _MARGIN_PX, size - 1 - reach - _MARGIN_PX
    if hi <= lo:
        return None
    for _ in range(50):
        cy, cx = rng.uniform(lo, hi, size=2)
        if region[int(cy), int(cx)] < 0.5:
            continue
        if all(np.hypot(cy - py, cx - px) > reach + pr + _MARGIN_PX for py, px, pr in placed):
            return float(cy), float(cx), float(reach)
    return None


def _nodule(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Smooth nodule profile (peak 1): round to mildly elliptical, soft edge, homogeneous dome."""
    ratio, angle = rng.uniform(0.75, 1.0), rng.uniform(0, np.pi)
    c, s = np.cos(angle), np.sin(angle)
    a, b = radius / np.sqrt(ratio), radius * np.sqrt(ratio)
    theta = np.arctan2(dy, dx)
    wobble = 1 + rng.uniform(0, 0.05) * np.cos(3 * theta + rng.uniform(0, 2 * np.pi))
    rho = np.hypot((c * dx + s * dy) / a, (-s * dx + c * dy) / b) / wobble
    edge_px = float(np.clip(rng.uniform(0.08, 0.2) * radius, 0.7, 3.0))  # soft, yet a large one stays visible
    core = 1.0 / (1.0 + np.exp((rho - 1.0) * radius / edge_px))
    dome = 0.8 + 0.2 * np.sqrt(np.clip(1 - rho**2, 0, 1))
    return core * dome


def _spiculated(rng: np.random.Generator, dy: np.ndarray, dx: np.ndarray, radius: float) -> np.ndarray:
    """Spiculated profile (peak about 1): lobulated core with a sharp edge, heterogeneous interior,
    radial spicules. Core and spicules together reach about `radius`, like a nodule of that radius."""
    core_r = radius / rng.uniform(1.25, 1.45)
    theta, dist = np.arctan2(dy, dx), np.hypot(dy, dx)
    border = np.ones_like(theta)
    for k in rng.choice(np.arange(3, 9), size=3, replace=False):
        border += rng.uniform(0.04, 0.1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    border *= core_r
    core = 1.0 / (1.0 + np.exp((dist - border) / rng.uniform(0.3, 0.6)))
    (grain,) = _noise_bands(rng, dist.shape, [[(1.0, max(core_r / 4, 0.8))]])
    core *= np.clip(0.85 + rng.uniform(0.1, 0.2) * grain, 0.55, 1.15)

    spicules = np.zeros_like(dist)
    n = int(rng.integers(6, 15))
    for angle in rng.uniform(0, 2 * np.pi) + np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(-0.25, 0.25, n):
        start = 0.85 * core_r  # just inside the border, so the spicule grows out of the core
        length = core_r * rng.uniform(0.4, 0.9)
        width = max(core_r * rng.uniform(0.04, 0.08), 0.6)
        ux, uy = np.cos(angle), np.sin(angle)
        t = np.clip(((dx - start * ux) * ux + (dy - start * uy) * uy) / length, 0, 1)
        off = np.hypot(dx - (start + t * length) * ux, dy - (start + t * length) * uy)
        w = width * (1 - 0.5 * t)
        spicules = np.maximum(spicules, rng.uniform(0.6, 0.9) * (1 - 0.35 * t) * np.exp(-0.5 * (off / w) ** 2))
    return np.maximum(core, spicules)


# ----------------------------------------------------------------------------------------------
# DICOM


def _write_dicom(
    path: Path, f: np.ndarray, rng: np.random.Generator, pid: str, k: int, study_uid: str, seed: int, spacing: float
) -> None:
    """Store `f` (bright = dense) as a 12-bit DX For Presentation file with varied rescale and photometry.

    MONOCHROME1 images store inverted values and a mirrored window, so that after modality LUT,
    window and MONOCHROME1 inversion every image shows dense structures (and lesions) bright.
    """
    offset = rng.uniform(50, 300)
    gain = min(rng.uniform(2800, 4000), (_MAX_STORED - offset) / max(f.max(), 1e-6))
    stored = np.clip(np.rint(offset + gain * f), 0, _MAX_STORED).astype(np.uint16)
    slope = float(rng.choice([1.0, 0.5]))
    intercept = float(rng.choice([0.0, -1024.0]))
    lo, hi = np.percentile(stored, [0.5, 99.9]) * slope + intercept
    center, width = (lo + hi) / 2, max(hi - lo, 1.0)
    photometric = "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2"
    if photometric == "MONOCHROME1":
        stored = (_MAX_STORED - stored).astype(np.uint16)
        center = slope * _MAX_STORED + 2 * intercept - center  # mirror the window with the values

    uid = lambda what: generate_uid(entropy_srcs=["medrpn-synth", str(seed), pid, str(k), what])  # noqa: E731
    sop_uid = uid("sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, uid("series")
    ds.Modality, ds.PresentationIntentType, ds.ImageType = "DX", "FOR PRESENTATION", ["DERIVED", "PRIMARY"]
    ds.Manufacturer, ds.BurnedInAnnotation, ds.ViewPosition = "medrpn synth", "NO", "PA"
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = pid, f"SYNTH^{pid}", "", "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "", ""
    ds.SeriesNumber, ds.InstanceNumber = k, 1
    ds.set_pixel_data(stored, photometric, 12, generate_instance_uid=False)
    ds.PixelSpacing = ds.ImagerPixelSpacing = [DSfloat(spacing, auto_format=True)] * 2
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
    ds.WindowCenter, ds.WindowWidth = round(float(center), 2), round(float(width), 2)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)

