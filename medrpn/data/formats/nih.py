"""NIH ChestX-ray14 boxes: ``BBox_List_2017.csv`` (``Image Index, Finding Label, Bbox [x, y, w, h]``).

The header's last field is split by its own commas (``Bbox [x,y,w,h]``), so the four box values
are read by position (columns 3-6), in pixels of the 1024x1024 PNG. The list holds only the
images that have a box. Images are ``<image_dir>/<Image Index>`` (``images/`` beside the CSV
by default, where the dataset's tar files unpack); the patient id is the part of the file name
before the underscore (``00013118_008.png`` -> ``00013118``).
"""

from __future__ import annotations

from pathlib import Path

from medrpn.data.formats.common import (
    Annotations,
    RecordBuilder,
    check_box,
    class_index,
    image_folder,
    number,
    read_csv_rows,
    sorted_unique,
)
from medrpn.data.problems import Problems
from medrpn.errors import DataError

COLUMNS = ("Image Index", "Finding Label")
HEADER = "Image Index,Finding Label,Bbox [x,y,w,h]"
IMAGE_DIR = "images"


def read_nih(
    path: str | Path,
    class_names: list[str] | None = None,
    problems: Problems | None = None,
    image_dir: str | Path | None = None,
) -> Annotations:
    """Read the NIH bounding-box list; classes default to the sorted finding labels."""
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    header, rows = read_csv_rows(path, COLUMNS, HEADER)
    if len(header) < 6 or not header[2].startswith("Bbox"):
        raise DataError(path, f"expected header {HEADER}", row=1)
    if class_names is None:
        class_names = sorted_unique(row[1] for _, row in rows if len(row) > 1)
    folder = image_folder(path, image_dir, IMAGE_DIR)
    builder = RecordBuilder(path)
    for line, row in rows:
        if len(row) < 6 or not row[0]:
            problems.add("bad_row", DataError(path, "expected Image Index, Finding Label and 4 box values", row=line))
            continue
        image_path = folder / row[0]
        key = str(image_path)
        builder.add_image(image_path, row[0].split("_")[0])
        label = class_index(row[1], class_names, path, line, problems, key)
        if label is None:
            continue
        try:
            x, y, w, h = (number(v, c, path, line) for v, c in zip(row[2:6], ("x", "y", "w", "h")))
        except DataError as error:
            problems.add("bad_row", error, key)
            continue
        box = check_box([x, y, x + w, y + h], path, line, problems, key)
        if box is not None:
            builder.add_box(image_path, box, label, line)
    return builder.build(problems), class_names
