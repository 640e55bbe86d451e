"""A 3D scan in medrpn's one orientation, and the mapping of voxel boxes into it.

Every volume reader (`medrpn.data.volume_files`, `medrpn.data.dicom_series`) returns a `Volume`
whose array axes run towards the patient's Left, Posterior and Superior: `array[i, j, k]`, i from
the patient's right to left, j from anterior to posterior, k from feet to head. These are the
patient axes of DICOM and ITK (LPS), so `affine` maps an index to DICOM patient coordinates in mm
without a sign change, and an axial slice `array[:, :, k]` shown with rows j and columns i is
what a DICOM viewer shows (`Volume.axial`). A file stored in another orientation is flipped and
transposed into this one (nibabel's orientation helpers: axis order and direction only; an
oblique acquisition keeps its rotation in `affine`).

Boxes are `x1, y1, z1, x2, y2, z2` in voxel units along i, j, k, edges at integers: voxel
(i, j, k) spans [i, i+1) x [j, j+1) x [k, k+1), and its centre, where `affine` places it, is at
box coordinates (i + 0.5, j + 0.5, k + 0.5). Annotations given in a file's own voxel indices
(what ITK-SNAP or 3D Slicer show) go through `VolumeGeometry.boxes_from_file_index`; world
coordinates through `VolumeGeometry.index_of_world`. The geometry comes from the header alone
(`medrpn.data.volume_files.read_volume_geometry`), so annotations are mapped without reading voxels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

# Index axis a runs towards increasing world axis a (world = patient LPS).
LPS = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class VolumeGeometry:
    """Where a volume's voxels are, in medrpn's LPS orientation.

    Attributes:
        shape: (X, Y, Z) voxels along i, j, k (towards patient L, P, S).
        affine: 4x4, voxel index (i, j, k, 1) -> patient LPS millimetres.
        file_orientation: how the file's own voxel axes map to these (nibabel orientation
            transform: row = file axis, [axis here, +1 or -1 flipped]).
        file_shape: the voxel counts along the file's own axes.
    """

    shape: tuple[int, int, int]
    affine: np.ndarray
    file_orientation: np.ndarray = field(default_factory=lambda: LPS.copy())
    file_shape: tuple[int, int, int] | None = None

    @classmethod
    def from_file_affine(cls, file_shape: tuple[int, int, int], affine_lps: np.ndarray) -> VolumeGeometry:
        """The geometry of a file whose voxel index -> LPS mm map is `affine_lps`, once turned to LPS."""
        transform = ornt_transform(io_orientation(affine_lps), LPS)
        shape = [0, 0, 0]
        for axis, (target, _) in enumerate(transform):
            shape[int(target)] = int(file_shape[axis])
        affine = affine_lps @ inv_ornt_aff(transform, file_shape)
        return cls(tuple(shape), affine, transform, tuple(int(n) for n in file_shape))  # type: ignore[arg-type]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along i, j, k (the lengths of the affine's columns)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def world_of_index(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (centres at integers) -> (N, 3) LPS mm."""
        index = np.asarray(index, dtype=float).reshape(-1, 3)
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def index_of_world(self, world: np.ndarray) -> np.ndarray:
        """(N, 3) LPS mm -> (N, 3) voxel indices (centres at integers)."""
        world = np.asarray(world, dtype=float).reshape(-1, 3)
        return (world - self.affine[:3, 3]) @ np.linalg.inv(self.affine[:3, :3]).T

    def boxes_from_file_index(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 6) boxes in the file's own voxel axes -> boxes in these axes."""
        return reorient_boxes(boxes, self.file_orientation, self.file_shape or self.shape)

    def file_index_boxes(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 6) boxes in these axes -> the file's own voxel axes (the inverse of
        `boxes_from_file_index`): what a DICOM reference (column, row, slice) or an ITK-SNAP user needs."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
        file_shape = self.file_shape or self.shape
        out = np.empty_like(boxes)
        for axis, (target, flip) in enumerate(self.file_orientation):
            target = int(target)
            lo, hi = boxes[:, target], boxes[:, target + 3]
            if flip < 0:
                lo, hi = file_shape[axis] - hi, file_shape[axis] - lo
            out[:, axis], out[:, axis + 3] = lo, hi
        return out

    def box_of_world_sphere(self, centre: np.ndarray, diameter_mm: float) -> np.ndarray:
        """The voxel box (6,) that holds a sphere of `diameter_mm` about an LPS `centre` (LUNA16's
        annotation): the bounding box of the sphere's axis-aligned cube corners, mapped to voxels."""
        half = diameter_mm / 2
        corners = np.array([[sx, sy, sz] for sx in (-half, half) for sy in (-half, half) for sz in (-half, half)])
        index = self.index_of_world(np.asarray(centre, dtype=float) + corners)
        return np.concatenate([index.min(axis=0) + 0.5, index.max(axis=0) + 0.5])


@dataclass
class Volume:
    """A scan as float32 voxel values (modality units: HU for CT, the scanner's scale for MR).

    Attributes:
        array: (X, Y, Z) float32, axes towards patient L, P, S (see the module docstring).
        geometry: shape, affine and the file's orientation (`VolumeGeometry`).
        source: the file or folder it was read from, for messages.
        meta: identifiers (SeriesInstanceUID, StudyInstanceUID, PatientID, Modality, ...) and, for
            DICOM, `SOPInstanceUIDs` and `SliceFiles` in the order of the file's slice axis (for an
            enhanced multi-frame file the same file each time, and `SliceFrames`: the DICOM frame
            number, from 1, of each slice).
    """

    array: np.ndarray
    geometry: VolumeGeometry
    source: str
    meta: dict = field(default_factory=dict)

    @classmethod
    def from_file_array(cls, array: np.ndarray, affine_lps: np.ndarray, source: str, meta: dict | None = None) -> Volume:
        """A volume from voxels in a file's own axes and that file's index -> LPS mm map, turned to LPS."""
        geometry = VolumeGeometry.from_file_affine(array.shape, affine_lps)
        array = np.ascontiguousarray(apply_orientation(array, geometry.file_orientation))
        return cls(array, geometry, source, meta or {})

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.geometry.shape

    @property
    def affine(self) -> np.ndarray:
        return self.geometry.affine

    @property
    def spacing(self) -> tuple[float, float, float]:
        return self.geometry.spacing

    def axial(self, k: int) -> np.ndarray:
        """Slice k as a viewer shows it: rows anterior -> posterior, columns patient right -> left."""
        return self.array[:, :, k].T


def reorient_boxes(boxes: np.ndarray, transform: np.ndarray, file_shape: tuple[int, ...]) -> np.ndarray:
    """Boxes (N, 6) in a file's voxel axes -> the axes `transform` leads to (a nibabel orientation
    transform, as in `VolumeGeometry.file_orientation`).

    A flipped axis of n voxels maps an edge c to n - c (and swaps the box's two edges).
    """
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    out = np.empty_like(boxes)
    for axis, (target, flip) in enumerate(transform):
        target = int(target)
        lo, hi = boxes[:, axis], boxes[:, axis + 3]
        if flip < 0:
            lo, hi = file_shape[axis] - hi, file_shape[axis] - lo
        out[:, target], out[:, target + 3] = lo, hi
    return out
