"""The batch format: the one contract between the data code and the model.

A sample (one image) is a dict:
    image:  float32 tensor (C, H, W), intensities in [0, 1] (windowed), H = W = image_size
    target: {"boxes": float32 (N, 4) absolute pixel xyxy in the *resized* image,
             "labels": int64 (N,) 0-based lesion class}; N = 0 for an image without lesions
    meta:   {"path": str, "scale": float (resized / original), "original_size": (H, W),
             "spacing": (row, col) millimetres or None, "uids": dict of DICOM UIDs,
             "patient_id": str or None (for patient-level bootstrap; never logged)}

A batch is a dict with "images" (B, C, H, W), "targets" (list of target dicts) and "meta" (list).
A box in the original image is the box in the batch divided by meta["scale"].
"""

from __future__ import annotations

from typing import Any

import torch


def collate_detection(samples: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Stacks samples into a batch; `None` samples (unreadable files, already reported) are dropped."""
    kept = [s for s in samples if s is not None]
    if not kept:
        return {"images": torch.empty(0), "targets": [], "meta": []}
    return {
        "images": torch.stack([s["image"] for s in kept]),
        "targets": [s["target"] for s in kept],
        "meta": [s["meta"] for s in kept],
    }
