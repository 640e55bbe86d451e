"""Box-aware 2D transforms (albumentations): fit to the network input size, and augment.

Images arrive windowed into [0, 1] (see `medrpn.data.io`), so intensity augmentation works on
that range and no ImageNet normalisation is applied: the detector standardises its own input.
Every image is scaled so its longest side equals `image_size` (aspect ratio kept) and padded at
the bottom/right to a square, so a box maps back to the original image by dividing by the
scale alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import albumentations as A
import cv2


@dataclass
class AugmentConfig:
    """Random augmentation used in training only; a probability of 0 switches a step off.

    Attributes:
        horizontal_flip: probability of a left-right flip.
        vertical_flip: probability of an up-down flip (off for radiographs, whose top is the top).
        affine: probability of a random scale/shift/rotation, with the ranges below.
        scale: range of the random zoom factor.
        translate: largest shift, as a fraction of the image side.
        rotate: largest rotation in degrees.
        intensity: probability of a random brightness/contrast change of up to +-`intensity_limit`.
        intensity_limit: largest brightness and contrast change.
        min_visibility: a box cut by the augmentation is kept only if at least this fraction of
            it remains in the image.
    """

    horizontal_flip: float = 0.5
    vertical_flip: float = 0.0
    affine: float = 0.5
    scale: list[float] = field(default_factory=lambda: [0.85, 1.15])
    translate: float = 0.05
    rotate: float = 10.0
    intensity: float = 0.5
    intensity_limit: float = 0.15
    min_visibility: float = 0.5


def fit_scale(height: int, width: int, image_size: int) -> float:
    """The factor by which an image of this size is resized to fit `image_size`."""
    return image_size / max(height, width)


def build_transform(image_size: int, augment: AugmentConfig | None = None) -> A.Compose:
    """Resize+pad to `image_size` square, then (when `augment` is given) augment.

    The transform is called as `transform(image=array, bboxes=xyxy_boxes, labels=labels)` with
    boxes in absolute pixel xyxy ("pascal_voc") and returns the same keys.
    """
    steps: list[A.BasicTransform] = [
        A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_AREA),
        A.PadIfNeeded(min_height=image_size, min_width=image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0),
    ]
    min_visibility = 0.0
    if augment is not None:
        min_visibility = augment.min_visibility
        steps += [
            A.HorizontalFlip(p=augment.horizontal_flip),
            A.VerticalFlip(p=augment.vertical_flip),
            A.Affine(
                scale=tuple(augment.scale),
                translate_percent=(-augment.translate, augment.translate),
                rotate=(-augment.rotate, augment.rotate),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                p=augment.affine,
            ),
            A.RandomBrightnessContrast(
                brightness_limit=augment.intensity_limit, contrast_limit=augment.intensity_limit, p=augment.intensity
            ),
        ]
    return A.Compose(
        steps,
        bbox_params=A.BboxParams(
            format="pascal_voc", label_fields=["labels"], min_visibility=min_visibility, clip=True, filter_invalid_bboxes=True
        ),
    )
