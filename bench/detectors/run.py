"""One system from start to finish, meant to run in a process of its own (see `run_in_process`).

A process per system keeps the figures apart: peak memory is that system's alone (plus the
libraries and the shared data pipeline: `data_rss_mb` is the peak before the model is built),
nothing one system allocated lingers into the next, and a system that fails (or runs out of
memory) leaves the others' results intact. Each process builds the same data pipeline from the
same split file and seed. On CPU the process is forked (it starts at once, with the libraries
already imported); for CUDA it is spawned, as CUDA cannot be used in a forked process.
"""

from __future__ import annotations

import json
import multiprocessing
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from bench.detectors.data import build_datamodule, loader
from bench.detectors.loop import Budget, train
from bench.detectors.medrpn_system import build_medrpn, model_section
from bench.detectors.measure import evaluate, inference_speed, peak_gpu_mb, peak_rss_mb
from bench.detectors.system import System, parameter_count
from medrpn.model import RoIConfig
from medrpn.training.lightning_module import OptimConfig

SYSTEMS = ("medrpn", "medrpn_mobilenet", "tv_resnet50", "tv_mobilenet", "monai_retinanet", "yolov8n", "yolov8s", "yolo11n", "yolo11s")
YOLO_SYSTEMS = ("yolov8n", "yolov8s", "yolo11n", "yolo11s")  # trained by Ultralytics itself (bench extra)


@dataclass
class Job:
    """Everything a system's process needs (plain values: it crosses a process boundary)."""

    system: str
    config: str
    data: str
    split_file: str
    image_size: int
    batch_size: int
    num_workers: int
    device: str
    budget_seconds: float | None
    budget_epochs: int | None
    warmup_seconds: float
    seed: int
    threads: int | None
    monai_backbone: str
    report_dir: str


def build_system(job: Job, recipe: dict[str, Any], class_names: list[str]) -> System:
    """The named system, for `job`'s image size and classes (each library is imported when needed)."""
    score_thresh = RoIConfig(**((recipe.get("model") or {}).get("roi") or {})).score_thresh  # medrpn's, for all
    if job.system == "medrpn":
        return build_medrpn(recipe, class_names, job.image_size)
    if job.system == "medrpn_mobilenet":
        return build_medrpn(recipe, class_names, job.image_size, backbone="mobilenet_v3_large")
    if job.system in ("tv_resnet50", "tv_mobilenet"):
        from bench.detectors.torchvision_system import build_torchvision

        return build_torchvision(job.system, len(class_names), job.image_size, score_thresh)
    if job.system == "monai_retinanet":
        from bench.detectors.monai_system import build_monai

        anchors = model_section(recipe, job.image_size).get("anchors", {})
        sizes = anchors.get("sizes", [[8.0]])[0]
        ratios = anchors.get("aspect_ratios", [0.5, 1.0, 2.0])
        return build_monai(len(class_names), sizes, ratios, score_thresh, job.monai_backbone)
    raise ValueError(f"unknown system {job.system!r}; choose from {', '.join(SYSTEMS)}")


def run_system(job: Job) -> dict[str, Any]:
    """Builds the data pipeline and the system, trains within the budget, evaluates, measures."""
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    log = lambda text: print(f"[{job.system}] {text}", flush=True)  # noqa: E731
    recipe = yaml.safe_load(Path(job.config).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    dm = build_datamodule(recipe, Path(job.data), Path(job.split_file), job.image_size, job.batch_size, job.num_workers)
    dm.check_images()
    if len(dm.problems):
        dm.problems.write_report(Path(job.report_dir) / f"data_problems_{job.system}.csv")
    data_seconds = time.perf_counter() - t0
    data_rss = peak_rss_mb()
    sizes = {name: len(part) for name, part in dm.splits.items()}
    log(f"data ready in {data_seconds:.0f} s: {sizes['train']} train / {sizes['val']} val images")

    torch.manual_seed(job.seed)  # the same initial weights on every run of a system
    if job.system in YOLO_SYSTEMS:
        system, train_figures, optim_record = _train_yolo(job, dm, log)
    else:
        system = build_system(job, recipe, dm.class_names)
        system.detector.model.to(device)  # before the optimiser is built over its parameters
        torch.manual_seed(job.seed)  # the same augmentation stream for every system (num_workers=0)
        optim = OptimConfig(**((recipe.get("model") or {}).get("optim") or {}))
        budget = Budget(job.budget_seconds, job.budget_epochs)
        log(f"{system.description}: {parameter_count(system.detector.model) / 1e6:.1f} M parameters; training")
        stats = train(system.detector, loader(dm, "train", job.seed, shuffle=True), device, optim, budget, log)
        log(f"trained {stats.steps} steps, {stats.images_seen} images in {stats.seconds:.0f} s; evaluating")
        train_figures = stats.summary(sizes["train"], job.warmup_seconds)
        optim_record = {"name": "AdamW", **asdict(optim), "schedule": "linear warm-up, cosine to 0 over the budget"}
    system.detector.model.to(device)  # YOLO's network comes back from its trainer on the CPU
    train_rss = peak_rss_mb()
    t0 = time.perf_counter()
    model_settings = recipe.get("model") or {}
    metric_settings = {k: model_settings[k] for k in ("froc_hit_rule", "froc_iou_threshold") if k in model_settings}
    accuracy = evaluate(system.detector, loader(dm, "val", job.seed, shuffle=False), device, dm.class_names, **metric_settings)
    eval_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    speed = inference_speed(system.detector, dm.dataset("val"), device)
    speed_seconds = time.perf_counter() - t0
    log(f"CPM {accuracy['cpm']}, mAP50 {accuracy['map50']}, inference {speed['infer_images_per_s_b1']} img/s (batch 1)")
    return {
        "system": system.name,
        "description": system.description,
        "parameters_m": round(parameter_count(system.detector.model) / 1e6, 2),
        "settings": system.settings,
        "metric_settings": metric_settings or "DetectionMetrics defaults (IoU hit rule, 0.3)",
        "optimizer": optim_record,
        "train_size": sizes["train"],
        **train_figures,
        **accuracy,
        "eval_seconds": round(eval_seconds, 2),
        **speed,
        "speed_seconds": round(speed_seconds, 2),
        "data_seconds": round(data_seconds, 2),
        "data_rss_mb": data_rss,
        "train_peak_rss_mb": train_rss,
        "peak_rss_mb": peak_rss_mb(),
        "peak_rss_over_data_mb": round(peak_rss_mb() - data_rss, 1),
        "peak_gpu_mb": peak_gpu_mb(device),
    }


def _train_yolo(job: Job, dm, log) -> tuple[System, dict[str, Any], str]:
    """Ultralytics trains YOLO on the split's training images in its own way (see yolo_system)."""
    from bench.detectors.yolo_system import train_yolo, write_yolo_dataset

    folder = Path(job.report_dir) / "yolo"
    data_yaml = write_yolo_dataset(dm.splits, dm.class_names, folder / "data")
    log(f"Ultralytics {job.system}, from scratch; training on {len(dm.splits['train'])} images")
    system, figures = train_yolo(
        job.system, data_yaml, job.image_size, job.batch_size, job.num_workers, job.device,
        job.budget_seconds, job.budget_epochs, job.seed, folder / "runs", log,
    )
    return system, figures, "Ultralytics' own (optimizer=auto, its schedule fitted to the budget)"


def _child(job: Job, result_path: str) -> None:
    try:
        result = run_system(job)
    except BaseException as error:  # noqa: BLE001 - reported to the parent, which goes on with the next system
        traceback.print_exc()
        result = {"system": job.system, "error": f"{type(error).__name__}: {error}"}
    Path(result_path).write_text(json.dumps(result, indent=1, default=str), encoding="utf-8")


def run_in_process(job: Job, result_path: Path) -> dict[str, Any]:
    """`run_system` in a fresh (spawned) process; a crash becomes an `error` entry."""
    result_path.unlink(missing_ok=True)
    method = "fork" if job.device == "cpu" and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    process = multiprocessing.get_context(method).Process(target=_child, args=(job, str(result_path)))
    start = time.perf_counter()
    process.start()
    process.join()
    seconds = round(time.perf_counter() - start, 1)
    if result_path.exists():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        result_path.unlink()
        return {**result, "process_seconds": seconds}
    return {
        "system": job.system,
        "error": f"the process ended with exit code {process.exitcode} and no result (out of memory?)",
        "process_seconds": seconds,
    }
