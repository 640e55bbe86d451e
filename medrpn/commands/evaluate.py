"""`medrpn evaluate`: every figure of a checkpoint on the validation or test split, printed and recorded.

    medrpn evaluate --ckpt demo/checkpoints/best.ckpt [--config configs/demo.yaml] [--data.* ...]
                    [--split val|test] [--second-stage crops.ckpt]

The checkpoint says what the model is (and its operating point) and the data settings it was
trained with; config files and overrides, read as `medrpn fit` reads them (`medrpn.commands.config_parser`),
change what they give, and every data setting that then differs from the trained one is
printed. So the split is the one `medrpn fit` held out, unless told otherwise. The `model:`
settings may change how to measure (`froc_hit_rule`, `froc_iou_threshold`, `bootstrap_samples`).

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
import logging
import sys
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

import torch

from medrpn.training.checkpoint_file import read_checkpoint
from medrpn.errors import ConfigError, MedrpnError
from medrpn.metrics.report import EvaluationReport

if TYPE_CHECKING:
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.second_stage.rescoring import SecondStage
    from medrpn.training.lightning_module import LesionDetectionModule

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


def checkpoint_command_parser(prog: str, description: str):
    """The parser of a command run on a checkpoint (`evaluate`, `fit-crops`): `medrpn fit`'s
    settings (`medrpn.commands.config_parser`) and `--ckpt`; the command adds its own arguments."""
    from medrpn.commands.config_parser import training_config_parser

    parser = training_config_parser(prog, description)
    parser.add_argument(
        "--ckpt", required=True, type=Path,
        help="checkpoint written by `medrpn fit`, or a registered model: models:/NAME/VERSION or models:/NAME@ALIAS",
    )
    return parser


def parse_on_checkpoint(parser, argv: list[str]) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """Parses `argv` with the checkpoint's data settings (and its metric settings) as the defaults.

    Returns:
        the parsed arguments, the data settings and the metric settings (`METRIC_SETTINGS`);
        every data or metric setting that differs from the checkpoint's is printed.
    """
    from medrpn.commands.config_parser import parse_training_config, set_defaults_from

    ckpt = _ckpt_argument(argv)
    if ckpt is not None:
        saved = read_checkpoint(ckpt, mmap=True)
        stored = saved.get("datamodule_hyper_parameters") or {}
        set_defaults_from(parser, "data", {k: v for k, v in stored.items() if not k.startswith("_")})
        hparams = saved.get("hyper_parameters") or {}
        set_defaults_from(parser, "model", {k: hparams[k] for k in METRIC_SETTINGS if k in hparams})
    trained = parser.get_defaults()
    args, config = parse_training_config(parser, argv)
    metrics = {k: config["model"][k] for k in METRIC_SETTINGS}
    if ckpt is not None:
        notes = [f"data.{k}: {v!r} as given (the checkpoint was trained with {trained.data.as_dict().get(k)!r})"
                 for k, v in config["data"].items() if v != trained.data.as_dict().get(k)]
        notes += [f"model.{k}: {v!r} as given (the checkpoint's: {trained.model.get(k)!r})"
                  for k, v in metrics.items() if v != trained.model.get(k)]
        if notes:
            print(f"medrpn: settings with {ckpt}:\n  " + "\n  ".join(notes), flush=True)
    return args, config["data"], metrics


def _ckpt_argument(argv: list[str]) -> Path | None:
    """The `--ckpt` of `argv` (None when absent: the parser then says it is required); a clear error
    when it names no file, before the other settings are checked against a checkpoint that is not there."""
    found = argparse.ArgumentParser(add_help=False)
    found.add_argument("--ckpt", type=Path)
    ckpt = found.parse_known_args(argv)[0].ckpt
    if ckpt is not None and not ckpt.is_file():
        raise MedrpnError(f"{ckpt}: checkpoint not found")
    return ckpt


def load_checkpoint_and_data(
    ckpt: str | Path, data: dict[str, Any], metric_settings: dict[str, Any] | None = None
) -> tuple[LesionDetectionModule, LesionDataModule]:
    """The checkpoint's `LesionDetectionModule` (eval, CPU; `metric_settings` applied) and the
    `LesionDataModule` of the `data` settings (`parse_on_checkpoint`'s), set up."""
    from medrpn.data.datamodule import LesionDataModule
    from medrpn.training.lightning_module import module_from_checkpoint

    module = module_from_checkpoint(ckpt, dict(metric_settings or {}))
    datamodule = LesionDataModule(**data)
    datamodule.setup("test")
    return module, datamodule


def evaluate_checkpoint(
    ckpt: str | Path,
    data: dict[str, Any],
    metric_settings: dict[str, Any] | None = None,
    split: str = "test",
    tracking_uri: str | None = None,
    second_stage: str | Path | None = None,
) -> Evaluation:
    """Runs ``ckpt`` over ``split`` and computes every figure (recording is `record_evaluation`);
    with ``second_stage`` (a `medrpn fit-crops` checkpoint) also the detector followed by it."""
    from medrpn.training import runs

    if split not in ("val", "test"):
        raise ConfigError(f"--split: expected val or test, got {split!r}")
    ckpt = Path(ckpt)
    stage = None
    if second_stage is not None:  # a wrong file fails before the detector runs
        from medrpn.second_stage.rescoring import load_second_stage

        stage = load_second_stage(second_stage)
    module, datamodule = load_checkpoint_and_data(ckpt, data, metric_settings)
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

    from medrpn.training import runs

    uri, ckpt, split = evaluation.tracking_uri, evaluation.ckpt, evaluation.split
    try:
        client = runs.client_for(uri, create=True)
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
        raise MedrpnError(
            f"{runs.redact_uri(uri)}: could not record the evaluation in MLflow ({runs.redact_uri(str(error))[:300]})"
        ) from None
    return run_id, new


def main(argv: list[str]) -> None:
    parser = checkpoint_command_parser(
        "medrpn evaluate",
        "FROC/CPM with bootstrap intervals, mAP, RPN proposal recall and the operating point of a checkpoint "
        "on a held-out split; printed, and recorded in the checkpoint's MLflow run. The data settings are the "
        "checkpoint's unless a --config or --data.* override changes them (as `medrpn fit` takes them).",
    )
    parser.add_argument("--split", type=Literal["val", "test"], default="test", help="held-out split to evaluate (default: test)")
    parser.add_argument(
        "--tracking-uri", type=Optional[str], default=None,
        help="MLflow store (default: the one the checkpoint's run lives in, else sqlite:///mlruns.db)",
    )
    parser.add_argument(
        "--second-stage", type=Optional[Path], default=None,
        help="a crop classifier from `medrpn fit-crops`: also print FROC/CPM with it, beside the detector's alone",
    )
    from medrpn.training.registry import with_local_checkpoint

    args, data, metric_settings = parse_on_checkpoint(parser, with_local_checkpoint(argv))
    from medrpn.training import runs

    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    result = evaluate_checkpoint(args.ckpt, data, metric_settings, args.split, args.tracking_uri, args.second_stage)
    report = result.report
    print(f"medrpn evaluate: {args.ckpt} on the {args.split} split\n")
    print(report.to_table())
    stored = result.stored_operating_point
    if stored is None:
        print("\nThe checkpoint stores no operating point (it was saved before any validation epoch).")
    else:
        unit = "scan" if report.settings.get("spatial_dims", 2) == 3 else "image"
        print(
            f"(stored in the checkpoint, picked on the validation split for {stored['target_fp_per_image']:g} FP/{unit}: "
            f"score >= {stored['score_threshold']:.4g}, {stored['fp_per_image']:.3f} FP/{unit}, "
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
        f"\nRecorded in {where} {run_id} of {runs.redact_uri(result.tracking_uri)}: metrics eval/{args.split}/..., "
        f"artifacts evaluation/{args.split}/ (metrics.txt, report.json, froc.png, precision_recall.png, proposal_recall.png)"
        + (f"; with the second stage: metrics eval/{args.split}/second_stage/..." if result.second_stage else ""),
        flush=True,
    )
