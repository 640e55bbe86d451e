"""The evaluation plots: FROC with its confidence band, precision-recall, proposal recall against
the number of proposals, and FROC curves of several runs overlaid.

Figures are built on ``matplotlib.figure.Figure`` directly (no pyplot, no global backend), so
they can be drawn in any process, a training run's included, and written with ``save``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from medrpn.metrics.coco import RECALL_THRESHOLDS
from medrpn.metrics.froc import FP_RATES
from medrpn.metrics.report import EvaluationReport

_RATE_LABELS = ["1/8", "1/4", "1/2", "1", "2", "4", "8"]


@dataclass
class FrocSeries:
    """One run's FROC points for an overlay: sensitivities at ``rates``, optional interval bounds."""

    label: str
    rates: list[float]
    sensitivity: list[float]
    low: list[float] | None = None
    high: list[float] | None = None


def _froc_axes(fig: Figure, title: str, unit: str = "image"):
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(FP_RATES) / 1.2, max(FP_RATES) * 1.2)
    ax.set_xticks(FP_RATES, _RATE_LABELS)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel(f"false positives per {unit}")
    ax.set_ylabel("sensitivity")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    return ax


def froc_figure(report: EvaluationReport, title: str = "FROC") -> Figure:
    """The class-agnostic FROC curve (LUNA16 interpolation), its points, bootstrap band and per-class curves."""
    fig = Figure(figsize=(6, 4.5))
    ax = _froc_axes(fig, title, "scan" if report.settings.get("spatial_dims", 2) == 3 else "image")
    grid = np.geomspace(min(FP_RATES) / 1.2, max(FP_RATES) * 1.2, 200)
    if "all" in report.froc:
        x, y = report.froc["all"]
        cpm = report.scalars.get("cpm", float("nan"))
        ax.plot(grid, np.interp(grid, x, y), color="C0", lw=2, label=f"all classes (CPM {cpm:.3f})")
        ax.plot(FP_RATES, [report.scalars[f"froc_{r:g}fp"] for r in FP_RATES], "o", color="C0")
    iv = report.intervals
    if iv is not None:
        ax.fill_between(iv.band_rates, iv.band_low, iv.band_high, color="C0", alpha=0.15,
                        label=f"{iv.confidence:.0%} bootstrap interval (patients)")
    for i, name in enumerate(n for n in report.froc if n != "all"):
        x, y = report.froc[name]
        ax.plot(grid, np.interp(grid, x, y), "--", color=f"C{i + 1}", lw=1.2, label=name)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def precision_recall_figure(report: EvaluationReport, title: str = "Precision-recall at IoU 0.5") -> Figure:
    """COCO-interpolated precision against recall at IoU 0.5, one line per class with lesions."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    for i, (name, precision) in enumerate(report.precision_recall.items()):
        if precision is None:
            continue
        # COCO stores precision 0 past the highest recall reached: draw the curve up to there
        reached = int(np.flatnonzero(precision > 0)[-1]) + 1 if (precision > 0).any() else 1
        ax.plot(RECALL_THRESHOLDS[:reached], precision[:reached], color=f"C{i}", lw=1.6,
                label=f"{name} (AP {float(np.mean(precision)):.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="upper right", fontsize=8)
    return fig


def proposal_recall_figure(report: EvaluationReport, title: str = "RPN proposal recall at IoU 0.5") -> Figure:
    """Recall of the top-k proposals against k, overall and per lesion size."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    ks = list(report.proposal_top_ks)
    unit = report.settings.get("size_unit", "px")
    for i, (name, recalls) in enumerate(report.proposal_curves.items()):
        if all(np.isnan(recalls)):
            continue
        style = dict(lw=2) if name == "all" else dict(lw=1.2, ls="--")
        ax.plot(ks, recalls, marker="o", color=f"C{i}", label=name if name == "all" else f"{name} ({unit})", **style)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of proposals")
    ax.set_ylabel("recall")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def froc_overlay_figure(series: list[FrocSeries], title: str = "FROC of compared runs") -> Figure:
    """Several runs' FROC points on one plot (linear between points, as LUNA16 reads them)."""
    fig = Figure(figsize=(6.5, 4.8))
    ax = _froc_axes(fig, title)
    for i, s in enumerate(series):
        ax.plot(s.rates, s.sensitivity, marker="o", color=f"C{i}", lw=1.8, label=s.label)
        if s.low is not None and s.high is not None:
            ax.fill_between(s.rates, s.low, s.high, color=f"C{i}", alpha=0.12)
    if series:
        ax.legend(loc="lower right", fontsize=8)
    return fig


def save(fig: Figure, path: str | Path) -> Path:
    """Writes ``fig`` as PNG to ``path`` (folders created) and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
