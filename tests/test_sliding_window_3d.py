"""Whole scans by windows: a lesion cut by a window's border is found once, whole; one at the
scan's own border is kept; without the border rule the cut pieces would be extra findings. The
detector here is a plain threshold (bright connected voxels of the window it is given), which,
like a model, sees only its window."""

from __future__ import annotations

import numpy as np
import torch

from medrpn.data.mask_boxes import boxes_from_mask
from medrpn.model.sliding_window_3d import detect_by_windows, window_starts, windows


def threshold_detector(crop: torch.Tensor) -> dict[str, torch.Tensor]:
    found = boxes_from_mask((crop[0] > 0.5).numpy().astype(np.uint8))
    return {
        "boxes": torch.as_tensor(found.boxes),
        "scores": torch.as_tensor(found.voxels, dtype=torch.float32) / 1000,
        "labels": torch.zeros(len(found.boxes), dtype=torch.int64),
    }


def _scan() -> tuple[torch.Tensor, list[list[float]]]:
    volume = torch.zeros(1, 64, 64, 32)
    lesions = [[28, 10, 4, 36, 16, 9], [0, 40, 20, 6, 46, 26], [44, 44, 12, 50, 50, 18]]  # cut at x = 32; at the scan's edge; inside
    for x1, y1, z1, x2, y2, z2 in lesions:
        volume[0, x1:x2, y1:y2, z1:z2] = 1.0
    return volume, lesions


def test_window_positions_cover_the_scan_and_end_at_its_border():
    assert window_starts(64, 32, 0.5) == [0, 16, 32]
    assert window_starts(70, 32, 0.5) == [0, 16, 32, 38]
    assert window_starts(20, 32, 0.5) == [0]
    assert len(windows((64, 64, 32), (32, 32, 16), 0.5)) == 3 * 3 * 3


def test_a_lesion_cut_by_a_window_border_is_found_once_and_whole():
    volume, lesions = _scan()
    found = detect_by_windows(threshold_detector, volume, window=(32, 32, 16), overlap=0.5)
    assert sorted(found["boxes"].tolist()) == sorted(lesions)


def test_without_the_border_rule_the_cut_pieces_are_extra_findings():
    volume, lesions = _scan()
    found = detect_by_windows(threshold_detector, volume, window=(32, 32, 16), overlap=0.5, border_margin=-1.0)
    assert len(found["boxes"]) > len(lesions)


def test_a_scan_smaller_than_the_window_is_one_window():
    volume, lesions = _scan()
    found = detect_by_windows(threshold_detector, volume, window=(128, 128, 64))
    assert sorted(found["boxes"].tolist()) == sorted(lesions)


def test_proposals_are_merged_like_findings_best_first():
    """Proposals (here the bright components, scored by size) come out once per lesion, whole, in
    scan voxels, best first, whatever class the findings had."""
    volume, lesions = _scan()

    def with_proposals(crop: torch.Tensor) -> dict[str, torch.Tensor]:
        found = threshold_detector(crop)
        return {**found, "labels": torch.arange(len(found["boxes"])), "proposals": found["boxes"], "proposal_scores": found["scores"]}

    merged = detect_by_windows(with_proposals, volume, window=(32, 32, 16), overlap=0.5)
    assert sorted(merged["proposals"].tolist()) == sorted(lesions)
    assert (merged["proposal_scores"][:-1] >= merged["proposal_scores"][1:]).all()
    assert "proposals" not in detect_by_windows(threshold_detector, volume, window=(32, 32, 16))
