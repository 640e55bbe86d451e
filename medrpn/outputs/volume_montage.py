"""A picture a reader can look at for a scan's findings: for each finding (best first, at most
`max_findings`), the axial, coronal and sagittal slices through its centre, side by side, with
the finding's box drawn on each, and in millimetre proportions (a 3 mm slice is drawn three
times as tall as a 1 mm pixel is wide). Radiological display: the patient's right on the left of
the axial and coronal views, anterior at the top of the axial one, head at the top of the
coronal and sagittal ones.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medrpn.outputs.findings import write_atomically
from medrpn.outputs.overlay import _font, class_colour, to_display_uint8
from medrpn.outputs.volume_findings import VolumeFinding

PANEL = 256  # longest side of each view, in pixels


def _view(plane: np.ndarray, rect: tuple[float, float, float, float], mm: tuple[float, float], colour) -> Image.Image:
    """One view: `plane` (rows, cols) in [0, 1], `rect` (col1, row1, col2, row2) in its voxel
    units, `mm` the (row, col) spacing; scaled to PANEL on its longer physical side."""
    rows, cols = plane.shape
    height_mm, width_mm = rows * mm[0], cols * mm[1]
    scale = PANEL / max(height_mm, width_mm)
    size = (max(1, round(width_mm * scale)), max(1, round(height_mm * scale)))
    picture = Image.fromarray(to_display_uint8(plane)).convert("RGB").resize(size, Image.BILINEAR)
    sx, sy = size[0] / cols, size[1] / rows
    c1, r1, c2, r2 = rect
    ImageDraw.Draw(picture).rectangle((c1 * sx - 2, r1 * sy - 2, c2 * sx + 1, r2 * sy + 1), outline=colour, width=2)
    return picture


def write_volume_montage(
    path: str | Path,
    array: np.ndarray,
    spacing: Sequence[float],
    findings: Sequence[VolumeFinding],
    class_names: Sequence[str],
    max_findings: int = 8,
) -> Path:
    """The montage PNG of `findings` on `array` (X, Y, Z) in [0, 1], LPS-oriented; with no
    findings, the middle slice of each plane. Written atomically."""
    sx, sy, sz = (float(s) for s in spacing)
    shape = np.asarray(array.shape)
    rows = []
    shown = list(findings)[:max_findings] or [None]
    for finding in shown:
        if finding is None:
            centre = (shape // 2).astype(int)
            box = np.zeros(6)
            colour = (0, 0, 0)
        else:
            centre = np.clip(np.round(finding.centre_voxel).astype(int), 0, shape - 1)
            box = np.asarray(finding.box_voxels)
            colour = class_colour(list(class_names).index(finding.label))
        i, j, k = centre
        x1, y1, z1, x2, y2, z2 = box
        Z = array.shape[2]
        # axial: rows j (anterior at top), columns i (patient right at left)
        axial = _view(array[:, :, k].T, (x1, y1, x2, y2), (sy, sx), colour)
        # coronal: rows z (head at top), columns i
        coronal = _view(array[:, j, ::-1].T, (x1, Z - z2, x2, Z - z1), (sz, sx), colour)
        # sagittal: rows z (head at top), columns j (anterior at left)
        sagittal = _view(array[i, :, ::-1].T, (y1, Z - z2, y2, Z - z1), (sz, sy), colour)
        title = "no findings" if finding is None else f"{finding.label} {finding.score:.2f}  centre LPS {finding.centre_mm_lps} mm"
        rows.append((title, [axial, coronal, sagittal]))
    font = _font(PANEL, PANEL)
    title_h = 24
    width = sum(PANEL + 8 for _ in range(3))
    height = sum(title_h + PANEL + 8 for _ in rows)
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    top = 0
    for title, views in rows:
        draw.text((4, top + 4), title, fill=(255, 255, 255), font=font)
        left = 0
        for view in views:
            canvas.paste(view, (left, top + title_h))
            left += PANEL + 8
        top += title_h + PANEL + 8
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return write_atomically(path, buffer.getvalue())
