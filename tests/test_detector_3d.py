"""The two-stage detector on volumes: the 2D detector's contract with (B, C, X, Y, Z) input and
xyzxyz boxes. It learns two lesions of two classes on a fixed batch (boxes and classes found),
and refuses what is 2D only."""

from __future__ import annotations

import pytest
import torch
from monai.data.box_utils import box_iou

from medrpn.errors import ConfigError
from medrpn.model.detector_3d import Anchor3DConfig, Detector3DConfig, build_detector_3d
from medrpn.model.rpn import RPNConfig


def _batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(0)
    images = 0.3 + 0.05 * torch.randn(2, 1, 32, 32, 16, generator=generator)
    images[0, 0, 6:16, 8:18, 4:8] = 0.9  # class 1: bright
    images[1, 0, 16:24, 6:14, 6:10] = 0.05  # class 0: dark
    targets = [
        {"boxes": torch.tensor([[6.0, 8.0, 4.0, 16.0, 18.0, 8.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[16.0, 6.0, 6.0, 24.0, 14.0, 10.0]]), "labels": torch.tensor([0])},
    ]
    return images, targets


def test_the_3d_detector_learns_where_and_what_two_lesions_are():
    torch.manual_seed(0)
    model = build_detector_3d(Detector3DConfig(num_classes=2))
    images, targets = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    totals = []
    for _ in range(50):
        losses = model(images, targets).losses
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        totals.append(total.item())
    assert sum(totals[-5:]) / 5 < totals[0] / 2
    model.eval()
    with torch.no_grad():
        output = model(images)
    for detections, target in zip(output.detections, targets):
        assert detections["boxes"].shape[1] == 6 and len(detections["boxes"]) >= 1
        assert box_iou(detections["boxes"][:1], target["boxes"]).item() >= 0.4
        assert detections["labels"][0] == target["labels"][0]
    assert all(p.shape[1] == 6 and len(p) <= 100 for p in output.proposals)


def test_an_rpn_only_3d_detector_returns_its_proposals_as_class_agnostic_findings():
    model = build_detector_3d(Detector3DConfig(num_classes=2, rpn_only=True)).eval()
    images, _ = _batch()
    with torch.no_grad():
        output = model(images)
    first = output.detections[0]
    assert torch.equal(first["boxes"], output.proposals[0]) and (first["labels"] == 0).all()
    assert torch.equal(first["scores"], output.proposal_scores[0])


def test_a_volume_without_lesions_trains_as_background():
    model = build_detector_3d(Detector3DConfig(num_classes=1)).train()
    images = torch.rand(1, 1, 32, 32, 16)
    losses = model(images, [{"boxes": torch.zeros(0, 6), "labels": torch.zeros(0, dtype=torch.int64)}]).losses
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_rpn_box_reg"].item() == 0.0


def test_what_is_2d_only_is_refused_by_name():
    with pytest.raises(ConfigError, match="test_flips: horizontal flips images; volumes flip along x, y or z"):
        build_detector_3d(Detector3DConfig(num_classes=1, rpn=RPNConfig(test_flips=["horizontal"])))
    with pytest.raises(ConfigError, match="not available for volumes"):
        build_detector_3d(Detector3DConfig(num_classes=1, rpn=RPNConfig(sampler="quality_focal")))
    with pytest.raises(ConfigError, match="give anchors for 4"):
        build_detector_3d(Detector3DConfig(num_classes=1, anchors=Anchor3DConfig(sizes=[[4.0]], aspect_ratios=[[[1.0, 1.0]]])))


def test_the_3d_giou_box_loss_is_zero_for_the_exact_box_and_trains():
    from medrpn.model.roi_heads import RoIConfig

    config = Detector3DConfig(num_classes=2, roi=RoIConfig(output_size=4, representation_size=64, batch_size_per_image=32, box_loss="giou"))
    heads = build_detector_3d(config).roi_heads
    rois = torch.tensor([[2.0, 2.0, 2.0, 12.0, 14.0, 8.0], [0.0, 0.0, 0.0, 6.0, 6.0, 6.0]])
    lesions = torch.tensor([[3.0, 1.0, 2.0, 13.0, 12.0, 9.0], [0.0, 0.0, 0.0, 6.0, 6.0, 6.0]])
    labels = torch.tensor([2, 0])
    targets = heads.box_coder.encode_single(lesions, rois)
    deltas = torch.zeros(2, 3 * 6)
    deltas[0, 12:] = targets[0]
    logits = torch.zeros(2, 3)
    assert heads._losses(logits, deltas, labels, targets, rois)["loss_box_reg"].abs() < 1e-5
    # zero offsets keep the RoI: 10 x (1 - GIoU) / 2 RoIs, by hand: intersection 9 x 10 x 6 = 540,
    # union 720 + 770 - 540 = 950, enclosing box 11 x 13 x 7 = 1001
    zero = heads._losses(logits, torch.zeros(2, 18), labels, targets, rois)["loss_box_reg"]
    giou = 540 / 950 - (1001 - 950) / 1001
    assert abs(float(zero) - 10 * (1 - giou) / 2) < 1e-4
    model = build_detector_3d(config).train()
    images, batch_targets = _batch()
    model(images, batch_targets).losses["loss_box_reg"].backward()
    assert model.roi_heads.bbox_pred.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("flip", ["x", "z"])
def test_3d_flipped_proposals_are_the_mirror_of_those_of_the_flipped_volume(flip):
    """{volume, its mirror} are the same two views whichever one is given: the merged proposals of
    the mirrored volume are the mirror of the volume's (a wrong mapping back breaks this)."""
    from medrpn.model.flip_proposals import flip_images, unflip_boxes

    torch.manual_seed(0)
    model = build_detector_3d(Detector3DConfig(num_classes=2, rpn=RPNConfig(post_nms_top_n_test=20, test_flips=[flip]))).eval()
    alone = build_detector_3d(Detector3DConfig(num_classes=2, rpn=RPNConfig(post_nms_top_n_test=20)))
    alone.load_state_dict(model.state_dict())
    images, _ = _batch()
    with torch.no_grad():
        out, mirrored, plain = model(images), model(flip_images(images, flip)), alone.eval()(images)
    for i in range(2):
        boxes, scores = out.proposals[i], out.proposal_scores[i]
        back = unflip_boxes(mirrored.proposals[i], flip, tuple(images.shape[2:]))
        torch.testing.assert_close(boxes[torch.argsort(scores)], back[torch.argsort(mirrored.proposal_scores[i])])
        assert len(boxes) <= 20 and float(scores[0]) >= float(plain.proposal_scores[i][0])
        assert float(box_iou(boxes, boxes).fill_diagonal_(0).max()) <= 0.7  # one 3D NMS over both views


def test_the_3d_rpn_keeps_overlapping_proposals_for_training_by_its_training_nms_threshold():
    rpn = RPNConfig(nms_thresh=0.3, nms_thresh_train=0.95, pre_nms_top_n_train=200, pre_nms_top_n_test=200,
                    post_nms_top_n_train=200, post_nms_top_n_test=200)
    model = build_detector_3d(Detector3DConfig(num_classes=1, rpn=rpn))
    generator = torch.Generator().manual_seed(0)
    corners = torch.rand(200, 3, generator=generator) * 4 + 10  # 200 boxes crowded about one place
    boxes = torch.cat([corners, corners + 8 + torch.rand(200, 3, generator=generator)], dim=1)
    logits = torch.randn(200, generator=generator)
    kept = {}
    for training in (True, False):
        model.rpn.train(training)
        kept[training], _ = model.rpn._select(boxes, logits, [200], [32, 32, 32])
    overlaps = box_iou(kept[True], kept[True]).fill_diagonal_(0)
    assert float(overlaps.max()) > 0.3 and len(kept[True]) > 3 * len(kept[False])
    assert float(box_iou(kept[False], kept[False]).fill_diagonal_(0).max()) <= 0.3
