"""Mosaic augmentation: four training images in one, their lesions' boxes following them."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image as PILImage

from medrpn.data.dataset import DetectionDataset
from medrpn.data.records import Record
from medrpn.data.transforms import MOSAIC_KEY, AugmentConfig, build_transform
from medrpn.errors import ConfigError

SIZE = 64
MOSAIC_ONLY = AugmentConfig(horizontal_flip=0.0, affine=0.0, intensity=0.0, mosaic=1.0)


def _image_with_square(value: float, top_left: tuple[int, int], side: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark SIZE x SIZE image holding one bright square of `value`, and the square's xyxy box."""
    image = np.zeros((SIZE, SIZE), dtype=np.float32)
    x, y = top_left
    image[y : y + side, x : x + side] = value
    return image, np.array([[x, y, x + side, y + side]], dtype=np.float32)


def test_a_mosaic_carries_the_lesions_of_several_images_with_their_boxes_and_classes():
    """Four images, each with a square of its own brightness and class: in every mosaic each box
    frames a square of the brightness of its class, at a zoom within `mosaic_scale`."""
    items = [_image_with_square(v, (8 + 8 * k, 12 + 4 * k), 16) for k, v in enumerate((0.25, 0.5, 0.75, 1.0))]
    transform = build_transform(SIZE, MOSAIC_ONLY)
    classes_seen, counts = set(), []
    for seed in range(20):
        transform.set_random_seed(seed)
        partners = [{"image": im, "bboxes": b, "labels": [k]} for k, (im, b) in enumerate(items[1:], start=1)]
        out = transform(image=items[0][0], bboxes=items[0][1], labels=[0], **{MOSAIC_KEY: partners})
        assert out["image"].shape == (SIZE, SIZE)
        counts.append(len(out["bboxes"]))
        for box, label in zip(out["bboxes"], out["labels"]):
            x1, y1, x2, y2 = (int(round(v)) for v in box)
            inside = out["image"][y1:y2, x1:x2]
            expected = (0.25, 0.5, 0.75, 1.0)[int(label)]
            assert abs(float(np.median(inside)) - expected) < 0.05, f"seed {seed}: box {box} is not on its class's square"
            side = max(x2 - x1, y2 - y1)
            assert side <= 16 * 1.5 + 2, f"seed {seed}: zoomed beyond 1.5"
            classes_seen.add(int(label))
    assert classes_seen == {0, 1, 2, 3}  # the partners' lesions come in with their own classes
    assert max(counts) >= 3  # zoomed out, a mosaic shows several images at once
    assert len(set(counts)) > 1  # where it is cut differs from draw to draw


def test_the_dataset_gives_each_item_partners_and_leaves_out_an_unreadable_one(tmp_path, caplog):
    records = []
    for k in range(3):
        path = tmp_path / f"slice{k}.png"
        image, box = _image_with_square(1.0, (20, 20), 20)
        PILImage.fromarray((image * 255).astype(np.uint8)).save(path)
        records.append(Record(path, box, np.array([k])))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    records.append(Record(broken, np.array([[1.0, 1.0, 9.0, 9.0]]), np.array([0])))
    dataset = DetectionDataset(records, build_transform(SIZE, MOSAIC_ONLY), SIZE, mosaic_partners=3)
    labels = set()
    with caplog.at_level(logging.WARNING):
        for _ in range(6):
            for index in range(3):
                item = dataset[index]
                assert item is not None and item["image"].shape == (1, SIZE, SIZE)
                assert item["meta"]["path"] == str(records[index].image_path)  # the item stays itself
                labels.update(item["target"]["labels"].tolist())
    assert labels == {0, 1, 2}  # partners drawn from the whole split
    assert caplog.text.count(str(broken)) == 1  # drawn as a partner: reported once, training goes on


def test_mosaic_settings_out_of_range_are_named():
    with pytest.raises(ConfigError, match="data.augment.mosaic is a probability"):
        AugmentConfig(mosaic=1.5)
    with pytest.raises(ConfigError, match=r"data.augment.mosaic_scale .* 0.5 <= low <= high"):
        AugmentConfig(mosaic=1.0, mosaic_scale=[0.25, 1.0])
