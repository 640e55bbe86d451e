"""Box-aware 2D transforms (albumentations): fit to the network input size, and augment.

Images arrive windowed into [0, 1] (see `medrpn.data.io`), so intensity augmentation works on
that range and no ImageNet normalisation is applied: the detector standardises its own input.
Every image is scaled so its longest side equals `image_size` (aspect ratio kept) and padded at
the bottom/right to a square, so a box maps back to the original image by dividing by the
scale alone.

Mosaic (YOLOv4's, as Ultralytics trains with it) is albumentations' `Mosaic`: the image and three
others of the training split (which the dataset passes under `MOSAIC_KEY`) are laid out in a 2x2
grid, and a random square of it, from half to the whole grid's side, becomes the input: one to four
images, each zoomed by a factor in `mosaic_scale`, with their lesions. More lesions, of more sizes
and in more surroundings, per training image.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import albumentations as A
import cv2

from medrpn.errors import ConfigError

MOSAIC_KEY = "mosaic_metadata"  # the transform's input holding the other images of a mosaic
MOSAIC_PARTNERS = 3  # images that join each mosaic


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
        mosaic: probability that an image becomes a mosaic with three others (0: off, as in
            the recipes; Ultralytics' default is 1).
        mosaic_scale: range of the zoom factor of a mosaic's images (Ultralytics: 0.5-1.5).
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
    mosaic: float = 0.0
    mosaic_scale: list[float] = field(default_factory=lambda: [0.5, 1.5])

    def __post_init__(self) -> None:
        if not 0 <= self.mosaic <= 1:
            raise ConfigError(f"data.augment.mosaic is a probability in [0, 1], got {self.mosaic}")
        if len(self.mosaic_scale) != 2 or not 0.5 <= self.mosaic_scale[0] <= self.mosaic_scale[1]:
            # a zoom under 0.5 would need more of the grid than its four images fill
            raise ConfigError(f"data.augment.mosaic_scale must be [low, high] with 0.5 <= low <= high, got {self.mosaic_scale}")


def fit_scale(height: int, width: int, image_size: int) -> float:
    """The factor by which an image of this size is resized to fit `image_size`."""
    return image_size / max(height, width)


def build_transform(image_size: int, augment: AugmentConfig | None = None) -> A.Compose:
    """Resize+pad to `image_size` square, then (when `augment` is given) augment.

    The transform is called as `transform(image=array, bboxes=xyxy_boxes, labels=labels)` with
    boxes in absolute pixel xyxy ("pascal_voc") and returns the same keys. With mosaic on, it
    also needs `MOSAIC_KEY`: a list of `MOSAIC_PARTNERS` dicts with the same three keys (images
    already fitted to `image_size`).
    """
    steps: list[A.BasicTransform] = [
        A.LongestMaxSize(max_size=image_size, interpolation=cv2.INTER_AREA),
        A.PadIfNeeded(min_height=image_size, min_width=image_size, position="top_left", border_mode=cv2.BORDER_CONSTANT, fill=0),
    ]
    min_visibility = 0.0
    if augment is not None:
        min_visibility = augment.min_visibility
        if augment.mosaic > 0:
            steps.append(_mosaic(image_size, augment))
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


def _mosaic(image_size: int, augment: AugmentConfig) -> A.BaseCompose:
    """With probability `augment.mosaic`: the 2x2 grid of four images, then a random square of it.

    The square's side is `image_size / zoom` for a zoom in `mosaic_scale` (at most the grid's side,
    hence zoom >= 0.5), resized to `image_size`: RandomResizedCrop takes its area as a fraction of
    the grid's, drawn uniformly, so zooms under 1 come more often than over (median 0.67 for
    [0.5, 1.5]).
    """
    low, high = augment.mosaic_scale
    grid = 2 * image_size
    return A.Sequential(
        [
            A.Mosaic(
                grid_yx=(2, 2),
                target_size=(grid, grid),
                cell_shape=(image_size, image_size),
                fit_mode="contain",
                interpolation=cv2.INTER_AREA,
                fill=0,
                metadata_key=MOSAIC_KEY,
                p=1.0,
            ),
            A.RandomResizedCrop(
                size=(image_size, image_size),
                scale=((image_size / high / grid) ** 2, (image_size / low / grid) ** 2),
                ratio=(1.0, 1.0),
                interpolation=cv2.INTER_LINEAR,  # zooms in as well as out (INTER_AREA enlarges as nearest)
                p=1.0,
            ),
        ],
        p=augment.mosaic,
    )
