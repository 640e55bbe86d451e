"""IoU-aware scoring of the second stage: the score formula, the IoU loss, and the detector
training and detecting with it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_model import _batch, _roi_inputs, small_detector
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import box_iou

from medrpn.errors import ConfigError
from medrpn.model import RoIConfig
from medrpn.model.detector_3d import Detector3DConfig, build_detector_3d
from medrpn.model.iou_aware_scoring import IoUAwareBoxPredictor, best_overlaps, iou_aware_logits, iou_loss, iou_targets


def test_the_scores_are_the_class_share_of_the_lesion_confidence_times_the_predicted_iou():
    class_logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, 0.5, -1.0], [0.0, 2.0, 1.0]])
    iou_logits = torch.tensor([1.5, -0.5, -2.0])
    scores = iou_aware_logits(class_logits, iou_logits, alpha=0.5).softmax(-1)
    p = class_logits.softmax(-1)
    lesion = p[:, 1:].sum(1, keepdim=True)
    q = iou_logits.sigmoid().unsqueeze(1)
    assert torch.allclose(scores[:, 1:], p[:, 1:] * (q / lesion) ** 0.5, atol=1e-6)
    # per RoI, all classes together score the lesion confidence P^(1 - alpha) * IoU^alpha, at most 1
    assert torch.allclose(scores[:, 1:].sum(1), (lesion**0.5 * q**0.5).squeeze(1), atol=1e-6)
    assert torch.allclose(scores.sum(1), torch.ones(3), atol=1e-6)
    # the same class probabilities with a worse predicted fit rank lower; the classes keep their order
    assert (scores[2, 1:] < scores[0, 1:]).all() and scores[0, 1] > scores[0, 2]
    # where the predicted IoU equals the lesion probability, the scores are the class probabilities
    fitting = torch.logit(lesion.squeeze(1))
    assert torch.allclose(iou_aware_logits(class_logits, fitting, alpha=0.5).softmax(-1), p, atol=1e-5)


def test_lesion_rois_learn_their_refined_boxs_iou_and_background_rois_their_best_overlap():
    positive = torch.tensor([True, False, True])
    predicted = torch.tensor([[10.0, 10.0, 30.0, 30.0], [0.0, 0.0, 10.0, 10.0]])
    lesions = torch.tensor([[10.0, 10.0, 30.0, 40.0], [5.0, 0.0, 15.0, 10.0]])
    overlaps = torch.tensor([0.9, 0.2, 0.6])  # the lesion RoIs' own are not used
    targets = iou_targets(positive, predicted, lesions, overlaps)
    assert torch.allclose(targets, torch.tensor([400 / 600, 0.2, 50 / 150]))
    at_target = torch.logit(targets).requires_grad_()
    loss = iou_loss(at_target, targets)
    loss.backward()
    assert at_target.grad.abs().max() < 1e-6
    assert iou_loss(torch.logit(targets) + 0.5, targets) > loss
    rois = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]]), torch.tensor([[0.0, 0.0, 5.0, 5.0]])]
    image_lesions = [torch.tensor([[0.0, 0.0, 10.0, 20.0], [100.0, 100.0, 110.0, 110.0]]), torch.zeros(0, 4)]
    assert torch.allclose(best_overlaps(rois, image_lesions), torch.tensor([0.5, 0.0, 0.0]))


def test_the_heads_train_the_iou_of_every_sampled_roi():
    heads = small_detector(num_classes=3, roi=RoIConfig(batch_size_per_image=32, representation_size=64, iou_aware=0.5)).roi_heads
    assert isinstance(heads.box_predictor, IoUAwareBoxPredictor)
    logits, offsets, rois, labels, lesions = _roi_inputs()
    targets = heads.box_coder.encode_single(lesions, rois)
    iou_logits = torch.tensor([0.3, -0.2, 1.0, -5.0])
    overlaps = torch.tensor([0.8, 0.7, 0.3, 0.0])
    losses = heads.losses(logits, offsets, rois, labels, targets, iou_logits, overlaps)
    refined = heads.box_coder.decode_single(offsets.reshape(4, 4, 4)[[0, 1], [1, 2]], rois[:2])
    expected_targets = torch.cat([box_iou(refined, lesions[:2]).diagonal(), overlaps[2:]])
    expected = F.binary_cross_entropy_with_logits(iou_logits, expected_targets)
    assert torch.allclose(losses["loss_box_iou"], expected)
    # without IoU logits the losses are the plain ones
    assert set(heads.losses(logits, offsets, rois, labels, targets)) == {"loss_classifier", "loss_box_reg"}


def test_a_detector_with_iou_aware_scoring_trains_the_iou_and_scores_with_it():
    model = small_detector(roi=RoIConfig(batch_size_per_image=32, representation_size=64, iou_aware=0.5)).train()
    images, targets = _batch()
    losses = model(images, targets).losses
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_box_iou"}
    losses["loss_box_iou"].backward()
    assert model.roi_heads.box_predictor.iou_pred.weight.grad.abs().sum() > 0
    # an IoU prediction of 1 everywhere (alpha 1) scores every detection by its class's share of
    # the lesion probability: the same boxes as the plain detector's, with higher scores
    predictor = model.roi_heads.box_predictor
    with torch.no_grad():
        predictor.iou_pred.weight.zero_()
        predictor.iou_pred.bias.fill_(30.0)
    model.roi_heads.iou_alpha = 1.0
    model.eval()
    with torch.no_grad():
        aware = model(images).detections
        # torchvision's own predictor and post-processing on the same weights
        model.roi_heads.box_predictor = FastRCNNPredictor(64, 3)
        model.roi_heads.box_predictor.load_state_dict(predictor.state_dict(), strict=False)
        model.roi_heads.iou_alpha = None
        plain = model(images).detections
    for a, p in zip(aware, plain):
        assert len(a["boxes"]) >= len(p["boxes"]) > 0
        assert ((a["scores"] >= 0) & (a["scores"] <= 1 + 1e-6)).all()
        assert a["scores"].max() >= p["scores"].max() - 1e-6


def test_iou_aware_settings_are_checked():
    with pytest.raises(ConfigError, match="iou_aware must be a weight in"):
        RoIConfig(iou_aware=1.5)
    with pytest.raises(ConfigError, match="cannot be combined"):
        RoIConfig(iou_aware=0.5, cascade_iou=[0.5, 0.6])
    with pytest.raises(ConfigError, match="2D only"):
        build_detector_3d(Detector3DConfig(num_classes=1, roi=RoIConfig(iou_aware=0.5)))


def test_iou_aware_scoring_is_a_setting_of_the_weights_shape_and_its_loss_is_trained():
    """A checkpoint with the IoU branch only fits a model with it (validate/predict take the
    setting from the checkpoint), and the training step sums the IoU loss with the others."""
    from medrpn.training.lightning_module import _SHAPE_FIELDS, LesionDetectionModule

    assert "iou_aware" in _SHAPE_FIELDS["roi"]
    module = LesionDetectionModule(class_names=["a", "b"], roi={"iou_aware": 0.5})
    assert isinstance(module.model.roi_heads.box_predictor, IoUAwareBoxPredictor)
    assert "loss_box_iou" in module.loss_names
    assert "loss_box_iou" not in LesionDetectionModule(class_names=["a", "b"]).loss_names
