"""The one data pipeline of the comparison: medrpn's `LesionDataModule`, configured from the recipe.

Every system is fed from it: the same split file, image size, augmentation and batch size. The
training loader is seeded (shuffle order, DataLoader worker seeds and, through torch's seed, the
augmentation), so every system sees the same batches in the same order; `batch_fingerprint`
lets the report show it.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from medrpn.data.batch import collate_detection
from medrpn.data.datamodule import LesionDataModule

# Recipe data settings that the benchmark sets itself.
_OVERRIDDEN = ("annotations", "image_size", "split", "val_fraction", "test_fraction", "batch_size", "num_workers")


def build_datamodule(
    recipe: dict[str, Any], data: Path, split_file: Path, image_size: int, batch_size: int, num_workers: int
) -> LesionDataModule:
    """The recipe's data module, on `data`, with the benchmark's split file, size and loader settings."""
    settings = {k: v for k, v in (recipe.get("data") or {}).items() if k not in _OVERRIDDEN}
    return LesionDataModule(
        annotations=str(data),
        image_size=image_size,
        split={"file": str(split_file)},
        batch_size=batch_size,
        num_workers=num_workers,
        **settings,
    )


def loader(dm: LesionDataModule, split: str, seed: int, shuffle: bool) -> DataLoader:
    """A loader of `split` from the data module's own dataset and collate function, seeded."""
    return DataLoader(
        dm.dataset(split),
        batch_size=dm.batch_size,
        shuffle=shuffle,
        num_workers=dm.num_workers,
        collate_fn=collate_detection,
        persistent_workers=dm.num_workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def to_device(batch: dict[str, Any], device: torch.device) -> tuple[Tensor, list[dict[str, Tensor]], int]:
    """Images and targets on `device`; boxes under 1 pixel wide or high (left by augmentation at
    an image edge, which torchvision refuses) are dropped for every system alike. Also returns how
    many were dropped."""
    images = batch["images"].to(device, non_blocking=True)
    targets, dropped = [], 0
    for t in batch["targets"]:
        boxes, labels = t["boxes"], t["labels"]
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        dropped += int((~keep).sum())
        targets.append({"boxes": boxes[keep].to(device), "labels": labels[keep].to(device)})
    return images, targets, dropped


def batch_fingerprint(batches: list[dict[str, Any]]) -> str:
    """A short hash of some batches' file names, pixels and boxes (equal fingerprints: equal batches)."""
    digest = hashlib.sha256()
    for batch in batches:
        for meta in batch["meta"]:
            digest.update(Path(meta["path"]).name.encode())
        digest.update(f"{float(batch['images'].double().sum()):.6e}".encode())
        for t in batch["targets"]:
            digest.update(f"{t['boxes'].double().sum().item():.4f}:{t['labels'].tolist()}".encode())
    return digest.hexdigest()[:16]
