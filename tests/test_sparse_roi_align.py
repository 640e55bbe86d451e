"""The second stage's RoI Align in training on the CPU (one sparse matrix product) against
torchvision's own `MultiScaleRoIAlign`, and against values worked out by hand."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import MultiScaleRoIAlign

from medrpn.model.roi_heads import ContextRoIAlign, RoIConfig, build_roi_heads
from medrpn.model.sparse_roi_align import SparseMultiScaleRoIAlign

NAMES = ["0", "1", "2", "3"]


def _pyramid(batch: int = 3, size: int = 256, channels: int = 5) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {n: torch.randn(batch, channels, size // 4 >> i, size // 4 >> i, requires_grad=True) for i, n in enumerate(NAMES)}


def _boxes(size: int = 256) -> list[torch.Tensor]:
    """Boxes of every pyramid level, one under a pixel wide, some reaching past the image (as
    `ContextRoIAlign`'s enlarged boxes do), one image with none."""
    torch.manual_seed(1)
    side = 0.5 + torch.rand(40, 2) * size
    corner = torch.rand(40, 2) * size - side / 3
    drawn = torch.cat([corner, corner + side], 1)
    edges = torch.tensor([
        [0.0, 0.0, size, size], [size - 3.0, size - 3.0, size, size], [-20.0, -20.0, 10.0, 10.0], [60.0, 60.0, 60.4, 60.2],
        [-size, -size, 2.0 * size, 2.0 * size],  # larger than the image: the coarsest level
    ])
    return [torch.cat([drawn[:25], edges]), torch.zeros(0, 4), drawn[25:]]


@pytest.mark.parametrize("output_size, sampling_ratio", [(7, 2), ((5, 3), 1), (4, 3)])
def test_training_pool_gives_torchvisions_values_and_gradients(output_size, sampling_ratio):
    features, boxes, shapes = _pyramid(), _boxes(), [(256, 256)] * 3
    ours = SparseMultiScaleRoIAlign(NAMES, output_size, sampling_ratio)(features, boxes, shapes)
    theirs = MultiScaleRoIAlign(NAMES, output_size, sampling_ratio)(features, boxes, shapes)
    assert ours.shape == theirs.shape == (sum(len(b) for b in boxes), 5, *((output_size,) * 2 if isinstance(output_size, int) else output_size))
    assert torch.allclose(ours, theirs, atol=1e-5)
    weights = torch.randn_like(theirs)
    our_grads = torch.autograd.grad((ours * weights).sum(), list(features.values()))
    their_grads = torch.autograd.grad((theirs * weights).sum(), list(features.values()))
    for level, (a, b) in enumerate(zip(our_grads, their_grads)):
        assert b.abs().sum() > 0, level  # every level pooled some box
        assert torch.allclose(a, b, atol=1e-5), level


def test_a_bin_averages_its_samples_as_worked_out_by_hand():
    """On a feature map that rises by 1 per column, bilinear samples read their own x, so bin j of
    a box from x1 to x2 reads the mean of its samples' x: x1 + (j + 1/2) (x2 - x1) / bins."""
    ramp = torch.arange(16.0).repeat(16, 1)[None, None].repeat(1, 2, 1, 1).requires_grad_()
    pool = SparseMultiScaleRoIAlign(["0"], 4, 2)
    box = torch.tensor([[2.0, 3.0, 10.0, 11.0]])
    pooled = pool({"0": ramp}, [box], [(16, 16)])
    assert pooled.shape == (1, 2, 4, 4)
    expected = 2.0 + (torch.arange(4.0) + 0.5) * 8.0 / 4
    assert torch.allclose(pooled[0, 0], expected.expand(4, 4), atol=1e-6)
    assert torch.allclose(pooled[0, 1], pooled[0, 0])
    # and each bin's weights sum to one: the gradient of the sum is 16 (bins) per channel
    (grad,) = torch.autograd.grad(pooled.sum(), ramp)
    assert grad[0, 0].sum().item() == pytest.approx(16.0)


def test_without_gradients_the_pool_is_torchvisions_own():
    features, boxes, shapes = _pyramid(), _boxes(), [(256, 256)] * 3
    with torch.no_grad():
        ours = SparseMultiScaleRoIAlign(NAMES, 7, 2)(features, boxes, shapes)
        theirs = MultiScaleRoIAlign(NAMES, 7, 2)(features, boxes, shapes)
    assert torch.equal(ours, theirs)


def test_no_boxes_at_all_pools_nothing():
    features = _pyramid()
    pooled = SparseMultiScaleRoIAlign(NAMES, 7, 2)(features, [torch.zeros(0, 4)] * 3, [(256, 256)] * 3)
    assert pooled.shape == (0, 5, 7, 7)


@pytest.mark.parametrize("context_scale", [None, 2.0])
def test_the_second_stage_pools_with_it(context_scale):
    heads = build_roi_heads(RoIConfig(context_scale=context_scale), NAMES, in_channels=5, num_classes=2)
    pool = heads.box_roi_pool.pool if isinstance(heads.box_roi_pool, ContextRoIAlign) else heads.box_roi_pool
    assert isinstance(pool, SparseMultiScaleRoIAlign)
