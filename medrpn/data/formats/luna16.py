"""LUNA16's ``annotations.csv``: ``seriesuid,coordX,coordY,coordZ,diameter_mm``, nodules as world
centres (patient LPS mm, as ITK and the .mhd headers give them) and diameters.

Every volume under the image folder (LUNA16's ``subset0`` ... ``subset9`` of ``<seriesuid>.mhd``)
is a record, also those without a nodule (LUNA16 lists only nodules). A nodule becomes the voxel
box of the cube around its sphere (`medrpn.data.volume.VolumeGeometry.box_of_world_sphere`),
class "nodule" (or the optional ``label`` column). A row naming a series that is not in the
folder, or a nodule outside its volume, is a problem naming the line.
"""

from __future__ import annotations

from pathlib import Path

from medrpn.data.formats.common import Annotations, RecordBuilder, check_box, class_index, image_folder, number, read_csv_rows, sorted_unique
from medrpn.data.formats.volume_csv import Geometries
from medrpn.data.problems import Problems
from medrpn.data.volume_files import VOLUME_SUFFIXES
from medrpn.errors import DataError

LUNA16_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "diameter_mm")  # then optional "label"


def read_luna16(
    path: str | Path, class_names: list[str] | None = None, problems: Problems | None = None, image_dir: str | Path | None = None
) -> Annotations:
    """Read LUNA16 annotations; volumes are found by series UID under `image_dir` (default: the CSV's folder)."""
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    header, rows = read_csv_rows(path, LUNA16_COLUMNS, ",".join(LUNA16_COLUMNS) + "[,label]")
    col = {name: header.index(name) for name in header}
    has_label = "label" in col
    if class_names is None:
        class_names = sorted_unique(r[col["label"]] for _, r in rows if len(r) == len(header)) if has_label else ["nodule"]
    folder = image_folder(path, image_dir, ".")
    volumes = {_series_of(p): p for p in sorted(folder.rglob("*")) if p.is_file() and p.name.lower().endswith(VOLUME_SUFFIXES)}
    builder = RecordBuilder(path, spatial_dims=3)
    geometry_of = Geometries(problems)
    for series, image in volumes.items():
        builder.add_image(image, series)  # LUNA16 has one scan per patient in practice; the series is the grouping key
    for line, row in rows:
        if len(row) != len(header):
            problems.add("bad_row", DataError(path, f"expected {len(header)} fields as in the header, got {len(row)}", row=line))
            continue
        field = {name: row[i] for name, i in col.items()}
        image = volumes.get(field["seriesuid"])
        if image is None:
            problems.add("missing_image", DataError(path, f"no volume {field['seriesuid']}.mhd (or .nii.gz ...) under {folder}", row=line))
            continue
        label = class_index(field["label"], class_names, path, line, problems, str(image)) if has_label else 0
        if label is None:
            continue
        try:
            centre = [number(field[c], c, path, line) for c in LUNA16_COLUMNS[1:4]]
            diameter = number(field["diameter_mm"], "diameter_mm", path, line)
        except DataError as error:
            problems.add("bad_row", error, str(image))
            continue
        if not diameter > 0:
            problems.add("zero_size", DataError(path, f"diameter_mm must be positive, got {field['diameter_mm']!r}", row=line), str(image))
            continue
        geometry = geometry_of(image)
        if geometry is None:
            continue
        box = check_box(geometry.box_of_world_sphere(centre, diameter).tolist(), path, line, problems, str(image), geometry.shape)
        if box is not None:
            builder.add_box(image, box, label, line)
    return builder.build(problems), list(class_names)


def _series_of(path: Path) -> str:
    """The series UID a LUNA16 volume is named by: its file name without the suffix."""
    name = path.name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem
