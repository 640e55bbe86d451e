"""Boxes on volumes, one per row: ``image,x1,y1,z1,x2,y2,z2,label[,patient_id]``.

`image` is a volume file (NIfTI, MetaImage, NRRD) or a DICOM series folder, relative to the
CSV's folder. The box is in the file's own voxel indices, as ITK-SNAP, 3D Slicer or a numpy
array loaded with nibabel or SimpleITK (`GetArrayFromImage` reversed) number them, edges at
integers (voxel i spans [i, i+1)); the reader turns it into medrpn's LPS orientation with the
volume's header (`medrpn.data.volume`), without reading voxels. A row whose x1..label are empty
lists a volume without lesions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medrpn.data.formats.common import (
    Annotations,
    RecordBuilder,
    check_box,
    class_index,
    number,
    read_csv_rows,
    resolve,
    sorted_unique,
)
from medrpn.data.problems import Problems
from medrpn.data.volume import VolumeGeometry
from medrpn.errors import DataError

VOLUME_CSV_COLUMNS = ("image", "x1", "y1", "z1", "x2", "y2", "z2", "label")  # then optional "patient_id"
HEADER = ",".join(VOLUME_CSV_COLUMNS) + "[,patient_id]"


class Geometries:
    """Volume headers read once per volume; an unreadable one is recorded as a problem of that volume."""

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self._known: dict[Path, VolumeGeometry | None] = {}

    def __call__(self, image: Path) -> VolumeGeometry | None:
        if image not in self._known:
            from medrpn.data.volume_files import read_volume_geometry

            try:
                self._known[image] = read_volume_geometry(image)
            except DataError as error:
                self.problems.add("unreadable_image" if image.exists() else "missing_image", error, str(image))
                self._known[image] = None
        return self._known[image]


def read_volume_csv(path: str | Path, class_names: list[str] | None = None, problems: Problems | None = None) -> Annotations:
    """Read the volume CSV (rows of one volume grouped into one record; problems name the line)."""
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    header, rows = read_csv_rows(path, VOLUME_CSV_COLUMNS, HEADER)
    col = {name: header.index(name) for name in header}
    if class_names is None:
        class_names = sorted_unique(r[col["label"]] for _, r in rows if len(r) == len(header))
    builder = RecordBuilder(path, spatial_dims=3)
    geometry_of = Geometries(problems)
    for line, row in rows:
        if len(row) != len(header) or not row[col["image"]]:
            problems.add("bad_row", DataError(path, f"expected {len(header)} fields as in the header with an image, got {len(row)}", row=line))
            continue
        field = {name: row[i] for name, i in col.items()}
        image = resolve(path.parent, field["image"])
        geometry = geometry_of(image)
        if geometry is None:
            continue
        builder.add_image(image, field.get("patient_id"))
        values = [field[c] for c in VOLUME_CSV_COLUMNS[1:]]
        if not any(values):
            continue
        if not all(values):
            empty = [c for c in VOLUME_CSV_COLUMNS[1:] if not field[c]]
            problems.add("bad_row", DataError(path, f"incomplete box: {', '.join(empty)} empty (leave all of x1..label empty for no box)", row=line), str(image))
            continue
        label = class_index(field["label"], class_names, path, line, problems, str(image))
        if label is None:
            continue
        try:
            given = [number(field[c], c, path, line) for c in VOLUME_CSV_COLUMNS[1:7]]
        except DataError as error:
            problems.add("bad_row", error, str(image))
            continue
        checked = check_box(given, path, line, problems, str(image), geometry.file_shape)
        if checked is None:
            continue
        box = geometry.boxes_from_file_index(np.array(checked))[0].tolist()
        builder.add_box(image, box, label, line)
    return builder.build(problems), list(class_names)
