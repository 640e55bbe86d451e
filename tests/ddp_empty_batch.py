"""A 2-process DDP fit (CPU, gloo) in which every batch of rank 1 is one unreadable file.

Run by tests/test_ddp.py as `python tests/ddp_empty_batch.py GOOD_IMAGE MISSING_IMAGE ROOT`
(Lightning's launcher starts rank 1 by running the same command again). Each rank prints the sum
of its weights after the fit: ranks in step hold the same weights.
"""

from __future__ import annotations

import sys
from datetime import timedelta

import lightning as L
import numpy as np
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader

from medrpn.data.batch import collate_detection
from medrpn.data.dataset import DetectionDataset
from medrpn.data.records import Record
from medrpn.data.transforms import build_transform
from medrpn.training.lightning_module import LesionDetectionModule
from support import SIZE, TINY

STEPS = 2


def main(good: str, missing: str, root: str) -> None:
    torch.set_num_threads(1)
    box, label = np.array([[16.0, 16.0, 40.0, 40.0]]), np.array([0])
    # the distributed sampler (no shuffling) deals items in turn: rank 0 gets 0, 2, ...; rank 1 gets 1, 3, ...
    records = [Record(good, box, label), Record(missing, box, label)] * STEPS
    loader = DataLoader(DetectionDataset(records, build_transform(SIZE), SIZE), batch_size=1, collate_fn=collate_detection)
    L.seed_everything(0)
    module = LesionDetectionModule(class_names=["lesion"], **TINY)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(seconds=30)), max_steps=STEPS,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )
    trainer.fit(module, train_dataloaders=loader)
    total = sum(p.detach().double().sum().item() for p in module.parameters())
    sys.stdout.write(f"rank {trainer.global_rank} weights sum {total:.12e}\n")  # one write: the ranks share stdout


if __name__ == "__main__":
    main(*sys.argv[1:4])
