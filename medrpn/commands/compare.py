"""`medrpn compare`: runs side by side, and their FROC curves on one plot.

    medrpn compare RUN [RUN ...] [--tracking-uri sqlite:///mlruns.db] [--output froc_compare.png]

RUN is a run id or a run name (the newest run of that name). The table shows the key settings,
every other setting that all the runs record and that differs between them, and the figures; the plot overlays each
run's FROC points, with their bootstrap band where the run has one. Figures come from the final
evaluation when the run has one (`test/...`, then `eval/test/...`), else from its last
validation epoch (`val/...`); the table says which.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from mlflow.entities import Run

from medrpn.metrics import plots

from medrpn.training import runs
from medrpn.metrics.froc import FP_RATES
from medrpn.metrics.report import froc_key

STAGES = ("test", "eval/test", "val")
KEY_PARAMS = (
    "model/backbone/name",
    "model/froc_hit_rule",
    "model/froc_iou_threshold",
    "data/annotations",
    "data/image_size",
    "trainer/max_epochs",
    "model/optim/lr",
)
KEY_METRICS = (
    [froc_key(r) for r in FP_RATES]
    + ["cpm", "cpm_ci_low", "cpm_ci_high", "cpm_iou50", "map10", "map50", "map50_95"]
    + ["rpn_recall100", "rpn_recall1000", "rpn_ar100", "op_score_threshold", "op_fp_per_image", "op_sensitivity"]
)


def stage_of(run: Run) -> str | None:
    """The stage whose figures represent ``run``: its final evaluation if any, else validation."""
    metrics = run.data.metrics
    return next((s for s in STAGES if f"{s}/cpm" in metrics), None)


def froc_series(run: Run, label: str) -> plots.FrocSeries | None:
    """The run's FROC points (and interval, if logged) at its representative stage."""
    stage = stage_of(run)
    if stage is None:
        return None
    m = run.data.metrics
    sens = [m.get(f"{stage}/{froc_key(r)}", math.nan) for r in FP_RATES]
    low = [m.get(f"{stage}/{froc_key(r)}_ci_low") for r in FP_RATES]
    high = [m.get(f"{stage}/{froc_key(r)}_ci_high") for r in FP_RATES]
    has_ci = all(v is not None for v in low + high)
    cpm = m.get(f"{stage}/cpm", math.nan)
    return plots.FrocSeries(f"{label} ({stage}, CPM {cpm:.3f})", list(FP_RATES), sens, low if has_ci else None, high if has_ci else None)


def _label(run: Run) -> str:
    return f"{run.info.run_name or '?'} [{run.info.run_id[:8]}]"


def _fmt(value: float | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "n/a" if math.isnan(value) else f"{value:.4g}"
    text = str(value)
    return text if len(text) <= 28 else "..." + text[-25:]


def comparison_table(compared: list[Run]) -> str:
    """Key and differing parameters, then the figures, one column per run."""
    labels = [_label(r) for r in compared]
    params = [r.data.params for r in compared]
    names = [k for k in KEY_PARAMS if any(k in p for p in params)]
    # settings every run records and not all alike (a run logged some other way may record few)
    differing = sorted(
        k for k in set(params[0]).intersection(*params[1:]) if k not in names and len({p[k] for p in params}) > 1
    )
    rows: list[tuple[str, list]] = [("stage", [stage_of(r) or "-" for r in compared])]
    rows += [(k, [p.get(k) for p in params]) for k in names + differing]
    for key in KEY_METRICS:
        values = [r.data.metrics.get(f"{stage_of(r)}/{key}") for r in compared]
        if any(v is not None for v in values):
            rows.append((key, values))
    cells = [(name, [_fmt(v) for v in values]) for name, values in rows]
    width = max(len(name) for name, _ in cells) + 2
    col = max([len(label) for label in labels] + [len(c) for _, values in cells for c in values]) + 2
    lines = [" " * width + "".join(f"{label:>{col}}" for label in labels)]
    for name, values in cells:
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{col}}" for v in values))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="medrpn compare",
        description="Runs side by side (key settings and figures) and one PNG with their FROC curves overlaid.",
    )
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run ids or run names in the MLflow store")
    parser.add_argument("--tracking-uri", default=runs.DEFAULT_TRACKING_URI, help="MLflow store (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=Path("froc_compare.png"), help="the FROC plot (default: %(default)s)")
    args = parser.parse_args(argv)
    client = runs.client_for(runs.absolute_tracking_uri(args.tracking_uri))
    compared = []
    for ref in args.runs:
        run, note = runs.resolve_run(client, ref)
        if note:
            print(f"note: {note}")
        compared.append(run)
    print(comparison_table(compared))
    series = [s for s in (froc_series(r, _label(r)) for r in compared) if s is not None]
    missing = [_label(r) for r in compared if stage_of(r) is None]
    if missing:
        print(f"no FROC figures logged for: {', '.join(missing)}")
    path = plots.save(plots.froc_overlay_figure(series), args.output)
    print(f"\nFROC curves of {len(series)} run(s) written to {path.resolve()}", flush=True)
