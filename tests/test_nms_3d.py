"""medrpn's 3D NMS keeps exactly what MONAI's `batched_nms` keeps, in the same order, on crowded
random boxes of several labels and at several thresholds, also past one block of candidates."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import batched_nms

from medrpn.model import nms_3d
from medrpn.model.nms_3d import batched_nms_3d


def _boxes(n: int, seed: int, room: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 3, generator=g) * room
    sizes = torch.rand(n, 3, generator=g) * 8 + 1
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    return boxes, torch.rand(n, generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("threshold", [0.1, 0.3, 0.5, 0.7])
@pytest.mark.parametrize(("n", "room"), [(1, 10.0), (40, 10.0), (600, 12.0), (600, 40.0)])
def test_the_same_boxes_as_monai_in_the_same_order(n, room, threshold):
    boxes, scores, labels = _boxes(n, seed=n + int(room), room=room)
    expected = batched_nms(boxes, scores, labels, threshold)
    kept = batched_nms_3d(boxes, scores, labels, threshold)
    assert torch.equal(kept, expected)
    if n > 100 and room == 12.0 and threshold <= 0.5:
        assert len(kept) < n  # crowded: some are suppressed, the test is not of disjoint boxes


def test_blocks_give_the_same_result_as_one(monkeypatch):
    boxes, scores, labels = _boxes(700, seed=3, room=15.0)
    whole = batched_nms_3d(boxes, scores, labels, 0.3)
    monkeypatch.setattr(nms_3d, "BLOCK", 64)  # 11 blocks: suppression across blocks
    assert torch.equal(batched_nms_3d(boxes, scores, labels, 0.3), whole)
    assert torch.equal(whole, batched_nms(boxes, scores, labels, 0.3))


def test_no_boxes():
    empty = torch.zeros((0, 6))
    assert batched_nms_3d(empty, torch.zeros(0), torch.zeros(0, dtype=torch.long), 0.5).shape == (0,)
