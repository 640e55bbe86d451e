"""results.json and results.md: every system's figures side by side, and their ratios to medrpn."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REFERENCE = "medrpn"
# (key, column title, digits) of the main table
COLUMNS = (
    ("parameters_m", "params (M)", 1),
    ("epochs", "epochs", 2),
    ("images_seen", "images seen", 0),
    ("train_images_per_s", "train img/s", 2),
    ("train_images_per_s_after_warmup", "train img/s after warm-up", 2),
    ("froc_0.5fp", "sens @0.5 FP", 3),
    ("froc_1fp", "sens @1 FP", 3),
    ("froc_2fp", "sens @2 FP", 3),
    ("cpm", "CPM", 3),
    ("cpm_iou50", "CPM IoU>=0.5", 3),
    ("map50", "mAP@0.5", 3),
    ("map50_95", "mAP@0.5:0.95", 3),
    ("rpn_recall100", "RPN recall@100", 3),
    ("infer_images_per_s_b1", "infer img/s b1", 2),
    ("infer_images_per_s_b8", "infer img/s b8", 2),
    ("peak_rss_mb", "peak RSS MiB", 0),
    ("peak_rss_over_data_mb", "RSS over data MiB", 0),
    ("peak_gpu_mb", "peak GPU MiB", 0),
)
# figures compared with medrpn's (system / medrpn)
RATIO_KEYS = (
    "train_images_per_s",
    "train_images_per_s_after_warmup",
    "infer_images_per_s_b1",
    "infer_images_per_s_b8",
    "peak_rss_mb",
    "peak_rss_over_data_mb",
    "peak_gpu_mb",
    "cpm",
    "cpm_iou50",
    "map50",
    "froc_1fp",
)


def ratios(results: list[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per system, each of `RATIO_KEYS` divided by medrpn's (None where either is missing or zero)."""
    reference = next((r for r in results if r.get("system") == REFERENCE and "error" not in r), None)
    if reference is None:
        return {}
    out = {}
    for result in results:
        if "error" in result:
            continue
        row = {}
        for key in RATIO_KEYS:
            a, b = result.get(key), reference.get(key)
            row[key] = round(a / b, 3) if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
        out[result["system"]] = row
    return out


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (int, float)):
        return f"{value:,.{digits}f}"
    return str(value)


def markdown(run: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The report as Markdown: the setting, one table of figures, one of ratios to medrpn."""
    m = run["machine"]
    budget = run["budget"]
    budget_text = " and ".join(
        t for t in (f"{budget['minutes']} min" if budget["minutes"] else "", f"{budget['epochs']} epochs" if budget["epochs"] else "") if t
    )
    lines = [
        "# Detector comparison",
        "",
        f"- Data: `{run['data']}`: {run['split']['train']} training / {run['split']['val']} validation images "
        f"(split file `{Path(run['split']['file']).name}`: contiguous file-number blocks per class folder)",
        f"- Image size {run['image_size']} px, batch {run['batch_size']}, budget {budget_text} of training per system "
        "(whichever ends first), the same batches for every system (see `batch_fingerprint`)",
        f"- Machine: {m['device_name']} ({m['device']}), {m['cpu_count']} CPUs, {m['torch_threads']} torch threads; "
        f"torch {m['torch']}, torchvision {m['torchvision']}, MONAI {m['monai']}, Python {m['python']}",
        f"- Recipe: `{run['config']}`; run started {run['started']}",
        f"- Training throughput after warm-up counts only the steps after the first {run['warmup_seconds']:g} s.",
        "",
        "| system | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for result in results:
        if "error" in result:
            lines.append(f"| {result['system']} | failed: {result['error']} |" + " |" * (len(COLUMNS) - 1))
            continue
        lines.append(f"| {result['system']} | " + " | ".join(_cell(result.get(k), d) for k, _, d in COLUMNS) + " |")
    table = ratios(results)
    if table:
        lines += ["", "Ratios to medrpn (system / medrpn; above 1 is faster, more memory, or more accurate):", ""]
        lines += ["| system | " + " | ".join(RATIO_KEYS) + " |", "|---|" + "---:|" * len(RATIO_KEYS)]
        for system, row in table.items():
            lines.append(f"| {system} | " + " | ".join(_cell(row[k], 2) for k in RATIO_KEYS) + " |")
    lines += ["", "Systems:", ""]
    lines += [f"- `{r['system']}`: {r.get('description', '')}" for r in results if "error" not in r]
    return "\n".join(lines) + "\n"


def write_reports(out: Path, run: dict[str, Any], results: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Writes results.json (everything) and results.md (the tables) into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    data = {**run, "results": results, "ratios_to_medrpn": ratios(results)}
    json_path, md_path = out / "results.json", out / "results.md"
    json_path.write_text(json.dumps(data, indent=1, default=str) + "\n", encoding="utf-8")
    md_path.write_text(markdown(run, results), encoding="utf-8")
    return json_path, md_path
