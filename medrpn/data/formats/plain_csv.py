"""The plain CSV: ``image,x1,y1,x2,y2,label[,patient_id][,frame]``, boxes in absolute pixel xyxy."""

from __future__ import annotations

from pathlib import Path

from medrpn.data.formats.common import (
    Annotations,
    RecordBuilder,
    check_box,
    class_index,
    image_key,
    number,
    read_csv_rows,
    resolve,
    sorted_unique,
)
from medrpn.data.problems import Problems
from medrpn.errors import DataError

CSV_COLUMNS = ("image", "x1", "y1", "x2", "y2", "label")  # then optional "patient_id" and "frame"
HEADER = ",".join(CSV_COLUMNS) + "[,patient_id][,frame]"


def read_csv(path: str | Path, class_names: list[str] | None = None, problems: Problems | None = None) -> Annotations:
    """Read the plain CSV format (image paths relative to the CSV's folder).

    Rows of one image are grouped into one record (in order of first appearance); a row whose
    x1..label are all empty lists an image with no lesion. Class names are ``class_names`` when
    given (a label outside them is a problem), else the sorted unique labels. An optional
    ``frame`` column picks a frame of a multi-frame DICOM or a slice of a NIfTI volume.
    Problems give the line number in the file (the header is line 1).
    """
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    header, rows = read_csv_rows(path, CSV_COLUMNS, HEADER)
    col = {name: header.index(name) for name in header}
    if class_names is None:
        class_names = sorted_unique(r[col["label"]] for _, r in rows if len(r) == len(header))
    builder = RecordBuilder(path)
    for line, row in rows:
        if len(row) != len(header):
            image = resolve(path.parent, row[0]) if row and row[0] else None
            problems.add(
                "bad_row", DataError(path, f"expected {len(header)} fields as in the header, got {len(row)}", row=line), image
            )
            continue
        field = {name: row[i] for name, i in col.items()}
        if not field["image"]:
            problems.add("bad_row", DataError(path, "empty 'image' field", row=line))
            continue
        image_path = resolve(path.parent, field["image"])
        frame = _frame(field.get("frame", ""), path, line, problems, image_path)
        if frame is False:
            continue
        key = image_key(image_path, frame)
        builder.add_image(image_path, field.get("patient_id"), frame)
        values = [field[c] for c in CSV_COLUMNS[1:]]
        if not any(values):
            continue  # an image with no lesion
        if not all(values):
            empty = [c for c in CSV_COLUMNS[1:] if not field[c]]
            problems.add(
                "bad_row",
                DataError(path, f"incomplete box: {', '.join(empty)} empty (leave all of x1..label empty for no box)", row=line),
                key,
            )
            continue
        label = class_index(field["label"], class_names, path, line, problems, key)
        if label is None:
            continue
        try:
            xyxy = [number(field[c], c, path, line) for c in CSV_COLUMNS[1:5]]
        except DataError as error:
            problems.add("bad_row", error, key)
            continue
        box = check_box(xyxy, path, line, problems, key)
        if box is not None:
            builder.add_box(image_path, box, label, line, frame)
    return builder.build(problems), list(class_names)


def _frame(value: str, path: Path, line: int, problems: Problems, image: Path) -> int | None | bool:
    """The frame column as an int, None when empty, False after recording a bad value."""
    if not value:
        return None
    if value.isdigit():
        return int(value)
    problems.add("bad_row", DataError(path, f"frame must be a whole number >= 0, got {value!r}", row=line), str(image))
    return False
