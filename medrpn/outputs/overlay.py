"""An overlay PNG per image: the greyscale image with each finding's box and "label score" drawn on it.

Meant for a quick look by a reader, not for diagnosis: the findings JSON is the record. Line width
and font grow with the image so the overlay stays legible from 256 px thumbnails to 2048 px
radiographs. Boxes are drawn just outside the finding's pixels so the outline does not hide the
edge of the lesion it marks.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from medrpn.outputs.findings import Finding, write_atomically

# Saturated colours that stay distinct from each other and from any grey (so R, G, B differ).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (255, 225, 25),  # yellow
    (0, 130, 200),  # blue
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (170, 110, 40),  # brown
)


def class_colour(index: int) -> tuple[int, int, int]:
    """The outline colour of class ``index`` (the palette repeats after 10 classes)."""
    return PALETTE[index % len(PALETTE)]


def _line_width(height: int, width: int) -> int:
    return max(2, round(max(height, width) / 512))


def _font(height: int, width: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(12, round(max(height, width) / 45))
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except TypeError:
        return ImageFont.load_default()  # older Pillow: the small bitmap font


def _to_rgb(image: np.ndarray) -> Image.Image:
    """(H, W) grey or (H, W, 3) colour, float in [0, 1] or uint8, as an 8-bit RGB picture."""
    array = np.asarray(image)
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ValueError(f"overlay needs a (H, W) greyscale or (H, W, 3) colour image, got shape {array.shape}")
    if array.dtype != np.uint8:
        unit = np.clip(np.nan_to_num(array.astype(np.float64), nan=0.0), 0.0, 1.0)
        array = np.rint(unit * 255).astype(np.uint8)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(np.ascontiguousarray(array), mode="RGB")


def to_display_uint8(image: np.ndarray) -> np.ndarray:
    """An image in [0, 1] as uint8 0..255, the form overlays need: a quarter of the memory of
    float32, so worth converting where images are read (e.g. in DataLoader workers)."""
    unit = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0), 0.0, 1.0)
    return np.rint(unit * 255).astype(np.uint8)


def write_overlay_png(
    path: str | Path,
    image: np.ndarray,
    findings: list[Finding],
    class_names: Sequence[str] | None = None,
) -> Path:
    """Draw ``findings`` on ``image`` and write it as an 8-bit RGB PNG, atomically.

    Args:
        path: where to write the PNG (parent folders are created).
        image: the ORIGINAL image the findings' ``box_px`` refer to, as the detector saw it (already
            windowed): (H, W) grey or (H, W, 3) colour, float in [0, 1] (values outside are
            clipped, NaN shown black) or uint8 (see `to_display_uint8`).
        findings: from :func:`medrpn.outputs.findings.make_findings`.
        class_names: all class names of the model; pass them so a class keeps its colour across
            images. Without them, colours follow the sorted labels present in this image.

    Returns:
        The path written.

    Raises:
        ValueError: an image that is neither (H, W) nor (H, W, 3), or a finding whose label is not
            in ``class_names``.
    """
    canvas = _to_rgb(image)
    width, height = canvas.size
    names = list(class_names) if class_names is not None else sorted({f.label for f in findings})
    missing = sorted({f.label for f in findings} - set(names))
    if missing:
        raise ValueError(f"finding labels {missing} are not among the class names {names}")

    draw = ImageDraw.Draw(canvas)
    line = _line_width(height, width)
    font = _font(height, width)

    # Lowest score first, so the most confident finding ends on top; boxes before labels, so no
    # outline crosses a label.
    placed = []
    for finding in sorted(findings, key=lambda f: f.score):
        colour = class_colour(names.index(finding.label))
        x1, y1, x2, y2 = finding.box_px
        # Pixels the box covers are [floor(x1), ceil(x2) - 1]; the outline sits just outside them.
        left = min(max(math.floor(x1) - line, 0), width - 1)
        top = min(max(math.floor(y1) - line, 0), height - 1)
        right = min(max(math.ceil(x2) - 1 + line, 0), width - 1)
        bottom = min(max(math.ceil(y2) - 1 + line, 0), height - 1)
        if right < left or bottom < top:
            continue
        draw.rectangle((left, top, right, bottom), outline=colour, width=line)
        placed.append((finding, colour, left, top))

    pad = max(1, line // 2 + 1)
    for finding, colour, left, top in placed:
        text = f"{finding.label} {finding.score:.2f}"
        tx0, ty0, tx1, ty1 = draw.textbbox((0, 0), text, font=font)
        label_w, label_h = tx1 - tx0 + 2 * pad, ty1 - ty0 + 2 * pad
        # Above the box when it fits, else just inside its top edge; always within the image.
        label_top = top - label_h if top - label_h >= 0 else top
        label_top = max(0, min(label_top, height - label_h))
        label_left = max(0, min(left, width - label_w))
        draw.rectangle((label_left, label_top, label_left + label_w - 1, label_top + label_h - 1), fill=colour)
        luminance = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2]
        ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
        draw.text((label_left + pad - tx0, label_top + pad - ty0), text, fill=ink, font=font)

    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG", compress_level=3)  # pixels as at 6, in half the time
    return write_atomically(path, buffer.getvalue())
