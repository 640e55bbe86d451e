"""Which training images an epoch shows: uniformly shuffled, balanced by lesion presence, or by patient.

Lesion datasets are lopsided. Most chest radiographs show no lesion; some patients contribute a
hundred slices and others one. `data.sampler` chooses how an epoch draws its images:

- "random": every image once per epoch, shuffled (Lightning's default sampler).
- "balanced": images with lesions and images without are drawn equally often (half the epoch
  each), with replacement; the epoch has as many draws as the split has images.
- "patient": every patient is drawn equally often, and within a patient every image; a patient
  with many slices no longer dominates the epoch.

`WeightedEpochSampler` is a `DistributedSampler`: under DDP every rank draws the same epoch
(seeded by `seed + epoch`) and takes its own interleaved share of it, so the ranks together see
the epoch's draws once, without overlap; Lightning recognises it and does not wrap it again, and
calls `set_epoch` before each epoch. A resumed run draws the same epochs as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DistributedSampler

from medrpn.data.records import Record
from medrpn.errors import ConfigError

SAMPLERS = ("random", "balanced", "patient")


def sampling_weights(records: Sequence[Record], sampler: str, groups: Sequence[str]) -> torch.Tensor:
    """Drawing weight of each record (summing to 1) for a weighted `sampler`.

    Args:
        records: the training split.
        sampler: "balanced" or "patient".
        groups: the patient (group) key of each record, as the split used.
    """
    if sampler == "balanced":
        positive = torch.tensor([len(r.boxes) > 0 for r in records])
        counts = {True: int(positive.sum()), False: int((~positive).sum())}
        kinds = [k for k, n in counts.items() if n]
        weights = torch.tensor([1.0 / (counts[bool(p)] * len(kinds)) for p in positive.tolist()])
    elif sampler == "patient":
        sizes = Counter(groups)
        weights = torch.tensor([1.0 / (sizes[g] * len(sizes)) for g in groups])
    else:
        raise ConfigError(f"data.sampler: '{sampler}' has no weights; weighted samplers are 'balanced' and 'patient'")
    return weights / weights.sum()


class WeightedEpochSampler(DistributedSampler):
    """Draws `len(dataset)` indices per epoch by weight, with replacement; each rank yields its share.

    Args:
        dataset: the training dataset (only its length is used).
        weights: drawing weight of each item.
        num_replicas, rank: the DDP world size and this process's rank (1 and 0 without DDP).
        seed: with the epoch, seeds the draws; equal on every rank.
    """

    def __init__(self, dataset, weights: torch.Tensor, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        if len(weights) != len(dataset):
            raise ValueError(f"{len(weights)} weights for a dataset of {len(dataset)} items")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.weights = weights.double()
        self.num_samples = math.ceil(len(dataset) / num_replicas)
        self.total_size = self.num_samples * num_replicas

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return iter(draws[self.rank : self.total_size : self.num_replicas].tolist())


def check_sampler(sampler: str) -> None:
    if sampler not in SAMPLERS:
        raise ConfigError(f"data.sampler: '{sampler}' is not one of {', '.join(repr(s) for s in SAMPLERS)}")
