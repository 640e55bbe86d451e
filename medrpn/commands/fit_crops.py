"""`medrpn fit-crops`: train a crop classifier as a decoupled second stage of a trained detector.

    medrpn fit-crops --ckpt demo/checkpoints/best.ckpt [--config configs/demo.yaml] [--epochs 30]
                     [--candidates detections|proposals] [--mode rescore|relabel|both] [--output crops.ckpt]

The detector (a `medrpn fit` checkpoint) runs over the training and validation splits of the
checkpoint's data, or a config's (the same split as `medrpn fit`, without augmentation); its candidates become
labelled crops (`medrpn.second_stage.dataset`); the classifier trains on the training crops and
reports its loss on the validation ones. Then the validation split is measured with and without
the second stage, the operating point of the re-scored output is picked there (for the
detector's ``operating_fp_per_image``), and everything is written as one plain checkpoint
(``torch.load(..., weights_only=True)``) for ``medrpn predict/evaluate --second-stage``.

Each call is an MLflow run of experiment ``medrpn-second-stage`` (in the detector run's store
unless ``--tracking-uri`` names another): its settings, the crop counts, the classifier's loss and
accuracy per epoch, the validation figures of the detector alone (``val/detector/...``) and with
the second stage (``val/second_stage/...``), the comparison table and the checkpoint. The run is
tagged with the detector's checkpoint and run, so the two can be found from each other.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from torch.utils.data import DataLoader

from medrpn.training import runs
from medrpn.data.batch import collate_detection
from medrpn.data.dataset import DetectionDataset
from medrpn.data.transforms import build_transform
from medrpn.errors import MedrpnError
from medrpn.metrics import EvaluationReport
from medrpn.outputs.findings import file_sha256
from medrpn.second_stage.candidates import CANDIDATE_SOURCES
from medrpn.second_stage.classifier import CropClassifierConfig
from medrpn.second_stage.dataset import CropSet, collect_crops
from medrpn.second_stage.evaluation import comparison_table, measure_second_stage
from medrpn.second_stage.rescoring import COMBINES, MODES, SecondStage, SecondStageSettings, save_second_stage
from medrpn.second_stage.training import CropClassifierModule, balanced_class_weights
from medrpn.training.tracking_outbox import MLflowLogger

BATCH_SIZE = 128  # crops per training step
EXPERIMENT = "medrpn-second-stage"


@dataclass
class FitCropsResult:
    """What `fit_crops` made: the checkpoint, the classes, the crop counts per label (background
    first), and the validation reports of the detector alone and with the second stage (None
    without a validation split)."""

    path: Path
    run_id: str
    tracking_uri: str
    settings: SecondStageSettings
    class_names: list[str]
    train_counts: list[int]
    val_counts: list[int]
    alone: EvaluationReport | None
    with_stage: EvaluationReport | None


def _split_loader(datamodule: Any, split: str) -> DataLoader:
    """The split's images as the detector sees them, never augmented (train included)."""
    dataset = DetectionDataset(
        datamodule.splits[split], build_transform(datamodule.image_size), datamodule.image_size, datamodule.images
    )
    return DataLoader(dataset, batch_size=datamodule.batch_size, num_workers=0, collate_fn=collate_detection)


def _check_train_crops(crops: CropSet, class_names: list[str], settings: SecondStageSettings) -> list[int]:
    counts = crops.counts(len(class_names))
    if counts[0] == 0:
        hint = "lower --min-score or use --candidates proposals" if settings.candidates == "detections" else "lower --min-score"
        raise MedrpnError(
            f"the detector gave no background candidates (score >= {settings.min_score:g}) on the training split, "
            f"so there is nothing to tell lesions from: {hint}"
        )
    if sum(counts[1:]) == 0:
        raise MedrpnError("the training split has no lesions: the second stage has nothing to learn")
    return counts


def fit_crops(
    ckpt: str | Path,
    data: dict[str, Any],
    output: str | Path = "crops.ckpt",
    epochs: int = 30,
    settings: SecondStageSettings = SecondStageSettings(),
    seed: int = 0,
    tracking_uri: str | None = None,
) -> FitCropsResult:
    """Trains a second stage for the detector ``ckpt`` on the ``data``; writes ``output``.

    Args:
        ckpt: detector checkpoint written by ``medrpn fit``.
        data: the data settings (the images and the split; `medrpn.commands.evaluate.parse_on_checkpoint`
            gives the checkpoint's, changed by a config or overrides).
        output: where the second-stage checkpoint goes.
        epochs: passes over the training crops.
        settings: candidates, crop geometry and re-scoring.
        seed: of the classifier's initialisation, shuffling and flips.
        tracking_uri: MLflow store of the run; default: the detector's run's, else ./mlruns.db.
    """
    from medrpn.commands.evaluate import load_checkpoint_and_data

    if epochs < 1:
        raise MedrpnError(f"--epochs must be at least 1, got {epochs}")
    ckpt = Path(ckpt)
    module, datamodule = load_checkpoint_and_data(ckpt, data)
    L.seed_everything(seed, verbose=False)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    detector = module.model.to(device).eval()
    hp = module.hparams
    if getattr(detector, "rpn_only", False) and settings.candidates == "detections":
        settings = replace(settings, candidates="proposals")  # they are its proposals: label and thin them
        print("medrpn fit-crops: an RPN-only detector's detections are its proposals: using --candidates proposals")
    class_names = list(hp.class_names)  # the data's (an RPN-only detector reports one class of its own)
    classifier_config = CropClassifierConfig(
        num_classes=len(class_names), in_channels=datamodule.read.channels,
        pixel_mean=float(hp.pixel_mean), pixel_std=float(hp.pixel_std),
    )
    train_crops = collect_crops(detector, settings, _split_loader(datamodule, "train"), add_ground_truth=True)
    train_counts = _check_train_crops(train_crops, class_names, settings)
    has_val = bool(datamodule.splits["val"])
    val_crops = collect_crops(detector, settings, _split_loader(datamodule, "val"), add_ground_truth=False) if has_val else None
    training = CropClassifierModule(classifier_config, class_weights=balanced_class_weights(train_counts))
    val_counts = val_crops.counts(len(class_names)) if val_crops is not None else []
    logger = _run_logger(ckpt, module.mlflow_run, tracking_uri)
    logger.log_hyperparams({
        "detector_checkpoint": str(ckpt.resolve()), "epochs": epochs, "seed": seed, **asdict(settings),
        "classifier": asdict(classifier_config), "train_crops": _counts(train_counts, ["background", *class_names]),
        "val_crops": _counts(val_counts, ["background", *class_names]) if val_counts else "none",
    })

    trainer = L.Trainer(
        max_epochs=epochs, accelerator="auto", devices=1, logger=logger, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0, log_every_n_steps=1,
    )
    train_loader = DataLoader(train_crops.dataset(), batch_size=BATCH_SIZE, shuffle=True)
    val_loader = DataLoader(val_crops.dataset(), batch_size=4 * BATCH_SIZE) if val_crops is not None and len(val_crops) else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(training, train_dataloaders=train_loader, val_dataloaders=val_loader)
    provenance = {"checkpoint": str(ckpt.resolve()), "sha256": file_sha256(ckpt)}
    stage = SecondStage(training.classifier.eval(), settings, class_names, detector=provenance)

    alone = with_stage = None
    extra: dict[str, Any] = {"training": {"epochs": epochs, "train_counts": train_counts, "seed": seed}}
    if has_val:
        metric_args = {"froc_hit_rule": hp.froc_hit_rule, "froc_iou_threshold": hp.froc_iou_threshold}
        measured = measure_second_stage(detector, stage, _split_loader(datamodule, "val"), module.class_names, metric_args)
        alone, with_stage = (m.report(target_fp_per_image=float(hp.operating_fp_per_image)) for m in measured)
        if with_stage.operating_point is not None:
            stage.operating_point = with_stage.operating_point.as_dict()
        extra["validation"] = {
            "detector": {k: float(v) for k, v in alone.scalars.items()},
            "second_stage": {k: float(v) for k, v in with_stage.scalars.items()},
            "val_loss": float(trainer.callback_metrics.get("val/loss", float("nan"))),
        }
    extra["mlflow_run"] = {"run_id": logger.run_id, "tracking_uri": logger.tracking_uri}
    path = save_second_stage(stage.cpu(), output, extra)
    _log_results(logger, path, alone, with_stage)
    return FitCropsResult(path, logger.run_id, logger.tracking_uri, settings, class_names, train_counts, val_counts, alone, with_stage)


def _run_logger(ckpt: Path, detector_run: dict[str, Any] | None, tracking_uri: str | None) -> MLflowLogger:
    """The MLflow run of this fit (Lightning's logger, with medrpn's outbox if a server goes away)."""
    uri = runs.absolute_tracking_uri(tracking_uri or (detector_run or {}).get("tracking_uri") or runs.DEFAULT_TRACKING_URI)
    tags = {"medrpn.detector_checkpoint": str(ckpt.resolve())}
    if detector_run and detector_run.get("run_id"):
        tags["medrpn.detector_run"] = str(detector_run["run_id"])
    return MLflowLogger(
        experiment_name=EXPERIMENT, run_name=f"fit-crops {ckpt.name}", tracking_uri=uri, tags=tags,
        artifact_location=runs.artifact_location(uri),
    )


def _log_results(logger: MLflowLogger, path: Path, alone: EvaluationReport | None, with_stage: EvaluationReport | None) -> None:
    """The validation figures, the comparison table and the checkpoint, into the fit's run."""
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy2(path, Path(tmp) / path.name)
        if alone is not None and with_stage is not None:
            logger.log_metrics({f"val/detector/{k}": float(v) for k, v in alone.scalars.items() if v == v})
            logger.log_metrics({f"val/second_stage/{k}": float(v) for k, v in with_stage.scalars.items() if v == v})
            (Path(tmp) / "validation.txt").write_text(comparison_table(alone, with_stage) + "\n", encoding="utf-8")
        logger.log_artifacts(tmp, "second_stage")


def main(argv: list[str]) -> None:
    """`medrpn fit-crops --ckpt CKPT [--config CFG] [...]`."""
    from medrpn.commands.evaluate import checkpoint_command_parser, parse_on_checkpoint

    defaults = SecondStageSettings()
    parser = checkpoint_command_parser(
        "medrpn fit-crops",
        "Train a crop classifier on a detector's candidates (a decoupled second stage: false-positive "
        "reduction and/or lesion typing) and compare FROC/CPM with and without it on the validation split. "
        "The data settings are the checkpoint's unless a --config or --data.* override changes them.",
    )
    parser.add_argument("--output", type=Path, default=Path("crops.ckpt"), help="second-stage checkpoint to write (default: crops.ckpt)")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training crops (default: 30)")
    parser.add_argument("--candidates", choices=CANDIDATE_SOURCES, default=defaults.candidates,
                        help="classify the detector's detections or its RPN proposals (the RoI head bypassed)")
    parser.add_argument("--mode", choices=MODES, default=defaults.mode,
                        help="rescore (false-positive reduction), relabel (lesion type) or both (default)")
    parser.add_argument("--combine", choices=COMBINES, default=defaults.combine,
                        help="new score: the classifier's lesion probability alone (none) or its geometric mean "
                        "with the detector's score (default)")
    parser.add_argument("--crop-size", type=int, default=defaults.crop_size, help=f"crop side in pixels (default: {defaults.crop_size})")
    parser.add_argument("--margin", type=float, default=defaults.margin,
                        help=f"context on each side, as a fraction of the box side (default: {defaults.margin:g})")
    parser.add_argument("--min-score", type=float, default=defaults.min_score,
                        help=f"candidates scoring less are left out (default: {defaults.min_score:g})")
    parser.add_argument("--tracking-uri", type=Optional[str], default=None,
                        help="MLflow store of the run (default: the detector's run's store, else sqlite:///mlruns.db)")
    args, data, _ = parse_on_checkpoint(parser, argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    settings = SecondStageSettings(
        candidates=args.candidates, mode=args.mode, combine=args.combine,
        crop_size=args.crop_size, margin=args.margin, min_score=args.min_score,
    )
    result = fit_crops(args.ckpt, data, args.output, args.epochs, settings, tracking_uri=args.tracking_uri)
    names = ["background", *result.class_names]
    s = result.settings
    print(f"medrpn fit-crops: {args.ckpt} ({s.candidates}, {s.mode}, {s.crop_size} px crops, margin {s.margin:g})")
    print(f"  training crops per label  {_counts(result.train_counts, names)}")
    if result.alone is None:
        print("  no validation split: nothing measured, no operating point stored")
    else:
        print(f"  validation crops          {_counts(result.val_counts, names)}\n")
        print(f"Validation split ({result.alone.settings['n_images']} images, {result.alone.settings['n_lesions']} lesions):")
        print(comparison_table(result.alone, result.with_stage))
        op = result.with_stage.operating_point
        if op is not None:
            print(f"Operating point with the second stage: score >= {op.score_threshold:.4g}, {op.fp_per_image:.3f} FP/image, "
                  f"sensitivity {op.sensitivity:.3f}")
    print(f"\nWritten {result.path} (use: medrpn evaluate/predict ... --second-stage {result.path})")
    print(f"MLflow run {result.run_id} (experiment '{EXPERIMENT}') in {result.tracking_uri}", flush=True)


def _counts(counts: list[int], names: list[str]) -> str:
    return ", ".join(f"{n} {c}" for n, c in zip(names, counts))
