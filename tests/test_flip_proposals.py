"""Test-time flips of the RPN: proposals of mirrored views mapped back and merged."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou

from medrpn.errors import ConfigError
from medrpn.model import AnchorConfig, BackboneConfig, DetectorConfig, RoIConfig, RPNConfig, build_detector
from medrpn.model.flip_proposals import flip_images, merge_proposals, unflip_boxes




def detector(test_flips: list[str], rpn_only: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    config = DetectorConfig(
        num_classes=2,
        backbone=BackboneConfig(name="resnet18", fpn_channels=32, returned_stages=[1, 2, 3]),
        anchors=AnchorConfig(sizes=[[8.0], [16.0], [32.0], [64.0]]),
        rpn=RPNConfig(pre_nms_top_n_test=200, post_nms_top_n_test=30, test_flips=test_flips),
        roi=RoIConfig(representation_size=32),
        rpn_only=rpn_only,
    )
    return build_detector(config).eval()


def images() -> torch.Tensor:
    torch.manual_seed(1)
    batch = torch.rand(2, 1, 64, 48) * 0.2  # not square: a flip that swapped width and height would show
    batch[0, 0, 10:30, 5:17] += 0.7
    batch[1, 0, 40:50, 20:44] += 0.7
    return batch


def bright_box(image: torch.Tensor) -> torch.Tensor:
    rows, cols = torch.where(image[0] > 0.5)
    return torch.tensor([[cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]], dtype=torch.float32)


@pytest.mark.parametrize("flip", ["horizontal", "vertical"])
def test_a_box_found_in_the_flipped_image_maps_back_onto_the_lesion(flip):
    image = images()[0]
    found = bright_box(flip_images(image[None], flip)[0])
    assert not torch.equal(found, bright_box(image))  # the lesion is off-centre: the flip moves it
    torch.testing.assert_close(unflip_boxes(found, flip, (64, 48)), bright_box(image))


def test_merging_keeps_the_best_of_every_view_without_duplicates():
    a = (torch.tensor([[0.0, 0, 10, 10], [20, 20, 30, 30]]), torch.tensor([0.9, 0.4]))
    b = (torch.tensor([[1.0, 0, 10, 10], [40, 40, 50, 50]]), torch.tensor([0.8, 0.7]))
    boxes, scores = merge_proposals([a, b], nms_thresh=0.5, top_n=10)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.4]))  # the 0.8 duplicate is gone
    torch.testing.assert_close(boxes[1], b[0][1])
    assert len(merge_proposals([a, b], nms_thresh=0.5, top_n=2)[0]) == 2


@pytest.mark.parametrize("flip", ["horizontal", "vertical"])
@pytest.mark.parametrize("rpn_only", [True, False])
def test_flipped_proposals_are_the_mirror_of_those_of_the_flipped_image(flip, rpn_only):
    """{image, its mirror} are the same two views whichever one is given, so the merged proposals of
    the mirrored image must be the mirror of the image's: a wrong mapping back breaks this."""
    model = detector([flip], rpn_only=rpn_only)
    batch = images()
    with torch.no_grad():
        out = model(batch)
        mirrored = model(flip_images(batch, flip))
        alone = detector([], rpn_only=rpn_only)(batch)
    for i in range(2):
        boxes, scores = out.proposals[i], out.proposal_scores[i]
        back = unflip_boxes(mirrored.proposals[i], flip, (64, 48))
        order, back_order = torch.argsort(scores), torch.argsort(mirrored.proposal_scores[i])
        torch.testing.assert_close(boxes[order], back[back_order])
        assert len(boxes) <= 30
        assert torch.all(scores[:-1] >= scores[1:])
        overlap = box_iou(boxes, boxes).fill_diagonal_(0)
        assert float(overlap.max()) <= 0.7  # one NMS across both views and every level
        assert float(scores[0]) >= float(alone.proposal_scores[i][0])
    if rpn_only:  # the candidates are the merged proposals
        torch.testing.assert_close(out.detections[0]["boxes"], out.proposals[0])


def test_flips_change_nothing_in_training():
    batch = images()
    targets = [{"boxes": bright_box(img), "labels": torch.tensor([0])} for img in batch]
    plain = detector([]).train()(batch, targets).losses
    flipped = detector(["horizontal", "vertical"]).train()(batch, targets).losses
    assert plain.keys() == flipped.keys()
    for name in plain:
        torch.testing.assert_close(plain[name], flipped[name])


@pytest.mark.parametrize(
    "flips, message",
    [(["diagonal"], "rpn.test_flips: 'diagonal' is not one of 'horizontal', 'vertical', 'x', 'y', 'z'"),
     (["horizontal", "horizontal"], "each flip once"),
     (["z"], "model.rpn.test_flips: z flips volumes; images flip horizontal or vertical")],
)
def test_unknown_or_repeated_flips_are_config_errors(flips, message):
    with pytest.raises(ConfigError, match=message):
        detector(flips)


@pytest.mark.parametrize("flip", ["x", "y", "z"])
def test_a_box_found_in_the_flipped_volume_maps_back_onto_the_lesion(flip):
    volume = torch.zeros(1, 1, 20, 16, 12)
    volume[0, 0, 2:7, 3:12, 1:4] = 1.0  # off-centre along every axis: box [2, 3, 1, 7, 12, 4]
    flipped = flip_images(volume, flip)[0, 0]
    where = torch.argwhere(flipped > 0.5)
    found = torch.cat([where.min(dim=0).values, where.max(dim=0).values + 1]).float()[None]
    assert found.tolist() != [[2.0, 3.0, 1.0, 7.0, 12.0, 4.0]]
    assert unflip_boxes(found, flip, (20, 16, 12)).tolist() == [[2.0, 3.0, 1.0, 7.0, 12.0, 4.0]]


def test_volume_proposals_of_every_view_merge_by_3d_nms():
    a = (torch.tensor([[0.0, 0, 0, 10, 10, 10], [20, 20, 20, 30, 30, 30]]), torch.tensor([0.9, 0.4]))
    b = (torch.tensor([[1.0, 0, 0, 10, 10, 10], [40, 40, 40, 50, 50, 50]]), torch.tensor([0.8, 0.7]))
    boxes, scores = merge_proposals([a, b], nms_thresh=0.5, top_n=10)
    torch.testing.assert_close(scores, torch.tensor([0.9, 0.7, 0.4]))  # the 0.8 duplicate is gone
    assert boxes.shape == (3, 6)
