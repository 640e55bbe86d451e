"""The detector's parts, each checked on its own, and the assembled detector learning."""

from __future__ import annotations

import pytest
import torch
from torchvision.models.detection.image_list import ImageList

from medrpn.errors import ConfigError
from medrpn.model import (
    AnchorConfig,
    BackboneConfig,
    DetectorConfig,
    RoIConfig,
    RPNConfig,
    build_anchor_generator,
    build_backbone,
    build_detector,
)

SMALL = dict(
    backbone=BackboneConfig(name="resnet18", fpn_channels=32),
    rpn=RPNConfig(pre_nms_top_n_train=200, post_nms_top_n_train=100, pre_nms_top_n_test=100, post_nms_top_n_test=50),
    roi=RoIConfig(batch_size_per_image=32, representation_size=64),
)


def small_detector(num_classes: int = 2, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector(DetectorConfig(num_classes=num_classes, **{**SMALL, **overrides}))


def test_anchor_count_per_level_is_sizes_times_ratios_times_positions():
    config = AnchorConfig(sizes=[[8.0, 12.0], [16.0, 24.0], [32.0, 48.0]], aspect_ratios=[0.5, 1.0, 2.0])
    generator = build_anchor_generator(config, num_levels=3)
    shapes = [(32, 32), (16, 16), (8, 8)]
    features = [torch.zeros(1, 4, h, w) for h, w in shapes]
    images = ImageList(torch.zeros(1, 1, 128, 128), [(128, 128)])
    anchors = generator(images, features)[0]
    assert generator.num_anchors_per_location() == [6, 6, 6]
    assert len(anchors) == sum(2 * 3 * h * w for h, w in shapes)
    # each level's anchors have the areas of its sizes (8^2, 12^2 on the first) whatever the
    # ratio, up to torchvision's rounding of anchor corners to whole pixels
    first = anchors[: 6 * 32 * 32]
    areas = (first[:, 2] - first[:, 0]) * (first[:, 3] - first[:, 1])
    assert abs(float(areas.mean()) - (64 + 144) / 2) < 10


def test_anchor_levels_must_match_backbone():
    with pytest.raises(ConfigError, match="levels"):
        build_anchor_generator(AnchorConfig(sizes=[[8.0], [16.0]]), num_levels=5)


def test_box_coding_round_trips():
    rpn = small_detector().rpn
    anchors = torch.tensor([[10.0, 10.0, 30.0, 50.0], [0.0, 0.0, 64.0, 64.0], [5.0, 7.0, 9.0, 8.0]])
    boxes = torch.tensor([[12.0, 8.0, 35.0, 47.0], [3.0, 1.0, 50.0, 70.0], [4.0, 6.0, 11.0, 10.0]])
    deltas = rpn.box_coder.encode_single(boxes, anchors)  # dx, dy, dw, dh per anchor
    assert deltas.shape == (3, 4)
    decoded = rpn.box_coder.decode_single(deltas, anchors)
    torch.testing.assert_close(decoded, boxes, atol=1e-4, rtol=0)


def test_proposal_nms_removes_a_duplicate():
    rpn = small_detector().rpn.eval()
    box = torch.tensor([20.0, 20.0, 60.0, 60.0])
    proposals = torch.stack([box, box + 0.5, torch.tensor([100.0, 100.0, 120.0, 120.0])])[None]
    objectness = torch.tensor([[3.0, 2.0, 1.0]])
    boxes, scores = rpn.filter_proposals(proposals, objectness, [(128, 128)], [3])
    assert len(boxes[0]) == 2  # the near-copy of the best box is gone
    torch.testing.assert_close(boxes[0][0], box)


def test_sampler_keeps_its_positive_fraction():
    rpn = small_detector(rpn=RPNConfig(batch_size_per_image=64, positive_fraction=0.25)).rpn
    labels = torch.cat([torch.ones(500), torch.zeros(5000)])  # plenty of both
    positives, negatives = rpn.fg_bg_sampler([labels])
    assert int(positives[0].sum()) == 16 and int(negatives[0].sum()) == 48
    few = torch.cat([torch.ones(3), torch.zeros(5000)])  # too few positives: all kept, rest negative
    positives, negatives = rpn.fg_bg_sampler([few])
    assert int(positives[0].sum()) == 3 and int(negatives[0].sum()) == 61


@pytest.mark.parametrize(
    "name", ["resnet18", "regnet_x_400mf", "regnet_y_400mf", "mobilenet_v3_large", "timm/mobilenetv3_small_100", "timm/convnext_atto"]
)
def test_backbone_takes_one_channel_and_gives_pyramid(name):
    backbone = build_backbone(BackboneConfig(name=name, fpn_channels=16, in_channels=1))
    features = backbone(torch.zeros(1, 1, 64, 64))
    assert [f.shape[1] for f in features.values()] == [16] * 5
    assert [f.shape[-1] for f in features.values()] == [16, 8, 4, 2, 1]  # strides 4 ... 64
    assert all(p.requires_grad for p in backbone.parameters())  # from scratch: everything trains


def test_regnet_stages_are_its_blocks_at_resnet_strides():
    backbone = build_backbone(BackboneConfig(name="regnet_x_400mf", fpn_channels=16, returned_stages=[2, 3, 4]))
    assert [f.shape[-1] for f in backbone(torch.zeros(1, 1, 64, 64)).values()] == [8, 4, 2, 1]  # strides 8 ... 64
    assert [c.in_channels for c in backbone.fpn.inner_blocks.modules() if isinstance(c, torch.nn.Conv2d)] == [64, 160, 400]
    with pytest.raises(ConfigError, match=r"within 1..4 for RegNets, got \[0, 2\]"):
        build_backbone(BackboneConfig(name="regnet_x_400mf", returned_stages=[0, 2]))


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown backbone 'vgg'"):
        build_backbone(BackboneConfig(name="vgg"))
    with pytest.raises(ConfigError, match="timm has no model 'no_such_net'"):
        build_backbone(BackboneConfig(name="timm/no_such_net"))
    with pytest.raises(ConfigError, match=r"timm/convnext_atto has stages \[1, 2, 3, 4\].*not \[5\]"):
        build_backbone(BackboneConfig(name="timm/convnext_atto", returned_stages=[2, 5]))


def test_a_detector_on_a_timm_backbone_trains_and_detects():
    detector = small_detector(backbone=BackboneConfig(name="timm/mobilenetv3_small_100", fpn_channels=32))
    images, targets = _batch()
    detector.train()
    losses = detector(images, targets).losses
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert all(p.grad is not None for n, p in detector.named_parameters() if n.startswith("backbone.body") and p.requires_grad)
    detector.eval()
    with torch.no_grad():
        output = detector(images)
    assert len(output.detections) == 2 and len(output.proposals) == 2


def _batch():
    torch.manual_seed(1)
    images = torch.rand(2, 1, 96, 96) * 0.2
    images[0, 0, 20:44, 30:50] += 0.7  # a bright lesion
    images[1, 0, 60:72, 10:22] += 0.7
    targets = [
        {"boxes": torch.tensor([[30.0, 20.0, 50.0, 44.0]]), "labels": torch.tensor([0])},
        {"boxes": torch.tensor([[10.0, 60.0, 22.0, 72.0]]), "labels": torch.tensor([1])},
    ]
    return images, targets


def test_training_returns_the_four_losses_and_they_go_down_on_a_fixed_batch():
    model = small_detector().train()
    images, targets = _batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(25):
        losses = model(images, targets).losses
        assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(float(loss))
    assert sum(history[-5:]) / 5 < 0.5 * sum(history[:5]) / 5


def test_images_without_lesions_train_and_predict():
    model = small_detector().train()
    images = torch.rand(2, 1, 64, 64)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, [empty, empty]).losses
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    out = small_detector().eval()(images)
    assert len(out.detections) == 2 and len(out.proposals) == 2


def test_eval_gives_detections_with_zero_based_labels_and_ranked_proposals():
    model = small_detector(num_classes=3, roi=RoIConfig(score_thresh=0.0, representation_size=64)).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 1, 96, 96))
    detection = out.detections[0]
    assert set(detection) == {"boxes", "scores", "labels"}
    assert len(detection["boxes"]) > 0
    assert detection["labels"].min() >= 0 and detection["labels"].max() <= 2
    assert out.proposals[0].shape[1] == 4 and len(out.proposals[0]) <= 50


def test_training_without_targets_is_refused():
    with pytest.raises(ValueError, match="targets"):
        small_detector().train()(torch.rand(1, 1, 64, 64))


def test_pretrained_weights_that_cannot_be_fetched_give_a_clear_error(tmp_path, monkeypatch):
    # An empty hub cache and no network (as on CI): the real download is tried and fails.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("no_proxy", "")
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens on the discard port
    with pytest.raises(ConfigError, match="ImageNet weights of resnet18 could not be loaded"):
        build_backbone(BackboneConfig(name="resnet18", pretrained=True))


def test_paired_box_iou_is_the_diagonal_of_torchvisions_matrix():
    from torchvision.ops import box_iou

    from medrpn.model.box_ops import paired_box_iou

    torch.manual_seed(0)
    corners = torch.rand(50, 2, 2) * 100
    boxes = torch.cat([corners.min(dim=1).values, corners.max(dim=1).values + 1], dim=1)
    others = boxes.roll(1, dims=0) + torch.rand(50, 4) * 5
    assert torch.allclose(paired_box_iou(boxes, others), box_iou(boxes, others).diagonal(), atol=1e-6)
    assert paired_box_iou(boxes[:1], torch.tensor([[500.0, 500, 510, 510]])).item() == 0.0


def test_the_commands_load_monai_only_for_the_hard_negative_sampler():
    import subprocess
    import sys

    code = (
        "import sys, medrpn.inference.predict, medrpn.training.lightning_module\n"
        "assert not [m for m in sys.modules if m.startswith('monai')], 'monai imported at start'\n"
        "from medrpn.model import DetectorConfig, RPNConfig, build_detector\n"
        "build_detector(DetectorConfig(num_classes=1, rpn=RPNConfig(sampler='hard_negative')))\n"
        "assert 'monai' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_suppress_contained_drops_a_box_nested_in_a_better_one_that_nms_keeps():
    from torchvision.ops import nms

    from medrpn.model.box_ops import suppress_contained

    # a glioma box, a smaller box inside it (IoU 0.35: NMS at 0.5 keeps both), a box half
    # inside the big one, and one elsewhere
    boxes = torch.tensor([[0.0, 0, 100, 100], [20, 20, 79, 79], [80, 0, 120, 40], [200, 200, 240, 240]])
    scores = torch.tensor([0.95, 0.30, 0.6, 0.5])
    assert sorted(nms(boxes, scores, 0.5).tolist()) == [0, 1, 2, 3]
    assert suppress_contained(boxes, scores, 0.8).tolist() == [0, 2, 3]  # best first; 2 is half inside
    assert suppress_contained(boxes, scores, 0.5).tolist() == [0, 3]
    # the better box inside a worse large one: the large one goes
    assert suppress_contained(boxes, torch.tensor([0.3, 0.95, 0.6, 0.5]), 0.8).tolist() == [1, 2, 3]
    assert suppress_contained(boxes[:1], scores[:1], 0.8).tolist() == [0]


def test_the_detector_applies_containment_suppression_after_nms():
    detector = small_detector()
    detector.eval()
    images, _ = _batch()
    with torch.no_grad():
        plain = detector(images).detections
        detector.containment_thresh = 0.5
        nested_free = detector(images).detections
    from medrpn.model.box_ops import intersection_over_smaller

    for before, after in zip(plain, nested_free):
        assert len(after["boxes"]) <= len(before["boxes"])
        if len(after["boxes"]) > 1:
            overlap = intersection_over_smaller(after["boxes"]).fill_diagonal_(0)
            assert float(overlap.max()) < 0.5
    assert sum(len(d["boxes"]) for d in nested_free) < sum(len(d["boxes"]) for d in plain)  # untrained: many nested


def test_roi_context_pools_the_enlarged_box_beside_the_box_and_trains():
    from medrpn.model.roi_heads import ContextRoIAlign, enlarge_boxes

    boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0]])
    assert enlarge_boxes(boxes, 2.0).tolist() == [[0.0, 0.0, 40.0, 80.0]]
    model = small_detector(roi=RoIConfig(batch_size_per_image=32, representation_size=64, context_scale=2.0))
    pool = model.roi_heads.box_roi_pool
    assert isinstance(pool, ContextRoIAlign)
    # the head takes twice the channels: the box's grid and the enlarged box's grid
    plain = small_detector()
    assert model.roi_heads.box_head.fc6.in_features == 2 * plain.roi_heads.box_head.fc6.in_features
    features = {"0": torch.arange(64.0).reshape(1, 1, 8, 8)}
    from torchvision.ops import MultiScaleRoIAlign

    context = ContextRoIAlign(MultiScaleRoIAlign(["0"], output_size=2, sampling_ratio=2), 2.0)
    pooled = context(features, [torch.tensor([[2.0, 2.0, 4.0, 4.0]])], [(8, 8)])
    assert pooled.shape == (1, 2, 2, 2) and not torch.equal(pooled[:, 0], pooled[:, 1])
    images, targets = _batch()
    losses = model.train()(images, targets).losses
    sum(losses.values()).backward()
    assert model.roi_heads.box_head.fc6.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="context_scale"):
        RoIConfig(context_scale=0.5)


def _roi_inputs(num_classes: int = 3):
    """Sampled RoIs as the second stage sees them: class logits, per-class offsets, the RoIs, their
    labels (0 background) and their encoded lesion boxes."""
    generator = torch.Generator().manual_seed(0)
    rois = torch.tensor([[10.0, 10.0, 40.0, 50.0], [20.0, 5.0, 60.0, 30.0], [0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 9.0, 9.0]])
    labels = torch.tensor([1, 2, 0, 0])
    lesions = rois + torch.tensor([[2.0, -3.0, 4.0, 1.0], [-5.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    logits = torch.randn(4, num_classes + 1, generator=generator)
    offsets = 0.1 * torch.randn(4, 4 * (num_classes + 1), generator=generator)
    return logits, offsets, rois, labels, lesions


def test_the_default_box_loss_is_torchvisions_fast_rcnn_loss():
    from torchvision.models.detection.roi_heads import fastrcnn_loss

    heads = small_detector(num_classes=3).roi_heads
    logits, offsets, rois, labels, lesions = _roi_inputs()
    targets = heads.box_coder.encode_single(lesions, rois)
    ours = heads.losses(logits, offsets, rois, labels, targets)
    classifier, box = fastrcnn_loss(logits, offsets, [labels], [targets])
    assert torch.allclose(ours["loss_classifier"], classifier) and torch.allclose(ours["loss_box_reg"], box)


def test_the_giou_box_loss_scores_the_decoded_box_against_its_lesion():
    from torchvision.ops import generalized_box_iou

    heads = small_detector(num_classes=3, roi=RoIConfig(batch_size_per_image=32, representation_size=64, box_loss="giou")).roi_heads
    assert heads.box_weight == 10.0  # mmdetection's weight for GIoU in the second stage
    logits, offsets, rois, labels, lesions = _roi_inputs()
    targets = heads.box_coder.encode_single(lesions, rois)
    exact = offsets.clone().reshape(4, 4, 4)
    exact[[0, 1], [1, 2]] = targets[:2]  # each lesion RoI's own class predicts its box exactly
    assert heads.losses(logits, exact.reshape(4, 16), rois, labels, targets)["loss_box_reg"].abs() < 1e-5
    # zero offsets predict the RoIs themselves: the loss is 10 x sum(1 - GIoU) over the 2 lesion
    # RoIs, divided by all 4 sampled
    zero = heads.losses(logits, torch.zeros(4, 16), rois, labels, targets)["loss_box_reg"]
    giou = generalized_box_iou(rois[:2], lesions[:2]).diagonal()
    assert torch.allclose(zero, 10 * (1 - giou).sum() / 4, atol=1e-4)
    # background RoIs and the other classes' offsets do not count
    moved = exact.clone()
    moved[[2, 3]] += 1.0
    moved[0, 2] += 1.0
    assert heads.losses(logits, moved.reshape(4, 16), rois, labels, targets)["loss_box_reg"].abs() < 1e-5
    images, batch_targets = _batch()
    model = small_detector(roi=RoIConfig(batch_size_per_image=32, representation_size=64, box_loss="giou")).train()
    losses = model(images, batch_targets).losses
    losses["loss_box_reg"].backward()
    assert model.roi_heads.box_predictor.bbox_pred.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="box_loss must be one of smooth_l1, giou"):
        RoIConfig(box_loss="iou")
    with pytest.raises(ConfigError, match="box_loss_weight"):
        RoIConfig(box_loss_weight=0.0)
