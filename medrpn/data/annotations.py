"""The front door for annotation files: detect the format, call its reader (`medrpn.data.formats`).

Formats (name for `data.format` in a config, and how it is recognised when not named):

    coco    COCO detection JSON            .json with "images", "annotations", "categories"
    monai   MONAI detection datalist (2D)  .json with lists of {"image", "box", "label"} items
    csv     image,x1,y1,x2,y2,label[,patient_id][,frame]     .csv with that header
    yolo    YOLO label files               a folder, or an Ultralytics data.yaml
    vindr   VinDr-CXR train.csv            .csv with image_id, class_name, rad_id, x_min ...
    rsna    RSNA Pneumonia labels          .csv with patientId, x, y, width, height, Target
    nih     NIH ChestX-ray14 BBox_List     .csv with Image Index, Finding Label, Bbox [x,y,w,h]

Volumes (records with xyzxyz voxel boxes in medrpn's LPS orientation, `medrpn.data.volume`):

    csv3d   image,x1,y1,z1,x2,y2,z2,label[,patient_id]    voxel boxes in the file's own axes
    luna16  LUNA16 annotations.csv          seriesuid,coordX,coordY,coordZ,diameter_mm (world mm)
    masks   image,mask[,patient_id]         lesion masks, one box per connected lesion

CSV and JSON files may be gzipped (``.csv.gz``). Image paths are relative to the annotation
file's folder (or to `image_dir` for the formats that name images by id: vindr, rsna, nih, luna16).
"""

from __future__ import annotations

from pathlib import Path

from medrpn.data.formats import (
    read_coco,
    read_csv,
    read_monai_datalist,
    read_nih,
    read_rsna,
    read_vindr,
    read_yolo,
)
from medrpn.data.formats.common import Annotations, load_json, open_text
from medrpn.data.formats.lesion_masks import MASK_COLUMNS, read_lesion_masks
from medrpn.data.formats.luna16 import LUNA16_COLUMNS, read_luna16
from medrpn.data.formats.volume_csv import VOLUME_CSV_COLUMNS, read_volume_csv
from medrpn.data.formats.plain_csv import CSV_COLUMNS
from medrpn.data.fusion import FusionConfig
from medrpn.data.mask_boxes import MaskConfig
from medrpn.data.io import ReadConfig
from medrpn.data.problems import Problems
from medrpn.errors import ConfigError, DataError

FORMATS = ("coco", "monai", "csv", "yolo", "vindr", "rsna", "nih", "csv3d", "luna16", "masks")

__all__ = ["FORMATS", "CSV_COLUMNS", "detect_format", "read_annotations", "read_coco", "read_csv"]


def read_annotations(
    path: str | Path,
    class_names: list[str] | None = None,
    format: str | None = None,
    problems: Problems | None = None,
    image_dir: str | Path | None = None,
    fusion: FusionConfig | None = None,
    read: ReadConfig | None = None,
    masks: MaskConfig | None = None,
) -> Annotations:
    """Read an annotation file (or YOLO folder) of any supported format.

    Args:
        path: the annotation file, or a folder of YOLO labels.
        class_names: the classes to use, in label order; None takes them from the file.
        format: one of `FORMATS`; None detects it from the file.
        problems: where bad entries go: None raises the first (policy fail); a `Problems("skip")`
            collects them and leaves the images they touch out.
        image_dir: image folder for vindr, rsna, nih and luna16 (relative to the annotation file).
        fusion: how VinDr-CXR's several readers are fused.
        read: image reading settings (YOLO opens image headers for their size).
        masks: how lesion masks become boxes (format "masks").

    Returns:
        The records (one per image, also images without boxes) and the class names
        (``class_names[label]`` names a label).
    """
    path = Path(path)
    problems = problems if problems is not None else Problems("fail")
    format = format or detect_format(path)
    if format in ("coco", "csv"):
        reader = read_coco if format == "coco" else read_csv
        return reader(path, class_names, problems)
    if format == "monai":
        return read_monai_datalist(path, class_names, problems)
    if format == "yolo":
        return read_yolo(path, class_names, problems, read)
    if format == "vindr":
        return read_vindr(path, class_names, problems, image_dir, fusion)
    if format == "rsna":
        return read_rsna(path, class_names, problems, image_dir)
    if format == "nih":
        return read_nih(path, class_names, problems, image_dir)
    if format == "csv3d":
        return read_volume_csv(path, class_names, problems)
    if format == "luna16":
        return read_luna16(path, class_names, problems, image_dir)
    if format == "masks":
        return read_lesion_masks(path, class_names, problems, masks or MaskConfig())
    raise ConfigError(f"data.format: unknown annotation format {format!r}; choose one of {', '.join(FORMATS)}")


def detect_format(path: str | Path) -> str:
    """The format of an annotation file from its suffix and its header or top-level keys."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    try:
        if path.is_dir() or name.endswith((".yaml", ".yml")):
            return "yolo"
    except PermissionError as e:
        raise DataError(path, "permission denied") from e
    if name.endswith(".json"):
        data = load_json(path)
        if isinstance(data, dict) and {"images", "annotations"} <= set(data):
            return "coco"
        if isinstance(data, dict) and any(isinstance(v, list) for v in data.values()):
            return "monai"
        raise DataError(path, "JSON that is neither COCO detection (images/annotations/categories) nor a MONAI datalist")
    if name.endswith(".csv"):
        with open_text(path) as f:
            header = {h.strip() for h in f.readline().split(",")}
        if set(VOLUME_CSV_COLUMNS) <= header:
            return "csv3d"
        if set(CSV_COLUMNS) <= header:
            return "csv"
        if set(LUNA16_COLUMNS) <= header:
            return "luna16"
        if set(MASK_COLUMNS) <= header:
            return "masks"
        if {"image_id", "class_name", "rad_id"} <= header:
            return "vindr"
        if {"patientId", "Target"} <= header:
            return "rsna"
        if {"Image Index", "Finding Label"} <= header:
            return "nih"
        raise DataError(
            path,
            f"unrecognised CSV header {sorted(header)}: expected image,x1,y1,x2,y2,label[,patient_id], "
            "image,x1,y1,z1,x2,y2,z2,label (volumes), image,mask (lesion masks), "
            "or the VinDr-CXR, RSNA Pneumonia, NIH ChestX-ray14 or LUNA16 header",
            row=1,
        )
    raise DataError(
        path, f"unknown annotation format {path.suffix!r}: expected .json (COCO, MONAI), .csv, a YOLO folder or data.yaml"
    )


