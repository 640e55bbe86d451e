"""Segmentation datasets as detection datasets: ``image,mask[,patient_id]``, one volume and its
lesion mask per row (paths relative to the CSV's folder).

Each mask becomes boxes by the rule of `medrpn.data.mask_boxes` (a lesion is a face-connected
component of one mask value, class = value - 1, components under `min_voxels` dropped, confluent
lesions one box); how many components were dropped, in how many scans, is said in a note of the
problems (logged, and listed by `medrpn check-data`). The mask must lie on the image's voxel grid
(same shape and voxel-to-world transform, as a segmentation tool writes it); a mask on another
grid, or with a value beyond the class names, is a problem naming the line. Class names default
to ["lesion"] (a binary mask).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medrpn.data.formats.common import Annotations, RecordBuilder, read_csv_rows, resolve
from medrpn.data.formats.volume_csv import Geometries
from medrpn.data.mask_boxes import MaskConfig, boxes_from_mask
from medrpn.data.problems import Problems
from medrpn.errors import DataError

MASK_COLUMNS = ("image", "mask")  # then optional "patient_id"
# Voxel-to-world transforms of image and mask may differ by this many mm (rounding in headers).
GRID_TOLERANCE_MM = 1e-3


def read_lesion_masks(
    path: str | Path,
    class_names: list[str] | None = None,
    problems: Problems | None = None,
    masks: MaskConfig = MaskConfig(),
) -> Annotations:
    """Read an image/mask CSV into 3D records with one box per lesion (by the rule `masks` sets)."""
    from medrpn.data.volume_files import read_volume

    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    class_names = list(class_names or ["lesion"])
    header, rows = read_csv_rows(path, MASK_COLUMNS, "image,mask[,patient_id]")
    col = {name: header.index(name) for name in header}
    builder = RecordBuilder(path, spatial_dims=3)
    geometry_of = Geometries(problems)
    dropped: list[int] = []  # per scan with a component under min_voxels, how many
    for line, row in rows:
        if len(row) != len(header) or not row[col["image"]] or not row[col["mask"]]:
            problems.add("bad_row", DataError(path, f"expected an image and a mask ({len(header)} fields), got {row}", row=line))
            continue
        image = resolve(path.parent, row[col["image"]])
        geometry = geometry_of(image)
        if geometry is None:
            continue
        try:
            mask = read_volume(resolve(path.parent, row[col["mask"]]))
        except DataError as error:
            problems.add("unreadable_image", DataError(path, f"mask: {error}", row=line), str(image))
            continue
        if mask.shape != geometry.shape or np.abs(mask.affine - geometry.affine).max() > GRID_TOLERANCE_MM:
            problems.add(
                "bad_row",
                DataError(path, f"mask {mask.source} is not on the grid of {image} (shape {mask.shape} vs {geometry.shape}, or another position)", row=line),
                str(image),
            )
            continue
        found = boxes_from_mask(mask.array, min_voxels=masks.min_voxels, connectivity=masks.connectivity)
        if len(found.labels) and found.labels.max() >= len(class_names):
            problems.add(
                "unknown_class",
                DataError(path, f"mask value {found.labels.max() + 1} but only {len(class_names)} class name(s) {class_names}", row=line),
                str(image),
            )
            continue
        builder.add_image(image, row[col["patient_id"]] if "patient_id" in col else None)
        for box, label in zip(found.boxes.tolist(), found.labels.tolist()):
            builder.add_box(image, box, label, line)
        if found.dropped:
            dropped.append(found.dropped)
    if dropped:
        problems.note(
            f"{path}: {sum(dropped)} mask component(s) under data.masks.min_voxels = {masks.min_voxels} voxels "
            f"left out as too small to be lesions, in {len(dropped)} scan(s)"
        )
    return builder.build(problems), class_names
