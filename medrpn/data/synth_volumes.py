"""Synthetic MR-like volumes with lesions of two classes, for the 3D demo and the tests.

Each volume is a head-like ellipsoid (smoothly varying "brain" signal inside a brighter rim, noise
everywhere) with 0 to 3 lesions of 3-30 mm (log-uniform diameters, drawn in millimetres, so the
anisotropic spacing, 0.9 x 0.9 x 3 mm by default, shows in voxels). Two classes that differ by
appearance, as enhancing and non-enhancing lesions do on contrast MR:

    enhancing      bright and homogeneous, soft edge
    ring           a dark core inside a bright rim

Volumes are written alternately as a DICOM series (MR Image Storage, one file per axial slice,
12-bit stored values with a rescale) and as NIfTI; half of the NIfTI files are stored with their
first two axes reversed (RAS order, as many converters write them), so a reader must use the
header to find where each voxel is. Ground truth is written three ways, all of the same lesions:

    annotations.csv   csv3d: image,x1,y1,z1,x2,y2,z2,label,patient_id (the file's own voxel axes)
    masks/<name>.nii.gz and masks.csv   a lesion mask per volume (value = class + 1) on its grid
    The box of a lesion is the box of its mask: the voxels where its profile reaches half its peak.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from medrpn.data.mask_boxes import boxes_from_mask
from medrpn.data.volume import RAS_TO_LPS
from medrpn.errors import ConfigError

CLASSES = ("enhancing", "ring")
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_DIAMETER_MM = (3.0, 30.0)
_LESION_COUNT_P = (0.15, 0.35, 0.3, 0.2)  # P(0..3 lesions in a volume)
_MAX_STORED = 4095


@dataclass
class _Lesion:
    centre: np.ndarray  # voxel index
    radii: np.ndarray  # voxels along i, j, k
    label: int


def write_synthetic_volumes(
    out_dir: str | Path,
    n_volumes: int = 12,
    shape: tuple[int, int, int] = (96, 96, 32),
    spacing_mm: tuple[float, float, float] = (0.9, 0.9, 3.0),
    seed: int = 0,
) -> dict:
    """Write `n_volumes` phantoms under `out_dir` (``volumes/``, ``masks/``, the two CSVs).

    Returns a summary: ``volumes``, ``dicom_series``, ``nifti``, ``lesions`` per class, ``csv``, ``masks_csv``.
    """
    if n_volumes < 1:
        raise ConfigError(f"n_volumes must be at least 1, got {n_volumes}")
    if min(shape) < 16:
        raise ConfigError(f"each side of a volume must be at least 16 voxels, got {shape}")
    if min(spacing_mm) <= 0:
        raise ConfigError(f"voxel spacing must be positive, got {spacing_mm}")
    out = Path(out_dir)
    (out / "volumes").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    spacing = np.asarray(spacing_mm, dtype=float)
    boxes_rows, mask_rows = [], []
    counts = {name: 0 for name in CLASSES}
    dicom_count = 0
    for n in range(n_volumes):
        name, patient = f"vol{n:03d}", f"V{n:04d}"
        values, mask = _render(rng, shape, spacing)
        affine_lps = np.diag([*spacing, 1.0])
        affine_lps[:3, 3] = [-shape[0] * spacing[0] / 2, -shape[1] * spacing[1] / 2, -shape[2] * spacing[2] / 2]
        if n % 2 == 0:
            image = f"volumes/{name}"
            _write_series(out / image, values, affine_lps, patient, seed, n)
            file_values, file_mask, file_affine = values, mask, affine_lps
            dicom_count += 1
        else:
            image = f"volumes/{name}.nii.gz"
            file_values, file_mask, file_affine = values, mask, affine_lps
            if n % 4 == 3:  # stored in RAS axis order: i and j reversed
                flip = np.diag([-1.0, -1.0, 1.0, 1.0])
                flip[:2, 3] = [shape[0] - 1, shape[1] - 1]
                file_values, file_mask, file_affine = values[::-1, ::-1], mask[::-1, ::-1], affine_lps @ flip
            nib.save(nib.Nifti1Image(np.ascontiguousarray(file_values).astype(np.int16), RAS_TO_LPS @ file_affine), out / image)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(file_mask).astype(np.uint8), RAS_TO_LPS @ file_affine), out / "masks" / f"{name}.nii.gz")
        mask_rows.append([image, f"masks/{name}.nii.gz", patient])
        found = boxes_from_mask(file_mask)
        if not len(found.boxes):
            boxes_rows.append([image, "", "", "", "", "", "", "", patient])
        for box, label in zip(found.boxes.astype(int).tolist(), found.labels.tolist()):
            boxes_rows.append([image, *box, CLASSES[label], patient])
            counts[CLASSES[label]] += 1
    with open(out / "annotations.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "x1", "y1", "z1", "x2", "y2", "z2", "label", "patient_id"])
        writer.writerows(boxes_rows)
    with open(out / "masks.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask", "patient_id"])
        writer.writerows(mask_rows)
    return {
        "volumes": n_volumes,
        "dicom_series": dicom_count,
        "nifti": n_volumes - dicom_count,
        "lesions": counts,
        "csv": str(out / "annotations.csv"),
        "masks_csv": str(out / "masks.csv"),
    }


def _render(rng: np.random.Generator, shape: tuple[int, int, int], spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(values as MR-like signal 0..~1000, lesion mask with class + 1) of one volume, LPS axes."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    centre = (np.asarray(shape, dtype=np.float32) - 1) / 2
    semi = (np.asarray(shape, dtype=np.float32) / 2) * rng.uniform(0.8, 0.9, 3).astype(np.float32)
    radius = np.sqrt((((grid - centre[:, None, None, None]) / semi[:, None, None, None]) ** 2).sum(0))
    head = radius <= 1.0
    brain = radius <= 0.88
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=4.0 / spacing)
    texture /= texture.std() + 1e-6
    values = np.where(brain, 420 + 40 * texture, np.where(head, 700.0, 15.0)).astype(np.float32)

    lesions = _place(rng, brain, spacing)
    mask = np.zeros(shape, dtype=np.uint8)
    for lesion in lesions:
        d = np.sqrt((((grid - lesion.centre[:, None, None, None]) / lesion.radii[:, None, None, None]) ** 2).sum(0))
        profile = 1.0 / (1.0 + np.exp((d - 1.0) / 0.12))  # 1 inside, 0.5 at the surface
        if lesion.label == 0:
            values += 380 * profile
        else:
            rim = np.exp(-(((d - 0.85) / 0.18) ** 2))
            values += 300 * rim * (d < 1.3) - 220 * profile * (d < 0.7)
        mask[(profile >= 0.5) & (mask == 0)] = lesion.label + 1
    values += rng.normal(0, 18, shape).astype(np.float32)
    return np.clip(values, 0, None), mask


def _place(rng: np.random.Generator, brain: np.ndarray, spacing: np.ndarray) -> list[_Lesion]:
    """0-3 lesions inside the brain, apart from each other."""
    count = int(rng.choice(len(_LESION_COUNT_P), p=_LESION_COUNT_P))
    inside = np.argwhere(ndimage.binary_erosion(brain, iterations=2))
    lesions: list[_Lesion] = []
    for _ in range(count * 20):
        if len(lesions) == count or not len(inside):
            break
        diameter = math.exp(rng.uniform(math.log(_DIAMETER_MM[0]), math.log(_DIAMETER_MM[1])))
        radii = (diameter / 2) * rng.uniform(0.8, 1.25, 3) / spacing
        radii = np.maximum(radii, 0.8)
        centre = inside[rng.integers(len(inside))].astype(float)
        reach = np.ceil(radii * 1.3).astype(int)
        lo, hi = centre - reach, centre + reach
        if (lo < 0).any() or (hi >= np.asarray(brain.shape)).any() or not brain[tuple(np.clip(lo, 0, None).astype(int))]:
            continue
        if not brain[tuple(np.minimum(hi, np.asarray(brain.shape) - 1).astype(int))]:
            continue
        if any((np.abs(centre - other.centre) < (reach + np.ceil(other.radii * 1.3) + 2)).all() for other in lesions):
            continue
        lesions.append(_Lesion(centre, radii, int(rng.integers(len(CLASSES)))))
    return lesions


def _write_series(folder: Path, values: np.ndarray, affine_lps: np.ndarray, patient: str, seed: int, n: int) -> None:
    """An MR series, one file per axial slice, LPS axes: rows along j (posterior), columns along i (left)."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = lambda what: generate_uid(entropy_srcs=["medrpn-synth-volumes", str(seed), str(n), what])  # noqa: E731
    study, series, frame = uid("study"), uid("series"), uid("frame")
    slope, intercept = 0.5, -20.0
    stored = np.clip(np.rint((values - intercept) / slope), 0, _MAX_STORED).astype(np.uint16)
    spacing = np.linalg.norm(affine_lps[:3, :3], axis=0)
    for k in range(values.shape[2]):
        sop = uid(f"sop{k}")
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MR_IMAGE_STORAGE, sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"slice{k:03d}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MR_IMAGE_STORAGE, sop
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.Manufacturer, ds.ImageType = "MR", "medrpn synth", ["DERIVED", "PRIMARY"]
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = patient, f"SYNTH^{patient}", "", "O"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.set_pixel_data(np.ascontiguousarray(stored[:, :, k].T), "MONOCHROME2", 12, generate_instance_uid=False)
        ds.PixelSpacing = [round(float(spacing[1]), 6), round(float(spacing[0]), 6)]  # row spacing (along j), column spacing (along i)
        ds.SliceThickness = round(float(spacing[2]), 6)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [round(float(v), 6) for v in affine_lps[:3, 3] + affine_lps[:3, 2] * k]
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
        pydicom.dcmwrite(folder / f"slice{k:03d}.dcm", ds, enforce_file_format=True)
