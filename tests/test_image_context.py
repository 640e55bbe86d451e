"""The second stage reading each proposal's place in its image and the image's mean feature
(`model.roi.image_context`): what the head is given, training and detecting with it, its
checkpoint (its ONNX export: tests/test_export.py)."""

from __future__ import annotations

import pytest
import torch
from test_model import SMALL, _batch, small_detector
from torchvision.ops import MultiScaleRoIAlign

from medrpn.errors import ConfigError
from medrpn.model import RoIConfig
from medrpn.model.detector_3d import Detector3DConfig, build_detector_3d
from medrpn.model.roi_heads import ImageContextRoIAlign, build_roi_heads


def test_the_head_is_given_the_grid_then_the_box_as_fractions_of_its_image_then_the_images_mean_feature():
    torch.manual_seed(0)
    features = {"0": torch.rand(2, 3, 16, 16), "1": torch.rand(2, 3, 8, 8)}
    pool = MultiScaleRoIAlign(["0", "1"], output_size=2, sampling_ratio=2)
    proposals = [torch.tensor([[8.0, 4.0, 40.0, 20.0], [0.0, 0.0, 64.0, 64.0]]), torch.tensor([[10.0, 30.0, 20.0, 60.0]])]
    shapes = [(64, 64), (64, 40)]  # (height, width): the second image is narrower
    out = ImageContextRoIAlign(pool, "1")(features, proposals, shapes)
    assert out.shape == (3, 3 * 2 * 2 + 4 + 3)
    assert torch.equal(out[:, :12], pool(features, proposals, shapes).flatten(1))
    assert torch.allclose(out[:, 12:16], torch.tensor([[0.125, 0.0625, 0.625, 0.3125], [0, 0, 1, 1], [0.25, 30 / 64, 0.5, 60 / 64]]))
    means = features["1"].mean(dim=(2, 3))
    assert torch.allclose(out[:, 16:], means[[0, 0, 1]])
    # an image without proposals adds no rows and shifts no other image's context
    empty = ImageContextRoIAlign(pool, "1")(features, [torch.zeros(0, 4), proposals[1]], shapes)
    assert empty.shape == (1, 19) and torch.allclose(empty[:, 16:], means[[1]])


def test_a_detector_with_image_context_trains_the_head_on_it_and_detects():
    plain = small_detector()
    model = small_detector(roi=RoIConfig(batch_size_per_image=32, representation_size=64, image_context=True))
    assert isinstance(model.roi_heads.box_roi_pool, ImageContextRoIAlign)
    channels = SMALL["backbone"].fpn_channels
    assert model.roi_heads.box_head.fc6.in_features == plain.roi_heads.box_head.fc6.in_features + 4 + channels
    images, targets = _batch()
    losses = model.train()(images, targets).losses
    sum(losses.values()).backward()
    context_weights = model.roi_heads.box_head.fc6.weight.grad[:, -(4 + channels) :]
    assert context_weights[:, :4].abs().sum() > 0 and context_weights[:, 4:].abs().sum() > 0
    # the image's mean feature sends gradients back into the pyramid level it is taken from
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.fpn.layer_blocks[-1].parameters())
    with torch.no_grad():
        detections = model.eval()(images).detections
    assert len(detections) == 2 and all(len(d["boxes"]) > 0 for d in detections)  # untrained: scores near uniform


@pytest.mark.parametrize("other", [{"context_scale": 2.0}, {"cascade_iou": [0.5, 0.6]}, {"iou_aware": 0.5}])
def test_image_context_combines_with_the_other_second_stage_settings(other):
    heads = build_roi_heads(RoIConfig(representation_size=16, image_context=True, **other), ["0", "1"], in_channels=4, num_classes=2)
    features = {"0": torch.rand(1, 4, 16, 16), "1": torch.rand(1, 4, 8, 8)}
    proposals = [torch.tensor([[4.0, 4.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]])]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 38.0]]), "labels": torch.tensor([1])}]
    losses = heads.train()(features, proposals, [(64, 64)], targets)[1]
    assert losses and all(torch.isfinite(v) for v in losses.values())
    detections = heads.eval()(features, proposals, [(64, 64)])[0]
    assert len(detections) == 1 and set(detections[0]) >= {"boxes", "scores", "labels"}


def test_image_context_is_a_setting_of_the_weights_shape_and_2d_only():
    from medrpn.training.lightning_module import _SHAPE_FIELDS, LesionDetectionModule

    assert "image_context" in _SHAPE_FIELDS["roi"]
    module = LesionDetectionModule(class_names=["a", "b"], roi={"image_context": True})
    assert isinstance(module.model.roi_heads.box_roi_pool, ImageContextRoIAlign)
    with pytest.raises(ConfigError, match="2D only"):
        build_detector_3d(Detector3DConfig(num_classes=1, roi=RoIConfig(image_context=True)))
