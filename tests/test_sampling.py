"""Balanced and patient-level samplers, alone and sharded over DDP ranks."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from medrpn.data.records import Record
from medrpn.data.sampling import WeightedEpochSampler, check_sampler, sampling_weights
from medrpn.errors import ConfigError


def _records(n_positive: int, n_negative: int) -> list[Record]:
    box = np.array([[1, 1, 5, 5]], dtype=np.float32)
    empty = np.zeros((0, 4), dtype=np.float32)
    return [
        Record(Path(f"img{i}.png"), box if i < n_positive else empty, np.zeros(1 if i < n_positive else 0, dtype=np.int64))
        for i in range(n_positive + n_negative)
    ]


def test_balanced_draws_images_with_and_without_lesions_equally():
    records = _records(10, 90)
    weights = sampling_weights(records, "balanced", [str(i) for i in range(100)])
    sampler = WeightedEpochSampler(records, weights, seed=3)
    draws = [i for epoch in range(20) for i in (sampler.set_epoch(epoch), list(sampler))[1]]
    share = sum(i < 10 for i in draws) / len(draws)
    assert len(draws) == 20 * 100 and 0.45 < share < 0.55  # 10% of the images, half of the draws


def test_patient_sampler_gives_every_patient_the_same_share():
    records = _records(10, 0)
    groups = ["big"] * 9 + ["small"]
    sampler = WeightedEpochSampler(records, sampling_weights(records, "patient", groups), seed=0)
    counts = Counter(groups[i] for epoch in range(50) for i in (sampler.set_epoch(epoch), list(sampler))[1])
    assert abs(counts["big"] - counts["small"]) < 0.1 * sum(counts.values())


def test_ranks_take_disjoint_shares_of_the_same_epoch():
    records = _records(7, 20)
    weights = sampling_weights(records, "balanced", [str(i) for i in range(27)])
    alone = WeightedEpochSampler(records, weights, seed=5)
    ranks = [WeightedEpochSampler(records, weights, num_replicas=2, rank=r, seed=5) for r in range(2)]
    for sampler in [alone, *ranks]:
        sampler.set_epoch(4)
    shares = [list(s) for s in ranks]
    assert [len(s) for s in shares] == [14, 14] and len(ranks[0]) == 14  # 27 draws padded to 28
    # rank r takes draws r, r+2, ...: together exactly the epoch one process would draw (plus one pad)
    full = WeightedEpochSampler(records, weights, num_replicas=1, rank=0, seed=5)
    full.total_size = full.num_samples = 28
    full.set_epoch(4)
    interleaved = [x for pair in zip(*shares) for x in pair]
    assert interleaved == list(full)
    assert list(alone) == interleaved[:27]
    ranks[0].set_epoch(5)
    assert list(ranks[0]) != shares[0]  # a new epoch draws anew


def test_bad_sampler_names_are_clear():
    with pytest.raises(ConfigError, match="data.sampler: 'weighted' is not one of"):
        check_sampler("weighted")
    with pytest.raises(ConfigError):
        sampling_weights(_records(1, 1), "random", ["a", "b"])
    with pytest.raises(ValueError):
        WeightedEpochSampler(_records(2, 0), torch.ones(3))


def test_data_module_serves_training_batches_through_the_chosen_sampler(tmp_path):
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.data.synth import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", n_images=12, image_size=64, seed=2)
    annotations = str(tmp_path / "data" / "annotations.csv")
    plain = LesionDataModule(annotations, val_fraction=0.0, test_fraction=0.0, num_workers=0, cache={"mode": "none"})
    assert not isinstance(plain.train_dataloader().sampler, WeightedEpochSampler)
    dm = LesionDataModule(annotations, val_fraction=0.0, test_fraction=0.0, num_workers=0, sampler="patient", cache={"mode": "none"})
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WeightedEpochSampler) and len(loader.sampler) == len(dm.splits["train"])
    assert sum(len(batch["images"]) for batch in loader) == len(dm.splits["train"])
    with pytest.raises(ConfigError, match="data.sampler"):
        LesionDataModule(annotations, sampler="uniform")
