"""The 3D parts of the detector that no library has (RoI Align), checked against a hand-computed
crop and against torchvision's 2D RoI Align; and MONAI's 3D anchors, box coder and NMS in medrpn's
box convention."""

from __future__ import annotations

import torch
from torchvision.ops import roi_align

from medrpn.model.roi_align_3d import roi_align_3d


def _ramp(shape=(2, 10, 8, 6)) -> torch.Tensor:
    """(1, C, X, Y, Z) features whose value names its voxel: x + 10 y + 100 z (+ 1000 per channel)."""
    c, x, y, z = shape
    grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in (x, y, z)], indexing="ij")
    base = grid[0] + 10 * grid[1] + 100 * grid[2]
    return torch.stack([base + 1000 * i for i in range(c)])[None]


def test_a_box_on_whole_voxels_pools_exactly_those_voxels():
    features = _ramp()
    box = torch.tensor([[2.0, 1.0, 0.0, 5.0, 4.0, 2.0]])  # voxels x 2..4, y 1..3, z 0..1
    pooled = roi_align_3d(features, [box], output_size=(3, 3, 2), sampling_ratio=1)
    assert torch.allclose(pooled[0], features[0, :, 2:5, 1:4, 0:2], atol=1e-4)


def test_bins_of_a_linear_field_hold_its_value_at_their_centres():
    features = _ramp()
    box = torch.tensor([[1.3, 2.1, 0.7, 7.9, 6.5, 4.9]])
    pooled = roi_align_3d(features, [box], output_size=(4, 2, 3), sampling_ratio=2)
    lo, hi = box[0, :3], box[0, 3:]
    for a in range(4):
        for b in range(2):
            for c in range(3):
                centre = lo + (torch.tensor([a, b, c]) + 0.5) * (hi - lo) / torch.tensor([4, 2, 3]) - 0.5
                expected = centre[0] + 10 * centre[1] + 100 * centre[2]
                assert torch.allclose(pooled[0, 0, a, b, c], expected, atol=1e-4)
                assert torch.allclose(pooled[0, 1, a, b, c], expected + 1000, atol=1e-4)


def test_a_volume_constant_along_z_pools_as_torchvisions_2d_roi_align():
    torch.manual_seed(0)
    plane = torch.rand(1, 3, 16, 12)  # (N, C, X, Y)
    volume = plane[..., None].expand(-1, -1, -1, -1, 4).contiguous()
    boxes_2d = torch.tensor([[2.2, 1.7, 9.4, 8.1], [5.0, 3.0, 13.5, 10.2]])  # x1, y1, x2, y2 inside
    boxes_3d = torch.cat([boxes_2d[:, :2], torch.zeros(2, 1), boxes_2d[:, 2:], torch.full((2, 1), 4.0)], dim=1)
    ours = roi_align_3d(volume, [boxes_3d], output_size=(5, 4, 1), spatial_scale=0.5, sampling_ratio=2)[..., 0]
    theirs = roi_align(plane.transpose(2, 3), [boxes_2d], output_size=(4, 5), spatial_scale=0.5, sampling_ratio=2, aligned=True)
    assert torch.allclose(ours, theirs.transpose(2, 3), atol=1e-5)


def test_boxes_of_several_volumes_come_back_in_batch_order_and_none_is_empty():
    features = torch.cat([_ramp(), _ramp() + 5000])
    one = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0, 1.0]])
    pooled = roi_align_3d(features, [one, torch.zeros(0, 6), ], output_size=(1, 1, 1), sampling_ratio=1)
    assert pooled.shape == (1, 2, 1, 1, 1) and abs(pooled[0, 0].item()) < 1e-4
    pooled = roi_align_3d(features, [torch.zeros(0, 6), one], output_size=(1, 1, 1), sampling_ratio=1)
    assert abs(pooled[0, 0].item() - 5000.0) < 1e-3
    assert roi_align_3d(features, [torch.zeros(0, 6)] * 2, output_size=(2, 2, 2)).shape == (0, 2, 2, 2, 2)


def test_anchors_box_coder_and_nms_work_in_medrpns_3d_box_convention():
    from monai.apps.detection.utils.box_coder import BoxCoder
    from monai.data.box_utils import batched_nms

    from medrpn.model.anchors_3d import CellCentredAnchors

    generator = CellCentredAnchors(sizes=((8,),), aspect_ratios=(((1.0, 0.5),),), indexing="ij")
    images = torch.zeros(1, 1, 32, 24, 16)
    feature = torch.zeros(1, 8, 8, 6, 8)  # stride 4 along x and y, 2 along z
    anchors = generator(images, [feature])[0]
    assert anchors.shape == (8 * 6 * 8, 6)
    extent = anchors[:, 3:] - anchors[:, :3]
    assert torch.allclose(extent, extent[:1].expand_as(extent))
    assert extent[0, 0] == extent[0, 1] and extent[0, 2] < extent[0, 0]  # w:h:d = 1:1:0.5, MONAI rounds the corners
    centres = (anchors[:, :3] + anchors[:, 3:]) / 2
    # anchors follow the feature map's (x, y, z) order, each centred on its cell: feature voxel
    # (1, 2, 3) covers input voxels [4, 8) x [8, 12) x [6, 8), centre (6, 10, 7) in edge coordinates
    # (MONAI 1.3 put it at the cell's corner, 1.6 at i x stride + stride // 2)
    assert torch.allclose(centres[(1 * 6 + 2) * 8 + 3], torch.tensor([6.0, 10.0, 7.0]))
    assert torch.allclose(centres[0], torch.tensor([2.0, 2.0, 1.0]))

    coder = BoxCoder(weights=(1.0,) * 6)
    target = torch.tensor([[3.0, 5.0, 9.0, 13.0, 11.0, 15.0]])
    deltas = coder.encode_single(target, anchors[:1])
    assert deltas.shape == (1, 6) and torch.allclose(coder.decode_single(deltas, anchors[:1]), target, atol=1e-4)

    boxes = torch.tensor([[0, 0, 0, 10, 10, 10], [1, 0, 0, 11, 10, 10], [20, 20, 20, 30, 30, 30]], dtype=torch.float32)
    keep = batched_nms(boxes, torch.tensor([0.9, 0.8, 0.7]), torch.zeros(3, dtype=torch.long), nms_thresh=0.5)
    assert keep.tolist() == [0, 2]  # the second overlaps the first with 3D IoU 0.82


def test_box_ops_measure_3d_boxes_as_monai_does():
    from monai.data.box_utils import box_iou

    from medrpn.model.box_ops import intersection_over_smaller, paired_box_iou, suppress_contained

    boxes = torch.tensor([[0, 0, 0, 10, 10, 10], [2, 2, 2, 6, 6, 6], [5, 0, 0, 15, 10, 4]], dtype=torch.float32)
    others = torch.tensor([[1, 1, 1, 11, 11, 11], [2, 2, 2, 6, 6, 6], [0, 0, 0, 15, 10, 4]], dtype=torch.float32)
    assert torch.allclose(paired_box_iou(boxes, others), box_iou(boxes, others).diagonal())
    assert intersection_over_smaller(boxes)[0, 1] == 1.0  # the second lies inside the first
    assert suppress_contained(boxes, torch.tensor([0.9, 0.5, 0.8]), 0.9).tolist() == [0, 2]
