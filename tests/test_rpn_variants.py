"""The RPN's design choices (objectness, sampler, levels without anchors), each checked for real."""

from __future__ import annotations

import itertools
from collections import OrderedDict

import pytest
import torch
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import box_iou

from medrpn.errors import ConfigError
from medrpn.model import AnchorConfig, BackboneConfig, DetectorConfig, RoIConfig, RPNConfig, build_detector
from medrpn.model.anchors import build_anchor_generator
from medrpn.model.rpn import build_rpn
from medrpn.model.rpn_losses import focal_losses, object_logit, quality_focal_losses, regressed_iou

BOX = torch.tensor([[24.0, 20.0, 40.0, 36.0]])




def tiny_detector(anchors: AnchorConfig | None = None, **rpn) -> torch.nn.Module:
    """resnet18 stages 1-3 (+ pooled level), 32-channel FPN: four pyramid levels."""
    torch.manual_seed(0)
    rpn_config = dict(batch_size_per_image=64, pre_nms_top_n_train=100, post_nms_top_n_train=50)
    rpn_config.update(pre_nms_top_n_test=100, post_nms_top_n_test=20, **rpn)
    config = DetectorConfig(
        num_classes=1,
        backbone=BackboneConfig(name="resnet18", fpn_channels=32, returned_stages=[1, 2, 3]),
        anchors=anchors or AnchorConfig(sizes=[[8.0], [16.0], [32.0], [64.0]]),
        rpn=RPNConfig(**rpn_config),
        roi=RoIConfig(batch_size_per_image=16, representation_size=32),
    )
    return build_detector(config)


def lesion_batch() -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(1)
    images = torch.rand(2, 1, 64, 64) * 0.2
    images[:, 0, 20:36, 24:40] += 0.7  # the same bright 16 x 16 lesion in both images
    return images, [{"boxes": BOX, "labels": torch.tensor([0])}] * 2


VARIANTS = list(itertools.product(["sigmoid", "softmax"], ["balanced", "hard_negative", "focal", "quality_focal"]))


@pytest.mark.parametrize("objectness, sampler", VARIANTS)
def test_every_variant_learns_to_find_the_lesion(objectness, sampler):
    model = tiny_detector(objectness=objectness, sampler=sampler).train()
    images, targets = lesion_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(20):
        losses = model(images, targets).losses
        assert {"loss_objectness", "loss_rpn_box_reg"} <= set(losses)
        loss = losses["loss_objectness"] + losses["loss_rpn_box_reg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    assert sum(history[-3:]) < 0.3 * sum(history[:3])

    with torch.no_grad():
        out = model.eval()(images[:1])
    proposals, scores = out.proposals[0], out.proposal_scores[0]
    assert scores.shape == (len(proposals),)
    assert float(scores.min()) >= 0 and float(scores.max()) <= 1
    assert torch.all(scores[:-1] >= scores[1:])  # best first
    iou = box_iou(proposals, BOX)[:, 0]
    assert float(iou[0]) >= 0.3  # the most confident proposal is on the lesion,
    assert float(iou[:3].max()) >= 0.5  # one of the three most confident fits it well
    assert float(scores[0]) > float(scores[iou < 0.1].max())  # and beats everything far from it


def test_defaults_give_exactly_torchvisions_rpn():
    config = RPNConfig(pre_nms_top_n_train=300, post_nms_top_n_train=100, batch_size_per_image=64)
    sizes = [[8.0], [16.0], [32.0], [64.0]]
    torch.manual_seed(0)
    ours = build_rpn(config, build_anchor_generator(AnchorConfig(sizes=sizes), 4), in_channels=8)
    theirs = RegionProposalNetwork(
        AnchorGenerator(sizes=tuple((s[0],) for s in sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 4),
        RPNHead(8, 3),
        fg_iou_thresh=config.fg_iou_thresh,
        bg_iou_thresh=config.bg_iou_thresh,
        batch_size_per_image=config.batch_size_per_image,
        positive_fraction=config.positive_fraction,
        pre_nms_top_n={"training": config.pre_nms_top_n_train, "testing": config.pre_nms_top_n_test},
        post_nms_top_n={"training": config.post_nms_top_n_train, "testing": config.post_nms_top_n_test},
        nms_thresh=config.nms_thresh,
        score_thresh=config.score_thresh,
    )
    with torch.no_grad():  # weights that make clear choices, not the near-zero initial ones
        for p in ours.parameters():
            p.normal_(std=0.3)
    theirs.load_state_dict(ours.state_dict())
    images = ImageList(torch.zeros(2, 1, 64, 64), [(64, 64)] * 2)
    features = OrderedDict((str(i), torch.randn(2, 8, 16 // 2**i, 16 // 2**i)) for i in range(4))
    targets = [{"boxes": BOX}, {"boxes": torch.tensor([[5.0, 6.0, 20.0, 30.0], [40.0, 40.0, 60.0, 62.0]])}]

    ours.eval(), theirs.eval()
    boxes, scores, losses = ours(images, features)
    assert losses == {}
    for mine, reference in zip(boxes, theirs(images, features)[0]):
        assert torch.equal(mine, reference)
    ours.train(), theirs.train()
    torch.manual_seed(5)
    boxes, _, losses = ours(images, features, targets)
    torch.manual_seed(5)  # the same random sample of anchors
    reference_boxes, reference_losses = theirs(images, features, targets)
    assert all(torch.equal(a, b) for a, b in zip(boxes, reference_boxes))
    assert losses.keys() == reference_losses.keys() == {"loss_objectness", "loss_rpn_box_reg"}
    for key in losses:
        assert torch.equal(losses[key], reference_losses[key])


def test_a_training_nms_threshold_applies_in_training_only_as_torchvisions_rpn_with_it():
    """`nms_thresh_train` keeps more overlapping proposals for the second stage to sample from
    while training; at test time the proposals are those of `nms_thresh`, and the attribute flip
    merging reads stays the test-time value."""
    config = RPNConfig(nms_thresh=0.5, nms_thresh_train=0.9, pre_nms_top_n_train=300, post_nms_top_n_train=300)
    sizes = [[8.0], [16.0], [32.0], [64.0]]
    torch.manual_seed(0)
    ours = build_rpn(config, build_anchor_generator(AnchorConfig(sizes=sizes), 4), in_channels=8)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(std=0.3)

    def torchvisions(nms_thresh: float) -> RegionProposalNetwork:
        rpn = RegionProposalNetwork(
            AnchorGenerator(sizes=tuple((s[0],) for s in sizes), aspect_ratios=((0.5, 1.0, 2.0),) * 4),
            RPNHead(8, 3), 0.7, 0.3, 256, 0.5,
            pre_nms_top_n={"training": 300, "testing": config.pre_nms_top_n_test},
            post_nms_top_n={"training": 300, "testing": config.post_nms_top_n_test},
            nms_thresh=nms_thresh,
        )
        rpn.load_state_dict(ours.state_dict())
        return rpn

    images = ImageList(torch.zeros(1, 1, 64, 64), [(64, 64)])
    features = OrderedDict((str(i), torch.randn(1, 8, 16 // 2**i, 16 // 2**i)) for i in range(4))
    targets = [{"boxes": BOX}]
    ours.train()
    trained_on = ours(images, features, targets)[0][0]
    assert ours.nms_thresh == 0.5
    assert torch.equal(trained_on, torchvisions(0.9).train()(images, features, targets)[0][0])
    ours.eval()
    tested_on = ours(images, features)[0][0]
    assert torch.equal(tested_on, torchvisions(0.5).eval()(images, features)[0][0])
    overlaps = box_iou(trained_on, trained_on).fill_diagonal_(0)
    assert float(overlaps.max()) > 0.5  # pairs NMS 0.5 would have suppressed reach the second stage


def test_hard_negative_sampler_takes_the_highest_scoring_negatives():
    rpn = tiny_detector(sampler="hard_negative", batch_size_per_image=20, hard_negative_pool=1).rpn
    torch.manual_seed(3)
    labels = torch.zeros(1000)
    labels[:30] = 1.0
    labels[30:60] = -1.0  # ignored anchors, scored highest of all: never drawn
    probabilities = torch.rand(1000)
    probabilities[30:60] += 2.0
    positives, negatives = rpn.fg_bg_sampler([labels, labels.clone()], torch.cat([probabilities, probabilities]))
    for pos, neg in zip(positives, negatives):
        assert int(pos.sum()) == 10 and bool(labels[pos.bool()].eq(1).all())
        chosen = torch.where(neg.bool())[0]
        negative_scores = probabilities.masked_fill(labels != 0, -1.0)
        assert set(chosen.tolist()) == set(negative_scores.topk(10).indices.tolist())

    wide = tiny_detector(sampler="hard_negative", batch_size_per_image=20, hard_negative_pool=3).rpn
    _, negatives = wide.fg_bg_sampler([labels], probabilities)
    chosen = torch.where(negatives[0].bool())[0]
    pool = set(probabilities.masked_fill(labels != 0, -1.0).topk(30).indices.tolist())
    assert len(chosen) == 10 and set(chosen.tolist()) <= pool  # random, but among the 3 x 10 hardest


def _explicit_focal(p_object: torch.Tensor, labels: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    p_true = torch.where(labels == 1, p_object, 1 - p_object)
    weight = torch.where(labels == 1, torch.tensor(alpha), torch.tensor(1 - alpha))
    return -(weight * (1 - p_true) ** gamma * torch.log(p_true))


def test_focal_loss_counts_every_anchor_but_ignored_ones_and_divides_by_positives():
    torch.manual_seed(4)
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0, 0.0])
    logits, deltas, targets = torch.randn(10, 1), torch.randn(10, 4), torch.randn(10, 4)
    objectness, box = focal_losses(logits, deltas, [labels], [targets], alpha=0.25, gamma=2.0)
    counted = labels >= 0
    expected = _explicit_focal(torch.sigmoid(logits[:, 0])[counted], labels[counted], 0.25, 2.0).sum() / 3
    torch.testing.assert_close(objectness, expected)
    expected_box = torch.nn.functional.smooth_l1_loss(deltas[:3], targets[:3], beta=1 / 9, reduction="sum") / 3
    torch.testing.assert_close(box, expected_box)

    # ignored anchors do not matter; a batch of two copies has the same (per-positive) loss
    moved = logits.clone()
    moved[7:9] += 10.0
    assert torch.equal(focal_losses(moved, deltas, [labels], [targets], 0.25, 2.0)[0], objectness)
    doubled = focal_losses(logits.repeat(2, 1), deltas.repeat(2, 1), [labels, labels], [targets, targets], 0.25, 2.0)
    torch.testing.assert_close(doubled[0], objectness)
    torch.testing.assert_close(doubled[1], box)
    # no positives at all: divided by 1, still finite
    none = focal_losses(logits, deltas, [torch.zeros(10)], [targets], 0.25, 2.0)
    assert torch.isfinite(none[0]) and float(none[1]) == 0.0

    # two softmax scores: the object probability is softmax[1], and the focal loss is the softmax focal form
    scores = torch.randn(10, 2)
    p_object = torch.softmax(scores, dim=1)[:, 1]
    torch.testing.assert_close(torch.sigmoid(object_logit(scores)), p_object)
    softmax_focal = focal_losses(scores, deltas, [labels], [targets], 0.25, 2.0)[0]
    torch.testing.assert_close(softmax_focal, _explicit_focal(p_object[counted], labels[counted], 0.25, 2.0).sum() / 3)


def test_regressed_iou_is_the_iou_of_the_boxes_the_anchors_would_give():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    torch.manual_seed(6)
    corners = torch.rand(40, 2) * 200
    anchors = torch.cat([corners, corners + torch.rand(40, 2) * 60 + 4], dim=1)  # sizes 4-64, any shape
    deltas = torch.randn(40, 4) * 0.4
    target_deltas = deltas + torch.randn(40, 4) * torch.linspace(0.01, 1.0, 40)[:, None]  # near to far
    expected = box_iou(coder.decode_single(deltas, anchors), coder.decode_single(target_deltas, anchors)).diagonal()
    torch.testing.assert_close(regressed_iou(deltas, target_deltas, coder), expected)
    assert float(expected.min()) < 0.3 and float(expected.max()) > 0.7  # a spread, not one value
    torch.testing.assert_close(regressed_iou(deltas, deltas, coder), torch.ones(40))


def test_quality_focal_loss_pulls_each_positive_towards_the_iou_of_its_box():
    coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
    torch.manual_seed(7)
    labels = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    deltas, targets = torch.randn(8, 4) * 0.3, torch.randn(8, 4) * 0.3
    quality = regressed_iou(deltas[:3], targets[:3], coder)
    logits = torch.randn(8, 1, requires_grad=True)
    objectness, box = quality_focal_losses(logits, deltas, [labels], [targets], 2.0, coder)

    p = torch.sigmoid(logits.detach()[:, 0])
    soft = torch.cat([quality, torch.zeros(5)])
    counted = labels >= 0
    bce = -(soft * torch.log(p) + (1 - soft) * torch.log(1 - p))
    expected = (bce * (p - soft).abs() ** 2)[counted].sum() / 3
    torch.testing.assert_close(objectness, expected)
    expected_box = torch.nn.functional.smooth_l1_loss(deltas[:3], targets[:3], beta=1 / 9, reduction="sum") / 3
    torch.testing.assert_close(box, expected_box)

    # the gradient moves each positive's probability towards its IoU: down where it is above,
    # where the focal loss would push every positive up towards 1
    objectness.backward()
    above = p[:3] > quality
    assert bool(above.any()) and bool((~above).any())
    assert torch.equal(logits.grad[:3, 0] > 0, above)
    assert logits.grad[6, 0] == 0  # ignored
    focal_logits = logits.detach().clone().requires_grad_(True)
    focal_losses(focal_logits, deltas, [labels], [targets], 0.25, 2.0)[0].backward()
    assert bool((focal_logits.grad[:3, 0] < 0).all())

    # a positive scored exactly at its IoU, and a negative scored 0, cost nothing
    exact = torch.logit(torch.cat([quality, torch.full((5,), 1e-12)]))[:, None]
    met, _ = quality_focal_losses(exact, deltas, [labels], [targets], 2.0, coder)
    assert float(met) < 1e-6


def test_a_level_without_anchors_is_skipped_by_the_rpn_only():
    model = tiny_detector(AnchorConfig(sizes=[[8.0], [], [32.0], [64.0]])).eval()
    assert model.rpn.levels == [0, 2, 3]
    seen = {}
    model.rpn.head.register_forward_hook(lambda m, args, out: seen.update(head=[f.shape[-1] for f in args[0]]))
    model.rpn.anchor_generator.register_forward_hook(lambda m, args, out: seen.update(anchors=[len(a) for a in out]))
    model.roi_heads.box_roi_pool.register_forward_hook(lambda m, args, out: seen.update(roi=sorted(args[0])))
    with torch.no_grad():
        out = model(torch.rand(2, 1, 64, 64))
    assert seen["head"] == [16, 4, 2]  # levels 0, 2, 3 (level 1 is 8 x 8)
    assert seen["anchors"] == [3 * (16 * 16 + 4 * 4 + 2 * 2)] * 2  # 3 ratios x positions of carrying levels
    assert seen["roi"] == ["0", "1", "2", "pool"]  # the second stage still sees every level
    assert len(out.proposal_scores) == 2

    losses = tiny_detector(AnchorConfig(sizes=[[8.0], [], [32.0], [64.0]])).train()(*lesion_batch()).losses
    assert all(torch.isfinite(v) for v in losses.values())


def test_carrying_levels_must_share_their_anchor_count():
    with pytest.raises(ConfigError, match=r"level 0: 6, level 2: 3, level 3: 3"):
        tiny_detector(AnchorConfig(sizes=[[8.0, 12.0], [], [32.0], [64.0]]))
    with pytest.raises(ConfigError, match="at least one level"):
        build_anchor_generator(AnchorConfig(sizes=[[], [], [], []]), 4)


@pytest.mark.parametrize(
    "setting, message",
    [
        (dict(objectness="logistic"), "rpn.objectness: 'logistic' is not one of 'sigmoid', 'softmax'"),
        (dict(sampler="ohem"), "rpn.sampler: 'ohem' is not one of 'balanced', 'hard_negative', 'focal'"),
        (dict(hard_negative_pool=0.5), "rpn.hard_negative_pool"),
        (dict(focal_alpha=1.5), "rpn.focal_alpha"),
        (dict(focal_gamma=-1.0), "rpn.focal_gamma"),
        (dict(nms_thresh=0.0), r"rpn.nms_thresh must be an IoU in \(0, 1\], got 0.0"),
        (dict(nms_thresh=1.5), "rpn.nms_thresh"),
        (dict(nms_thresh_train=0.0), r"rpn.nms_thresh_train must be an IoU in \(0, 1\] or null, got 0.0"),
        (dict(post_nms_top_n_test=0), "rpn.post_nms_top_n_test must be at least 1"),
        (dict(pre_nms_top_n_train=-5), "rpn.pre_nms_top_n_train"),
        (dict(score_thresh=1.0), "rpn.score_thresh"),
    ],
)
def test_invalid_settings_are_config_errors(setting, message):
    with pytest.raises(ConfigError, match=message):
        build_rpn(RPNConfig(**setting), build_anchor_generator(AnchorConfig(), 5), in_channels=8)
