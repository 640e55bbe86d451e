"""RSNA Pneumonia Detection Challenge: ``patientId,x,y,width,height,Target`` (stage_2_train_labels.csv).

One row per box (``Target`` 1, box ``x, y, width, height`` in pixels of the 1024x1024 DICOM) or
one row per image without lung opacity (``Target`` 0, empty box). Images are
``<image_dir>/<patientId>.dcm`` (``stage_2_train_images/`` beside the CSV by default);
``patientId`` names one image of one patient and becomes the patient id.
"""

from __future__ import annotations

from pathlib import Path

from medrpn.data.formats.common import Annotations, RecordBuilder, check_box, class_index, image_folder, number, read_csv_rows
from medrpn.data.problems import Problems
from medrpn.errors import DataError

COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_NAME = "Lung Opacity"
IMAGE_DIR = "stage_2_train_images"


def read_rsna(
    path: str | Path,
    class_names: list[str] | None = None,
    problems: Problems | None = None,
    image_dir: str | Path | None = None,
) -> Annotations:
    """Read the RSNA Pneumonia labels; the one class is "Lung Opacity" (it must be among `class_names` if given)."""
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    class_names = list(class_names) if class_names is not None else [CLASS_NAME]
    folder = image_folder(path, image_dir, IMAGE_DIR)
    header, rows = read_csv_rows(path, COLUMNS, ",".join(COLUMNS))
    col = {name: header.index(name) for name in header}
    builder = RecordBuilder(path)
    for line, row in rows:
        if len(row) != len(header):
            problems.add("bad_row", DataError(path, f"expected {len(header)} fields as in the header, got {len(row)}", row=line))
            continue
        patient = row[col["patientId"]]
        if not patient:
            problems.add("bad_row", DataError(path, "empty 'patientId' field", row=line))
            continue
        image_path = folder / f"{patient}.dcm"
        key = str(image_path)
        builder.add_image(image_path, patient)
        target, coords = row[col["Target"]], [row[col[c]] for c in COLUMNS[1:5]]
        if target not in ("0", "1"):
            problems.add("bad_row", DataError(path, f"Target must be 0 or 1, got {target!r}", row=line), key)
            continue
        if target == "0":
            if any(coords):
                problems.add("bad_row", DataError(path, "Target 0 (no opacity) but a box is given", row=line), key)
            continue
        label = class_index(CLASS_NAME, class_names, path, line, problems, key)
        if label is None:
            continue
        try:
            x, y, w, h = (number(v, c, path, line) for v, c in zip(coords, COLUMNS[1:5]))
        except DataError as error:
            problems.add("bad_row", error, key)
            continue
        box = check_box([x, y, x + w, y + h], path, line, problems, key)
        if box is not None:
            builder.add_box(image_path, box, label, line)
    return builder.build(problems), class_names
