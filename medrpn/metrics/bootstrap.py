"""Bootstrap confidence intervals for FROC sensitivities and CPM, resampling patients.

As LUNA16's evaluation does with scans, whole patients are drawn with replacement (images when
there are no patient ids, each image then being its own patient), because a patient's lesions
and false positives are not independent. Each resample's FROC curve is read at the rates with
the same LUNA16 interpolation as the point estimate (``medrpn.metrics.froc``); the interval is
the percentile interval of the resampled values.

Cost: a resample is a weighted cumulative sum over the score-sorted hits and false positives.
Only the highest-scoring ones matter for rates up to 8 FP per image, so each resample works on
a prefix of them, and falls back to everything only when its curve does not pass the largest
rate inside that prefix: the result is the same as with all of them, in a fraction of the time.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from medrpn.metrics.froc import FP_RATES, interpolate_counts


@dataclass
class FrocIntervals:
    """Percentile intervals over bootstrap resamples.

    Attributes:
        rates: the FP rates of ``low`` / ``high``.
        low, high: (len(rates),) interval bounds of the sensitivity at each rate.
        cpm_low, cpm_high: interval of the CPM (mean of the sensitivities at ``rates``).
        band_rates, band_low, band_high: the same on a fine grid of rates, for plotting a band.
        n_resamples, confidence: how they were made.
    """

    rates: tuple[float, ...]
    low: np.ndarray
    high: np.ndarray
    cpm_low: float
    cpm_high: float
    band_rates: np.ndarray
    band_low: np.ndarray
    band_high: np.ndarray
    n_resamples: int
    confidence: float


def _sensitivities(
    weights: np.ndarray,
    event_group: np.ndarray,
    event_is_hit: np.ndarray,
    tie_ends: np.ndarray,
    n_images_per_group: np.ndarray,
    n_lesions_per_group: np.ndarray,
    rates: np.ndarray,
) -> np.ndarray:
    """(B, R) sensitivities of the resamples whose group multiplicities are ``weights`` (B, G)."""
    n_images = weights @ n_images_per_group  # (B,)
    n_lesions = weights @ n_lesions_per_group
    limits = torch.from_numpy(np.outer(n_images, rates))  # FP counts at each rate
    zero = torch.zeros(len(weights), 1, dtype=torch.float64)
    if len(event_group):
        # float32 holds these integer counts exactly (below 2**24) at half the memory
        w = torch.from_numpy(weights[:, event_group].astype(np.float32))  # (B, E)
        hit = torch.from_numpy(event_is_hit)
        tp = torch.cumsum(w * hit, dim=1)[:, tie_ends].double()
        fp = torch.cumsum(w * ~hit, dim=1)[:, tie_ends].double()
        tp, fp = torch.cat([zero, tp], dim=1), torch.cat([zero, fp], dim=1)
    else:
        tp = fp = zero
    found = interpolate_counts(fp, tp, limits).numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n_lesions[:, None] > 0, found / n_lesions[:, None], np.nan)


def bootstrap_froc(
    gt_best_scores: np.ndarray,
    gt_group: np.ndarray,
    fp_scores: np.ndarray,
    fp_group: np.ndarray,
    image_group: np.ndarray,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    rates: tuple[float, ...] = FP_RATES,
    n_band: int = 61,
    chunk: int = 32,
) -> FrocIntervals:
    """Bootstrap intervals of FROC sensitivities and CPM.

    Args:
        gt_best_scores: (G,) best hitting score per lesion (``-inf`` if never hit).
        gt_group: (G,) patient index (0 .. P-1) of each lesion.
        fp_scores: (F,) false-positive scores. fp_group: (F,) their patient index.
        image_group: (N,) patient index of every image (images without lesions included).
        n_resamples: bootstrap resamples. confidence: interval coverage (0.95: 2.5-97.5 %).
        seed: seed of the resampling, so the same data give the same interval.
        rates: the FP rates of the points. n_band: grid points (1/8 .. 8, log-spaced) of the band.
        chunk: resamples computed at once (memory: chunk x prefix length doubles).
    """
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    n_groups = int(image_group.max()) + 1 if len(image_group) else 0
    if n_groups == 0:
        raise ValueError("bootstrap_froc needs at least one image")
    n_images_per_group = np.bincount(image_group, minlength=n_groups).astype(np.float64)
    n_lesions_per_group = np.bincount(gt_group, minlength=n_groups).astype(np.float64)
    band = np.geomspace(min(rates), max(rates), n_band)
    all_rates = np.concatenate([np.asarray(rates, dtype=np.float64), band])

    # Events: lesion hits and false positives, best score first; a threshold sits at each tie end.
    found = np.isfinite(gt_best_scores)
    scores = np.concatenate([gt_best_scores[found], fp_scores]).astype(np.float64)
    groups = np.concatenate([gt_group[found], fp_group]).astype(np.int64)
    is_hit = np.concatenate([np.ones(found.sum(), bool), np.zeros(len(fp_scores), bool)])
    order = np.argsort(-scores, kind="stable")
    scores, groups, is_hit = scores[order], groups[order], is_hit[order]
    tie_ends = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True]) if len(scores) else np.zeros(0, np.int64)

    # Prefix long enough for almost every resample: FPs up to 1.5x the largest rate of the data.
    fp_cum = np.cumsum(~is_hit)
    enough = np.searchsorted(tie_ends, np.searchsorted(fp_cum, 1.5 * max(rates) * len(image_group), side="right"))
    prefix_ends = tie_ends[: enough + 1]
    prefix = int(prefix_ends[-1]) + 1 if len(prefix_ends) else 0

    prefix_fps_per_group = np.bincount(groups[:prefix][~is_hit[:prefix]], minlength=n_groups).astype(np.float64)
    rng = np.random.default_rng(seed)
    values = np.empty((n_resamples, len(all_rates)))
    for start in range(0, n_resamples, chunk):
        b = min(chunk, n_resamples - start)
        weights = rng.multinomial(n_groups, np.full(n_groups, 1 / n_groups), size=b).astype(np.float64)
        part = _sensitivities(
            weights, groups[:prefix], is_hit[:prefix], prefix_ends, n_images_per_group, n_lesions_per_group, all_rates
        )
        if prefix < len(scores):  # resamples whose curve does not pass the largest rate in the prefix
            redo = weights @ prefix_fps_per_group <= max(rates) * (weights @ n_images_per_group)
            if redo.any():
                part[redo] = _sensitivities(
                    weights[redo], groups, is_hit, tie_ends, n_images_per_group, n_lesions_per_group, all_rates
                )
        values[start : start + b] = part

    alpha = (1 - confidence) / 2
    cpms = values[:, : len(rates)].mean(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-nan: no resample has a lesion
        low, high = np.nanquantile(values, [alpha, 1 - alpha], axis=0)
        cpm_low, cpm_high = np.nanquantile(cpms, [alpha, 1 - alpha]) if not np.isnan(cpms).all() else (math.nan, math.nan)
    n = len(rates)
    return FrocIntervals(
        rates=tuple(float(r) for r in rates),
        low=low[:n],
        high=high[:n],
        cpm_low=float(cpm_low),
        cpm_high=float(cpm_high),
        band_rates=band,
        band_low=low[n:],
        band_high=high[n:],
        n_resamples=n_resamples,
        confidence=confidence,
    )
