"""Annotation readers, one module per format; each returns `Record`s with absolute pixel xyxy boxes.

Use `medrpn.data.annotations.read_annotations`, which detects the format; the readers can also
be called directly.
"""

from medrpn.data.formats.coco import read_coco
from medrpn.data.formats.monai_datalist import read_monai_datalist
from medrpn.data.formats.nih import read_nih
from medrpn.data.formats.plain_csv import read_csv
from medrpn.data.formats.rsna import read_rsna
from medrpn.data.formats.vindr import read_vindr, read_vindr_reader_boxes
from medrpn.data.formats.yolo import read_yolo

__all__ = [
    "read_coco",
    "read_csv",
    "read_monai_datalist",
    "read_nih",
    "read_rsna",
    "read_vindr",
    "read_vindr_reader_boxes",
    "read_yolo",
]
