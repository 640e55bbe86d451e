"""Ablation of the RPN's design choices: each one trained and measured, so the recipe is chosen by measurement.

For a recipe (default: configs/demo.yaml) every variant below is one real `medrpn fit`, the same
recipe with one design choice changed, trained for the same number of epochs:

    baseline               the recipe itself
    objectness_softmax     rpn.objectness softmax (Faster R-CNN paper) instead of sigmoid
    sampler_hard_negative  rpn.sampler hard_negative (MONAI/nnDetection)
    sampler_focal          rpn.sampler focal (no sampling, focal loss over all anchors)
    sampler_quality_focal  rpn.sampler quality_focal (focal, positives' target the IoU of their box: GFL)
    anchors_planned_3      anchors planned from the training boxes (`medrpn plan`), 3 per position
    anchors_planned_9      the same with 9 per position (3 x 3, as torchvision's seed anchors)
    anchors_torchvision    torchvision's anchors: one size per level 32, 64, 128, ... x ratios 0.5, 1, 2
    levels_no_finest       the recipe's anchors without the finest level that carries some
    topk_small             fewer proposals: pre/post NMS 500/200 in training, 300/50 in testing
    nms_0.5                rpn.nms_thresh 0.5 instead of the recipe's

    python bench/rpn_ablation.py --config configs/demo.yaml [--variants all|NAME,NAME] [--epochs N]
        [--out bench/results/ablation-demo] [--threads T] [--set KEY=VALUE ...]

`--set data.image_size=128` (a dotted key, a YAML value) changes the recipe for every variant.
Each variant gets `<out>/<variant>/config.yaml` (the complete config: `medrpn fit --config` on it
alone repeats the run; it names `rpn_ablation.FitClock`, so put bench/ on PYTHONPATH), its
checkpoints and `fit.log` there; the runs are `ablation-<variant>` in the MLflow experiment
`medrpn-ablation` at `sqlite:///<out>/mlruns.db`.

With an RPN-only recipe (`--set model.rpn_only=true`), a variant that changes only proposal
settings (top-k, NMS: topk_small, nms_0.5) would train the baseline's very weights, since the RPN's
losses are computed on anchors, never on proposals: it re-evaluates the baseline's best checkpoint
with `medrpn validate` instead (its row says so and repeats the baseline's training figures).

Measured per variant, into `<out>/ablation.json` and the table `<out>/ablation.md` (both
rewritten after every variant; a failed variant keeps its error and the others go on; rows of an
earlier call with the same recipe, epochs and settings are kept, and calls with different
`--variants` may run at the same time into one `--out`, e.g. one per core):
- validation metrics of the best epoch (highest val/cpm, the checkpoint `medrpn fit` keeps):
  val/rpn_recall100, val/cpm, val/froc_1fp, val/map50, read from the run's metric history;
- anchors per image (at the recipe's image size) and anchor coverage of the training boxes
  (share with an anchor at IoU >= 0.5, `medrpn plan`'s measure);
- training images/s: images trained / seconds of the training epochs without their validation
  (timed inside the fit by the `FitClock` callback: no process start, data indexing, sanity check
  or final test), and the whole command's wall time;
- inference images/s of the best checkpoint at batch 1 and 8, on random images at the recipe's
  image size (median of a few calls after a warm-up), in this process with `--threads` threads.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from medrpn.errors import ConfigError

EXPERIMENT = "medrpn-ablation"
METRICS = ("rpn_recall100", "cpm", "froc_1fp", "map50")  # val/<name>; the best epoch is the best val/cpm
BATCH_SIZES = (1, 8)
INFER_REPEATS = 3
LOGGER_CLASS = "medrpn.training.tracking_outbox.MLflowLogger"


# --- timing inside the fit -------------------------------------------------------------------


class FitClock(Callback):
    """Times the training epochs of a fit without their validation, and counts the images trained.

    Writes, when training ends (rank 0), a JSON file with `train_images`, `train_seconds`,
    `epochs`, `train_images_per_s`, the best checkpoint's path and the MLflow run, and logs
    `ablation/train_images_per_s` and `ablation/train_seconds` to the run.

    Args:
        path: the JSON file to write.
    """

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.images = 0
        self.seconds = 0.0
        self.epochs = 0
        self._epoch_start: float | None = None
        self._val_start: float | None = None
        self._val_seconds = 0.0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch_start, self._val_seconds = time.perf_counter(), 0.0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.images += len(batch["images"])

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._val_start = time.perf_counter() if self._epoch_start is not None else None

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._val_start is not None:
            self._val_seconds += time.perf_counter() - self._val_start
            self._val_start = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch_start is not None:  # validation at the end of an epoch runs before this hook
            self.seconds += time.perf_counter() - self._epoch_start - self._val_seconds
            self.epochs += 1
            self._epoch_start = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from medrpn.training.tracking import mlflow_logger

        images = self.images * trainer.world_size  # every rank trains its own share
        rate = images / self.seconds if self.seconds > 0 else None
        monitored = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None)]
        best = getattr(monitored[0] if monitored else trainer.checkpoint_callback, "best_model_path", "") or None
        logger = mlflow_logger(trainer)
        record = {
            "train_images": images,
            "train_seconds": self.seconds,
            "epochs": self.epochs,
            "train_images_per_s": rate,
            "best_checkpoint": str(Path(best).resolve()) if best else None,
            "run_id": logger.run_id if logger is not None else None,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(record, indent=2), encoding="utf-8")
        if logger is not None and rate is not None:
            logger.log_metrics({"ablation/train_images_per_s": rate, "ablation/train_seconds": self.seconds}, step=trainer.global_step)


# --- configs ---------------------------------------------------------------------------------


def _args_of(node: dict[str, Any], part: str) -> dict[str, Any]:
    """The mapping that holds `part`: a `class_path` section's `init_args` unless `part` is one of its own keys."""
    if "class_path" in node and part not in ("class_path", "init_args"):
        return node.setdefault("init_args", {})
    return node


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    """Sets `config[a][b][c] = value` for `key` "a.b.c", creating mappings on the way (through `init_args`)."""
    parts = key.split(".")
    node = config
    for part in parts[:-1]:
        node = _args_of(node, part)
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    _args_of(node, parts[-1])[parts[-1]] = value


def get_dotted(config: dict[str, Any], key: str, default: Any = None) -> Any:
    """`config[a][b][c]` for `key` "a.b.c" (through `init_args`), or `default` when absent."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict):
            return default
        if "class_path" in node and part not in ("class_path", "init_args"):
            node = node.get("init_args") or {}
        if part not in node:
            return default
        node = node[part]
    return node


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """`["data.image_size=128", ...]` as `{"data.image_size": 128}` (values parsed as YAML)."""
    sets = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set data.image_size=128")
        try:
            sets[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {pair!r}: the value is not YAML ({e})") from None
    return sets


def returned_stages(config: dict[str, Any]) -> list[int]:
    return list(get_dotted(config, "model.backbone.returned_stages") or [1, 2, 3, 4])


def recipe_anchors(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe's anchors as a mapping: as written, planned when `auto`, the model's default when absent."""
    from medrpn.model.anchors import AnchorConfig

    anchors = get_dotted(config, "model.anchors")
    if anchors == "auto":
        from medrpn.commands.plan import plan_for_config

        return asdict(plan_for_config(config, get_dotted(config, "model.anchors_per_position", 3)).anchors)
    return asdict(AnchorConfig(**(anchors or {})))


def _describe_anchors(anchors: dict[str, Any]) -> str:
    sizes = "[" + ", ".join("[" + ", ".join(f"{s:g}" for s in level) + "]" for level in anchors["sizes"]) + "]"
    return f"sizes {sizes}, ratios [{', '.join(f'{r:g}' for r in anchors['aspect_ratios'])}]"


def _planned(budget: int) -> Callable[[dict[str, Any]], tuple[dict[str, Any], str]]:
    def build(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
        from medrpn.commands.plan import plan_for_config

        anchors = asdict(plan_for_config(config, budget).anchors)
        return {"model.anchors": anchors}, f"anchors planned (<= {budget}/position): {_describe_anchors(anchors)}"

    return build


def _torchvision(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    from medrpn.model.anchor_planning import torchvision_anchors

    anchors = asdict(torchvision_anchors(len(returned_stages(config)) + 1))
    return {"model.anchors": anchors}, f"torchvision anchors: {_describe_anchors(anchors)}"


def _no_finest(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    anchors = recipe_anchors(config)
    carrying = [i for i, level in enumerate(anchors["sizes"]) if level]
    if len(carrying) < 2:
        raise ConfigError("levels_no_finest: the recipe's anchors are on one level only; removing it leaves none")
    anchors["sizes"][carrying[0]] = []
    return {"model.anchors": anchors}, f"no anchors on level {carrying[0]} (the finest with some): {_describe_anchors(anchors)}"


def _fixed(overrides: dict[str, Any]) -> Callable[[dict[str, Any]], tuple[dict[str, Any], str]]:
    text = ", ".join(f"{k.removeprefix('model.')} {v}" for k, v in overrides.items()) or "the recipe as it is"
    return lambda config: (dict(overrides), text)


# name -> function of the recipe (with --set applied) giving (dotted overrides, what changed)
VARIANTS: dict[str, Callable[[dict[str, Any]], tuple[dict[str, Any], str]]] = {
    "baseline": _fixed({}),
    "objectness_softmax": _fixed({"model.rpn.objectness": "softmax"}),
    "sampler_hard_negative": _fixed({"model.rpn.sampler": "hard_negative"}),
    "sampler_focal": _fixed({"model.rpn.sampler": "focal"}),
    "sampler_quality_focal": _fixed({"model.rpn.sampler": "quality_focal"}),
    "anchors_planned_3": _planned(3),
    "anchors_planned_9": _planned(9),
    "anchors_torchvision": _torchvision,
    "levels_no_finest": _no_finest,
    "topk_small": _fixed(
        {
            "model.rpn.pre_nms_top_n_train": 500,
            "model.rpn.post_nms_top_n_train": 200,
            "model.rpn.pre_nms_top_n_test": 300,
            "model.rpn.post_nms_top_n_test": 50,
        }
    ),
    "nms_0.5": _fixed({"model.rpn.nms_thresh": 0.5}),
}


def variant_config(recipe: dict[str, Any], overrides: dict[str, Any], variant: str, out: Path, epochs: int) -> dict[str, Any]:
    """The recipe with a variant's overrides, trained for `epochs`, tracked and checkpointed under `out`."""
    config = copy.deepcopy(recipe)
    for key, value in overrides.items():
        set_dotted(config, key, copy.deepcopy(value))
    out = out.resolve()
    work = out / variant
    trainer = config.setdefault("trainer", {})
    trainer["max_epochs"] = epochs
    trainer["default_root_dir"] = str(work)
    trainer["enable_progress_bar"] = False
    logger = trainer.get("logger") if isinstance(trainer.get("logger"), dict) else {}
    init = dict(logger.get("init_args") or {}) if "mlflow" in str(logger.get("class_path", "")).lower() else {}
    init.update(
        experiment_name=EXPERIMENT,
        run_name=f"ablation-{variant}",
        tracking_uri=f"sqlite:///{out / 'mlruns.db'}",
        artifact_location=str(out / "mlartifacts"),
        outbox_dir=str(out / "mlflow-outbox"),
        log_model=False,  # the checkpoints stay in <out>/<variant>
    )
    trainer["logger"] = {"class_path": LOGGER_CLASS, "init_args": init}
    callbacks = trainer.get("callbacks") or []
    callbacks = [copy.deepcopy(c) for c in (callbacks if isinstance(callbacks, list) else [callbacks])]
    for callback in callbacks:
        if isinstance(callback, dict) and str(callback.get("class_path", "")).endswith("Checkpoint"):
            callback.setdefault("init_args", {})["dirpath"] = str(work)
    if not any(isinstance(c, dict) and str(c.get("class_path", "")).endswith(".ModelCheckpoint") for c in callbacks):
        callbacks.insert(
            0,
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"dirpath": str(work), "filename": "best", "monitor": "val/cpm", "mode": "max",
                              "save_top_k": 1, "enable_version_counter": False},
            },
        )
    callbacks.append({"class_path": "rpn_ablation.FitClock", "init_args": {"path": str(work / "fit_clock.json")}})
    trainer["callbacks"] = callbacks
    return config


# --- measuring -------------------------------------------------------------------------------


def anchor_figures(anchors: dict[str, Any], stages: list[int], image_size: int, boxes: Any) -> tuple[int, float | None]:
    """Anchors per image and coverage of `boxes` (training boxes in input pixels; None: not known)."""
    from medrpn.model.anchor_planning import AnchorSetup, anchors_per_image, score_anchors
    from medrpn.model.anchors import AnchorConfig

    setup = AnchorSetup(AnchorConfig(**anchors), list(stages))
    if boxes is None or len(boxes) == 0:
        return anchors_per_image(setup, image_size), None
    score = score_anchors(boxes, setup, image_size)
    return score.anchors_per_image, score.coverage


def training_boxes_or_none(config: dict[str, Any]) -> Any:
    """The training split's boxes in input pixels (as `medrpn plan` reads them, without its zoomed copies), None when they cannot be read."""
    from medrpn.commands.config_parser import config_sections
    from medrpn.commands.plan import training_boxes

    try:
        return training_boxes(config_sections(config, "recipe")[0]).in_split
    except Exception as error:  # noqa: BLE001 - coverage is extra information, never a reason to stop
        print(f"rpn_ablation: no anchor coverage ({error.__class__.__name__}: {error})", flush=True)
        return None


def best_epoch_metrics(tracking_uri: str, run_id: str) -> dict[str, Any]:
    """The run's validation metrics at the validation with the highest val/cpm (the first of equals, as
    ModelCheckpoint keeps it), its epoch, and the held-out test metrics of the final evaluation."""
    from medrpn.training.runs import client_for

    client = client_for(tracking_uri)
    history = client.get_metric_history(run_id, "val/cpm")
    if not history:
        return {"best_epoch": None, **{f"val_{m}": None for m in METRICS}, "test": {}}
    best = max(sorted(history, key=lambda m: m.step), key=lambda m: m.value)
    found: dict[str, Any] = {}
    for name in METRICS:
        values = [m.value for m in client.get_metric_history(run_id, f"val/{name}") if m.step == best.step]
        found[f"val_{name}"] = values[-1] if values else None
    epochs = [m.value for m in client.get_metric_history(run_id, "epoch") if m.step == best.step]
    found["best_epoch"] = int(epochs[-1]) if epochs else None
    run = client.get_run(run_id)
    found["test"] = {k.removeprefix("test/"): v for k, v in run.data.metrics.items() if k.startswith("test/")}
    return found


def inference_speed(
    checkpoint: Path, image_size: int, overrides: dict[str, Any] | None = None, repeats: int = INFER_REPEATS
) -> dict[str, float]:
    """Images per second of the checkpoint's detector at each of `BATCH_SIZES`, on random images,
    with the variant's `model.rpn.*` overrides (a re-evaluated variant's proposal settings)."""
    from medrpn.training.lightning_module import module_from_checkpoint, read_module_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rpn = {key.removeprefix("model.rpn."): value for key, value in (overrides or {}).items() if key.startswith("model.rpn.")}
    saved = read_module_checkpoint(checkpoint)
    module = module_from_checkpoint(checkpoint, {"rpn": {**saved["hyper_parameters"]["rpn"], **rpn}}, checkpoint=saved)
    model = module.model.to(device).eval()
    channels = module.detector_config.backbone.in_channels
    generator = torch.Generator().manual_seed(0)
    speeds = {}
    for batch in BATCH_SIZES:
        images = torch.rand(batch, channels, image_size, image_size, generator=generator).to(device)
        times = []
        with torch.inference_mode():
            for i in range(repeats + 1):  # the first call warms up allocators and kernels
                start = time.perf_counter()
                model(images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
        speeds[f"b{batch}"] = batch / statistics.median(times)
    return speeds


# RPN settings that only shape the proposals: an RPN trained alone (`rpn_only`) computes its losses on
# anchors, never on proposals, so changing these trains the same weights and only changes evaluation
PROPOSAL_ONLY_SETTINGS = {
    f"model.rpn.{key}"
    for key in ("pre_nms_top_n_train", "post_nms_top_n_train", "pre_nms_top_n_test", "post_nms_top_n_test", "nms_thresh", "score_thresh")
}


def trains_like_baseline(recipe: dict[str, Any], overrides: dict[str, Any]) -> bool:
    """True when a variant would train the very weights of the baseline: an RPN-only recipe whose
    variant changes only proposal settings. Such a variant re-evaluates the baseline's checkpoint
    (`medrpn validate`) instead of training it again; the row says so."""
    return bool(get_dotted(recipe, "model.rpn_only")) and bool(overrides) and set(overrides) <= PROPOSAL_ONLY_SETTINGS


def latest_run_id(tracking_uri: str, run_name: str) -> str:
    """The newest MLflow run named `run_name` in the ablation's experiment."""
    from medrpn.training.runs import client_for

    client = client_for(tracking_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs(
        [experiment.experiment_id] if experiment else [], filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    if not runs:
        raise RuntimeError(f"no MLflow run named {run_name!r} in {tracking_uri}")
    return runs[0].info.run_id


def run_medrpn(config_path: Path, log_path: Path, threads: int | None, *extra: str, subcommand: str = "fit") -> tuple[int, str, float]:
    """Runs `medrpn <subcommand> --config config_path [extra]` in a subprocess: exit status, output, wall seconds."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(__file__).resolve().parent), env.get("PYTHONPATH")) if p)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "medrpn", subcommand, "--config", str(config_path), *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    wall = time.perf_counter() - start
    log_path.write_text(result.stdout, encoding="utf-8")
    return result.returncode, result.stdout, wall


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def measure_variant(
    name: str, recipe: dict[str, Any], out: Path, epochs: int, threads: int | None, boxes: Any
) -> dict[str, Any]:
    """Trains and measures one variant; a failure is returned as the row's `error` (the last lines of it)."""
    row: dict[str, Any] = {"variant": name, "changed": None, "error": None}
    work = out / name
    try:
        overrides, row["changed"] = VARIANTS[name](recipe)
        config = variant_config(recipe, overrides, name, out, epochs)
        image_size = int(get_dotted(config, "data.image_size", 256))
        row["overrides"] = overrides
        row["anchors"] = recipe_anchors(config)
        row["anchors_per_image"], row["anchor_coverage"] = anchor_figures(
            row["anchors"], returned_stages(config), image_size, boxes
        )
        if work.exists():
            shutil.rmtree(work)  # this variant's files from an earlier call: checkpoints must be this run's
        work.mkdir(parents=True)
        config_path = work / "config.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False, default_flow_style=None), encoding="utf-8")
        tracking_uri = f"sqlite:///{(out / 'mlruns.db').resolve()}"
        baseline_clock = out / "baseline" / "fit_clock.json"
        if name != "baseline" and trains_like_baseline(recipe, overrides) and baseline_clock.exists():
            clock = json.loads(baseline_clock.read_text(encoding="utf-8"))
            row["changed"] += "; the baseline's weights, re-evaluated (RPN-only training never uses proposals)"
            row["weights_from"] = "baseline"
            print(f"rpn_ablation: {name}: {row['changed']}", flush=True)
            evaluated = Path(clock["best_checkpoint"])  # validated with the variant's config (its RPN settings)
            code, output, row["fit_wall_s"] = run_medrpn(
                config_path, work / "validate.log", threads, "--ckpt_path", str(evaluated), subcommand="validate"
            )
            if code != 0:
                raise RuntimeError(f"medrpn validate exited with status {code} (log: {work / 'validate.log'}):\n{_tail(output)}")
            run_id = latest_run_id(tracking_uri, f"ablation-{name}")
        else:
            print(f"rpn_ablation: {name}: {row['changed']}", flush=True)
            code, output, row["fit_wall_s"] = run_medrpn(config_path, work / "fit.log", threads)
            if code != 0:
                raise RuntimeError(f"medrpn fit exited with status {code} (log: {work / 'fit.log'}):\n{_tail(output)}")
            clock = json.loads((work / "fit_clock.json").read_text(encoding="utf-8"))
            run_id = clock["run_id"]
            evaluated = Path(clock["best_checkpoint"]) if clock["best_checkpoint"] else None
        row.update(
            run_id=run_id,
            epochs=clock["epochs"],
            train_images=clock["train_images"],
            train_seconds=clock["train_seconds"],
            train_images_per_s=clock["train_images_per_s"],
            checkpoint=clock["best_checkpoint"],
        )
        row.update(best_epoch_metrics(tracking_uri, run_id))
        if not row["checkpoint"]:
            raise RuntimeError("the fit kept no best checkpoint (was val/cpm ever logged?)")
        row["infer_images_per_s"] = inference_speed(evaluated, image_size, overrides)  # with the variant's settings
    except Exception as error:  # noqa: BLE001 - one failed variant must not stop the others
        row["error"] = f"{error.__class__.__name__}: {error}" if not isinstance(error, RuntimeError) else str(error)
        print(f"rpn_ablation: {name} FAILED: {_tail(row['error'], 5)}", flush=True)
    return row


# --- report ----------------------------------------------------------------------------------


def _num(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The results as a Markdown table (differences are to the baseline row, when it succeeded)."""
    base = next((r for r in rows if r["variant"] == "baseline" and not r.get("error")), None)

    def delta(row: dict[str, Any], key: str) -> str:
        if base is None or row is base or row.get(key) is None or base.get(key) is None:
            return ""
        return _num(row[key] - base[key], signed=True)

    sets = ", ".join(f"{k}={v}" for k, v in meta["set"].items()) or "none"
    lines = [
        f"# RPN ablation: {meta['recipe']}",
        "",
        f"{meta['epochs']} epoch(s) per variant; --set {sets}; {meta['threads']} threads; {meta['machine']}; {meta['date']}.",
        "Validation metrics at the epoch with the best val/cpm. Train img/s: images trained / seconds of the",
        "training epochs without validation. Infer img/s: best checkpoint, random images, batch 1 / batch 8.",
        "Coverage: share of training boxes with an anchor at IoU >= 0.5.",
        "",
        "| variant | what changed | anchors/image | coverage | recall@100 | CPM | FROC@1 | mAP50 | train img/s | infer img/s b1 / b8 | Δ recall | Δ CPM |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        changed = (row.get("changed") or "").replace("|", "\\|")
        if row.get("error"):
            first = row["error"].strip().splitlines()[0][:120].replace("|", "\\|")
            lines.append(f"| {row['variant']} | {changed} | FAILED: {first} |" + " |" * 9)
            continue
        infer = row.get("infer_images_per_s") or {}
        coverage = row.get("anchor_coverage")
        lines.append(
            f"| {row['variant']} | {changed} | {row['anchors_per_image']:,} | "
            f"{'n/a' if coverage is None else f'{coverage:.1%}'} | {_num(row.get('val_rpn_recall100'))} | "
            f"{_num(row.get('val_cpm'))} | {_num(row.get('val_froc_1fp'))} | {_num(row.get('val_map50'))} | "
            f"{_num(row.get('train_images_per_s'), 1)} | {_num(infer.get('b1'), 1)} / {_num(infer.get('b8'), 1)} | "
            f"{delta(row, 'val_rpn_recall100')} | {delta(row, 'val_cpm')} |"
        )
    failed = [r for r in rows if r.get("error")]
    if failed:
        lines += ["", "## Failures", ""]
        for row in failed:
            lines += [f"### {row['variant']}", "", "```", _tail(row["error"]), "```", ""]
    return "\n".join(lines) + "\n"


def write_results(out: Path, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Rewrites `<out>/ablation.json` and `<out>/ablation.md` (each written whole, then renamed into place)."""
    for name, text in (
        ("ablation.json", json.dumps({"meta": meta, "rows": rows}, indent=2, default=str)),
        ("ablation.md", markdown(meta, rows)),
    ):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


def earlier_rows(out: Path, meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows of an earlier call into `out` made with the same recipe, epochs and settings (others are not comparable)."""
    try:
        earlier = json.loads((out / "ablation.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    keys = ("recipe", "epochs", "set")
    if any(earlier.get("meta", {}).get(k) != meta[k] for k in keys):
        print(f"rpn_ablation: {out / 'ablation.json'} was made with other settings: starting a new table", flush=True)
        return []
    return list(earlier.get("rows", []))


def merge_into_results(out: Path, meta: dict[str, Any], measured: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Writes this call's rows with those already in `<out>` (same recipe, epochs and settings) and returns them all.

    The table is re-read under a file lock at every write, so calls with different `--variants`
    may run at once into the same `<out>` (e.g. one per CPU core or GPU) and end in one table.
    """
    from filelock import FileLock

    with FileLock(str(out / ".ablation.lock"), timeout=600):
        ours = {r["variant"] for r in measured}
        rows = [r for r in earlier_rows(out, meta) if r.get("variant") not in ours] + list(measured)
        rows.sort(key=lambda r: list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS))
        write_results(out, meta, rows)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="the recipe")
    parser.add_argument("--variants", default="all", help=f"all, or names separated by commas: {', '.join(VARIANTS)}")
    parser.add_argument("--epochs", type=int, help="training epochs of every variant (default: the recipe's max_epochs)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/ablation-demo"))
    parser.add_argument("--threads", type=int, help="CPU threads for training and inference (default: torch's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe setting for every variant, e.g. data.image_size=128 (repeatable)")
    args = parser.parse_args(argv)

    names = list(VARIANTS) if args.variants == "all" else [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    from medrpn.commands.config_parser import read_yaml

    recipe = read_yaml(args.config)
    if not isinstance(recipe, dict):
        parser.error(f"{args.config}: not a config mapping")
    sets = parse_sets(args.sets)
    for key, value in sets.items():
        set_dotted(recipe, key, value)
    epochs = args.epochs or int(get_dotted(recipe, "trainer.max_epochs", 1) or 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "recipe": str(args.config),
        "epochs": epochs,
        "set": sets,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "tracking_uri": f"sqlite:///{(args.out / 'mlruns.db').resolve()}",
        "experiment": EXPERIMENT,
    }
    boxes = training_boxes_or_none(recipe)
    measured: list[dict[str, Any]] = []
    for name in names:
        measured.append(measure_variant(name, recipe, args.out, epochs, args.threads, boxes))
        merge_into_results(args.out, meta, measured)
    print((args.out / "ablation.md").read_text(encoding="utf-8"))
    failed = [r["variant"] for r in measured if r.get("error")]
    if failed:
        print(f"rpn_ablation: {len(failed)} variant(s) failed: {', '.join(failed)} (see {args.out / 'ablation.md'})")


if __name__ == "__main__":
    main()
