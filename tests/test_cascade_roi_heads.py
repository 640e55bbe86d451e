"""The cascade second stage (`model.roi.cascade_iou`): stages, refinement, averaged scores, training."""

from __future__ import annotations

import pytest
import torch
from test_model import _batch, small_detector
from torchvision.models.detection._utils import BoxCoder

from medrpn.errors import ConfigError
from medrpn.model import RoIConfig
from medrpn.model.cascade_roi_heads import CascadeRoIHeads, stage_box_weights, stage_loss_weight
from medrpn.model.detector_3d import Detector3DConfig, build_detector_3d

CASCADE = RoIConfig(batch_size_per_image=32, representation_size=64, cascade_iou=[0.5, 0.6, 0.7])


def _cascade_detector(num_classes: int = 2) -> torch.nn.Module:
    detector = small_detector(num_classes=num_classes, roi=CASCADE).eval()
    assert isinstance(detector.roi_heads, CascadeRoIHeads)
    return detector


def _features_and_proposals(detector):
    """The detector's pyramid on an image, and three proposals that do not overlap."""
    with torch.no_grad():
        features = detector.backbone(_batch()[0][:1])
    proposals = [torch.tensor([[4.0, 4.0, 20.0, 24.0], [30.0, 10.0, 50.0, 40.0], [8.0, 56.0, 28.0, 80.0]])]
    return features, proposals, [(96, 96)]


def _zero_boxes(heads: CascadeRoIHeads) -> None:
    for stage in heads.stages:
        torch.nn.init.zeros_(stage.box_predictor.bbox_pred.weight)
        torch.nn.init.zeros_(stage.box_predictor.bbox_pred.bias)


def test_each_stage_matches_at_its_own_iou_and_codes_boxes_finer():
    heads = _cascade_detector().roi_heads
    assert [s.proposal_matcher.high_threshold for s in heads.stages] == [0.5, 0.6, 0.7]
    assert [s.proposal_matcher.low_threshold for s in heads.stages] == [0.5, 0.6, 0.7]
    assert [s.box_coder.weights for s in heads.stages] == [(10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15)]
    assert stage_box_weights(1) == (20.0, 20.0, 10.0, 10.0)
    assert [stage_loss_weight(i) for i in range(4)] == [1.0, 0.5, 0.25, 0.125]
    # one class-agnostic box per RoI, class scores with background
    assert [s.box_predictor.bbox_pred.out_features for s in heads.stages] == [4, 4, 4]
    assert heads.stages[0].box_predictor.cls_score.out_features == 3


def test_scores_are_the_stages_averaged_probabilities_and_boxes_stay_without_offsets():
    detector = _cascade_detector()
    heads = detector.roi_heads
    heads.stages[-1].score_thresh = 0.0
    _zero_boxes(heads)
    features, proposals, shapes = _features_and_proposals(detector)
    with torch.no_grad():
        detections = heads(features, proposals, shapes)[0][0]
        pooled = heads.box_roi_pool(features, proposals, shapes)
        expected = torch.stack([s.box_predictor(s.box_head(pooled))[0].softmax(-1) for s in heads.stages]).mean(0)
    # every proposal and lesion class comes out (no NMS overlap among these three boxes) with the
    # mean of the three stages' probabilities, on the proposal's own box
    assert len(detections["boxes"]) == 6
    for box, score, label in zip(detections["boxes"], detections["scores"], detections["labels"]):
        row = int((proposals[0] == box).all(dim=1).nonzero())
        assert torch.isclose(score, expected[row, label], atol=1e-6)


def test_each_stage_pools_the_box_the_stage_before_refined():
    detector = _cascade_detector()
    heads = detector.roi_heads
    heads.stages[-1].score_thresh = 0.0
    _zero_boxes(heads)
    # the first stage moves every box right by 0.1 of its width (dx 0.1 at the coder's weight 10)
    with torch.no_grad():
        heads.stages[0].box_predictor.bbox_pred.bias[0] = 1.0
    features, proposals, shapes = _features_and_proposals(detector)
    with torch.no_grad():
        boxes = heads(features, proposals, shapes)[0][0]["boxes"]
    widths = proposals[0][:, 2] - proposals[0][:, 0]
    moved = proposals[0] + torch.stack([0.1 * widths, torch.zeros(3), 0.1 * widths, torch.zeros(3)], dim=1)
    for box in boxes:
        assert torch.isclose(moved, box, atol=1e-4).all(dim=1).any()
    assert BoxCoder(stage_box_weights(0)).decode_single(torch.tensor([[1.0, 0, 0, 0]]), proposals[0][:1]).allclose(moved[:1])


def test_a_cascade_detector_trains_every_stage_and_only_the_first_trains_the_backbone_through_pooling():
    model = small_detector(num_classes=2, roi=CASCADE).train()
    images, targets = _batch()
    losses = model(images, targets).losses
    assert set(losses) == {"loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    (losses["loss_classifier"] + losses["loss_box_reg"]).backward()
    for stage in model.roi_heads.stages:
        assert stage.box_head.fc6.weight.grad.abs().sum() > 0
    # later stages read detached features: with the first stage's head blind to its input
    # (zero weights), the stages' losses send nothing back into the pyramid
    model.zero_grad()
    heads = model.roi_heads
    torch.nn.init.zeros_(heads.stages[0].box_head.fc6.weight)
    features = {k: v.detach().requires_grad_(True) for k, v in model.backbone(images).items()}
    internal = [{"boxes": t["boxes"], "labels": t["labels"] + 1} for t in targets]
    proposals = [torch.cat([t["boxes"] + 1.0, t["boxes"] - 2.0]) for t in targets]
    stage_losses = heads._losses(features, proposals, [(96, 96)] * len(images), internal)
    sum(stage_losses.values()).backward()
    assert heads.stages[1].box_head.fc6.weight.grad.abs().sum() > 0
    assert all(f.grad is None or float(f.grad.abs().sum()) == 0.0 for f in features.values())


def test_cascade_settings_are_checked():
    for bad in ([0.5], [0.6, 0.5], [0.5, 1.2]):
        with pytest.raises(ConfigError, match="cascade_iou"):
            RoIConfig(cascade_iou=bad)
    with pytest.raises(ConfigError, match="2D only"):
        build_detector_3d(Detector3DConfig(num_classes=1, roi=RoIConfig(cascade_iou=[0.5, 0.6])))


def test_the_cascade_is_a_setting_of_the_weights_shape():
    """A checkpoint of a cascade only fits a cascade of the same stages: validate/predict take the
    setting from the checkpoint, as for the head's other shape settings."""
    from medrpn.training.lightning_module import _SHAPE_FIELDS, LesionDetectionModule

    assert "cascade_iou" in _SHAPE_FIELDS["roi"]
    module = LesionDetectionModule(class_names=["a", "b"], roi={"cascade_iou": [0.5, 0.6, 0.7]})
    assert isinstance(module.model.roi_heads, CascadeRoIHeads) and len(module.model.roi_heads.stages) == 3
    with pytest.raises(ConfigError, match="cascade_iou"):
        LesionDetectionModule(class_names=["a"], roi={"cascade_iou": [0.7, 0.5]})
