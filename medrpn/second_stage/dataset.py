"""The crop classifier's training data: a detector's candidates on a split, cropped and labelled.

The detector runs once over the split's images (network-input space, no augmentation); every
candidate it gives is labelled by its overlap with the ground truth (`label_candidates`), the
ambiguous ones are left out, and the rest are cropped. For training, each ground-truth lesion is
added as a crop of its own box too: a young detector finds few lesions well enough to count as
positives, and the classifier must still learn every class. Crops are kept in memory as float16
(a 48 px crop is 4.5 kB).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import TensorDataset

from medrpn.second_stage.candidates import IGNORE, label_candidates, select_candidates
from medrpn.second_stage.crops import crop_patches
from medrpn.second_stage.rescoring import SecondStageSettings


@dataclass
class CropSet:
    """Crops (N, C, S, S) float16 and their labels (N,) int64 (0 background, k + 1 class k)."""

    crops: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def counts(self, num_classes: int) -> list[int]:
        """Crops per label: background first, then each lesion class."""
        return torch.bincount(self.labels, minlength=num_classes + 1).tolist()

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.crops, self.labels)


@torch.inference_mode()
def collect_crops(
    detector: torch.nn.Module, settings: SecondStageSettings, batches: Iterable[dict[str, Any]], add_ground_truth: bool
) -> CropSet:
    """Runs ``detector`` (eval mode) over ``batches`` (the batch format of `medrpn.data.batch`)
    and crops its labelled candidates the way the second stage will at inference.

    Args:
        detector: a `LesionDetector`.
        settings: the candidate source, minimum score and crop geometry.
        batches: e.g. a DataLoader over a split, without augmentation.
        add_ground_truth: add a crop of every lesion's own box (for training).
    """
    device = next(detector.parameters()).device
    crops, labels = [], []
    s = settings
    for batch in batches:
        if len(batch["images"]) == 0:
            continue
        images = batch["images"].to(device)
        candidates = select_candidates(detector(images), s.candidates, s.min_score)
        boxes = []
        for candidate, target in zip(candidates, batch["targets"]):
            gt_boxes, gt_labels = target["boxes"].to(device), target["labels"].to(device)
            label = label_candidates(candidate["boxes"], gt_boxes, gt_labels)
            keep = label != IGNORE
            box, label = candidate["boxes"][keep], label[keep]
            if add_ground_truth:
                box, label = torch.cat([box, gt_boxes.float()]), torch.cat([label, gt_labels.long() + 1])
            boxes.append(box)
            labels.append(label.cpu())
        crops.append(crop_patches(images, boxes, s.crop_size, s.margin, s.min_side).half().cpu())
    if not crops:
        return CropSet(torch.zeros(0, 1, s.crop_size, s.crop_size, dtype=torch.float16), torch.zeros(0, dtype=torch.int64))
    return CropSet(torch.cat(crops), torch.cat(labels))
