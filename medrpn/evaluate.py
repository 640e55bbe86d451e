"""`medrpn evaluate`: every figure of a checkpoint on the validation or test split, printed and recorded.

    medrpn evaluate --ckpt demo/checkpoints/best.ckpt --config configs/demo.yaml [--split val|test]
                    [--second-stage crops.ckpt]

The checkpoint says what the model is (and its operating point); the config's `data:` section
says where the data are (settings it leaves out come from the checkpoint's data settings), and
its `model:` section may change how to measure (`froc_hit_rule`, `froc_iou_threshold`,
`bootstrap_samples`). The split is the one `medrpn fit` held out with the same settings.

Figures: FROC at 1/8 .. 8 FP per image and CPM with bootstrap intervals over patients, per class;
mAP at IoU 0.1, 0.5, 0.5:0.95; RPN proposal recall by number of proposals and lesion size; and
the FP rate and sensitivity of the checkpoint's operating point on this split. They go to the MLflow
run the checkpoint came from (metrics `eval/<split>/...`, artifacts `evaluation/<split>/`), or to
a new run of the experiment `medrpn-evaluate` when that run cannot be found.

With ``--second-stage`` (a crop classifier from `medrpn fit-crops`) the FROC/CPM of the detector
alone and followed by that second stage are printed one above the other, and the latter recorded
as ``eval/<split>/second_stage/...``.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from medrpn.checkpoint_file import read_checkpoint
from medrpn.errors import ConfigError, MedrpnError
from medrpn.metrics.report import EvaluationReport

if TYPE_CHECKING:
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.second_stage.rescoring import SecondStage
    from medrpn.training import LesionDetectionModule

# settings of the LightningModule that change how, not what, is measured
METRIC_SETTINGS = ("froc_hit_rule", "froc_iou_threshold", "bootstrap_samples")


@dataclass
class SecondStageEvaluation:
    """The detector alone and followed by a second stage (`medrpn.second_stage`), same images."""

    ckpt: Path
    alone: EvaluationReport
    with_stage: EvaluationReport
    mode: str
    candidates: str


@dataclass
class Evaluation:
    """What `evaluate_checkpoint` measured, and where it can be recorded."""

    ckpt: Path
    split: str
    report: EvaluationReport
    tracking_uri: str
    stored_run: dict[str, str] | None = None
    stored_operating_point: dict[str, float] | None = None
    second_stage: SecondStageEvaluation | None = None


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return config


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    section = config.get(name) or {}
    if isinstance(section, dict) and "init_args" in section:  # class_path / init_args form
        section = section["init_args"] or {}
    return dict(section) if isinstance(section, dict) else {}


def _load_module(ckpt: Path, overrides: dict[str, Any]):
    from medrpn.training import LesionDetectionModule

    if not ckpt.is_file():
        raise MedrpnError(f"{ckpt}: checkpoint not found")
    try:
        return LesionDetectionModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True, **overrides).eval()
    except (MedrpnError, ValueError) as error:
        raise MedrpnError(f"{ckpt}: {error}") from None
    except Exception as error:  # unpickling refused, a damaged file, not a medrpn checkpoint
        raise MedrpnError(f"{ckpt}: not a loadable medrpn checkpoint ({error.__class__.__name__}: {error})") from None


def _datamodule(config: dict[str, Any], stored: dict[str, Any]):
    from medrpn.data.datamodule import LesionDataModule

    accepted = inspect.signature(LesionDataModule).parameters
    settings = {k: v for k, v in {**stored, **_section(config, "data")}.items() if k in accepted}
    if "annotations" not in settings:
        raise ConfigError("data.annotations: not set in the config nor stored in the checkpoint")
    return LesionDataModule(**settings)


def load_checkpoint_and_data(ckpt: str | Path, config: str | Path) -> tuple[LesionDetectionModule, LesionDataModule]:
    """The checkpoint's `LesionDetectionModule` (eval, CPU; the config's metric settings applied)
    and the config's `LesionDataModule` (settings it leaves out come from the checkpoint), set up."""
    ckpt, config_path = Path(ckpt), Path(config)
    config = _read_config(config_path)
    model_settings = _section(config, "model")
    module = _load_module(ckpt, {k: model_settings[k] for k in METRIC_SETTINGS if k in model_settings})
    stored = read_checkpoint(ckpt, mmap=True).get("datamodule_hyper_parameters") or {}
    datamodule = _datamodule(config, {k: v for k, v in stored.items() if not k.startswith("_")})
    datamodule.setup("test")
    return module, datamodule


def evaluate_checkpoint(
    ckpt: str | Path,
    config: str | Path,
    split: str = "test",
    tracking_uri: str | None = None,
    second_stage: str | Path | None = None,
) -> Evaluation:
    """Runs ``ckpt`` over ``split`` and computes every figure (recording is `record_evaluation`);
    with ``second_stage`` (a `medrpn fit-crops` checkpoint) also the detector followed by it."""
    from medrpn import runs

    if split not in ("val", "test"):
        raise ConfigError(f"--split: expected val or test, got {split!r}")
    ckpt = Path(ckpt)
    stage = None
    if second_stage is not None:  # a wrong file fails before the detector runs
        from medrpn.second_stage.rescoring import load_second_stage

        stage = load_second_stage(second_stage)
    module, datamodule = load_checkpoint_and_data(ckpt, config)
    if not datamodule.splits[split]:
        raise ConfigError(f"data: the {split} split is empty (see data.val_fraction / data.test_fraction)")
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    second = None
    if stage is None:
        report = _test(module, loader)
        if report is None:
            raise MedrpnError(f"{ckpt}: the evaluation produced no figures")
    else:  # one pass of the detector gives both its own figures and the second stage's
        report, second = _with_second_stage(module, stage, Path(second_stage), loader)
    uri = runs.absolute_tracking_uri(
        tracking_uri or (module.mlflow_run or {}).get("tracking_uri") or runs.DEFAULT_TRACKING_URI
    )
    return Evaluation(ckpt, split, report, uri, module.mlflow_run, module.operating_point, second)


def _test(module: LesionDetectionModule, loader: Iterable[dict[str, Any]]) -> EvaluationReport | None:
    """The detector's figures on the split, from Lightning's test loop (`on_test_epoch_end`)."""
    import lightning as L

    trainer = L.Trainer(
        accelerator="auto", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.test(module, dataloaders=loader, verbose=False)
    return module.last_test_report


def _with_second_stage(
    module: LesionDetectionModule, stage: SecondStage, path: Path, loader: Iterable[dict[str, Any]]
) -> tuple[EvaluationReport, SecondStageEvaluation]:
    """The detector's own figures (as `_test` gives them) and those with the second stage, in one
    pass over the split."""
    from medrpn.second_stage.evaluation import measure_second_stage
    from medrpn.second_stage.rescoring import check_classes

    check_classes(stage, module.hparams.class_names, path)  # the data's classes (RPN-only: not the model's)
    metric_args = {"froc_hit_rule": module.hparams.froc_hit_rule, "froc_iou_threshold": module.hparams.froc_iou_threshold}
    detector = module.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    alone, with_stage = measure_second_stage(detector, stage, loader, module.class_names, metric_args)
    report = module.final_report(alone)
    second = SecondStageEvaluation(path, report, with_stage.report(), stage.settings.mode, stage.settings.candidates)
    return report, second


def record_evaluation(evaluation: Evaluation) -> tuple[str, bool]:
    """Logs the figures (metrics ``eval/<split>/...``) and files (``evaluation/<split>/``) to the
    checkpoint's run, or to a new run of experiment ``medrpn-evaluate``; returns (run id, new?)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from medrpn import runs

    uri, ckpt, split = evaluation.tracking_uri, evaluation.ckpt, evaluation.split
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    try:
        client = MlflowClient(tracking_uri=uri)
        run_id = runs.checkpoint_run(client, ckpt, evaluation.stored_run)
        new = run_id is None
        if new:
            run_id = runs.new_run(client, "medrpn-evaluate", f"evaluate {ckpt.name}", {"medrpn.checkpoint": str(ckpt.resolve())})
        runs.log_report_metrics(client, run_id, evaluation.report, f"eval/{split}")
        if evaluation.second_stage is not None:
            runs.log_report_metrics(client, run_id, evaluation.second_stage.with_stage, f"eval/{split}/second_stage")
        runs.log_report_artifacts(client, run_id, evaluation.report, f"evaluation/{split}")
        client.set_tag(run_id, f"medrpn.evaluated.{split}", str(ckpt.resolve()))
        if new:
            client.set_terminated(run_id)
    except MlflowException as error:
        raise MedrpnError(f"{uri}: could not record the evaluation in MLflow ({str(error)[:300]})") from None
    return run_id, new


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="medrpn evaluate",
        description="FROC/CPM with bootstrap intervals, mAP, RPN proposal recall and the operating point of a "
        "checkpoint on a held-out split; printed, and recorded in the checkpoint's MLflow run.",
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `medrpn fit`")
    parser.add_argument("--config", required=True, type=Path, help="the training config (its data: section is used)")
    parser.add_argument("--split", choices=("val", "test"), default="test", help="held-out split to evaluate (default: test)")
    parser.add_argument(
        "--tracking-uri", default=None,
        help="MLflow store (default: the one the checkpoint's run lives in, else sqlite:///mlruns.db)",
    )
    parser.add_argument(
        "--second-stage", type=Path, default=None, metavar="CKPT",
        help="a crop classifier from `medrpn fit-crops`: also print FROC/CPM with it, beside the detector's alone",
    )
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    result = evaluate_checkpoint(args.ckpt, args.config, args.split, args.tracking_uri, args.second_stage)
    report = result.report
    print(f"medrpn evaluate: {args.ckpt} on the {args.split} split\n")
    print(report.to_table())
    stored = result.stored_operating_point
    if stored is None:
        print("\nThe checkpoint stores no operating point (it was saved before any validation epoch).")
    else:
        print(
            f"(stored in the checkpoint, picked on the validation split for {stored['target_fp_per_image']:g} FP/image: "
            f"score >= {stored['score_threshold']:.4g}, {stored['fp_per_image']:.3f} FP/image, "
            f"sensitivity {stored['sensitivity']:.3f})"
        )
    if result.second_stage is not None:
        from medrpn.second_stage.evaluation import comparison_table

        second = result.second_stage
        print(
            f"\nSecond stage {second.ckpt} ({second.mode} {second.candidates}), same {args.split} images, "
            f"no bootstrap:\n{comparison_table(second.alone, second.with_stage)}"
        )
    sys.stdout.flush()
    run_id, new = record_evaluation(result)
    where = "a new run" if new else "the checkpoint's run"
    print(
        f"\nRecorded in {where} {run_id} of {result.tracking_uri}: metrics eval/{args.split}/..., "
        f"artifacts evaluation/{args.split}/ (metrics.txt, report.json, froc.png, precision_recall.png, proposal_recall.png)"
        + (f"; with the second stage: metrics eval/{args.split}/second_stage/..." if result.second_stage else ""),
        flush=True,
    )
