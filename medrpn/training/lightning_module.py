"""The training system around the detector: steps, optimiser, schedule and what gets logged.

The detector itself (`medrpn.model.LesionDetector`) knows nothing of Lightning; this module wraps
it. Hyperparameters are stored as plain dicts and lists (no pickled classes), so a checkpoint
describes its model without the training config and loads with `weights_only=True`.

Evaluation: every validation epoch logs `val/<metric>` (FROC points, CPM, mAP, proposal recall;
see `medrpn.metrics.report`) and picks the operating point, the score threshold giving
`operating_fp_per_image` false positives per validation image. Checkpoints carry it under the
top-level key `operating_point` (plain floats) and the MLflow run they belong to under
`mlflow_run`. The test epoch (the final evaluation) adds bootstrap intervals, applies the stored
operating point, and logs the table and plots as artifacts under `evaluation/test`.

Volumes (`spatial_dims: 3`, linked from the data module when the annotations are 3D): the
detector is the 3D one (`model.volume`: backbone, anchors, and the windows whole scans are run
in), trained on the data module's patches; validation and test run each whole scan window by
window (`medrpn.model.sliding_window_3d`) and count per scan (FROC per scan, 3D IoU, 3D mAP, and
the recall of the RPN's proposals merged across windows the same way).

RPN-only (`rpn_only: true`): the detector has no second stage, trains on the RPN losses alone,
and is evaluated on its proposals as class-agnostic detections of one class, `RPN_ONLY_CLASS`
(every lesion counts as that class): FROC/CPM and mAP of the candidates, and proposal recall.
"""

from __future__ import annotations

import logging
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from medrpn.errors import ConfigError, MedrpnError
from medrpn.training.checkpoint_file import read_checkpoint
from medrpn.training.init_weights import load_matching_weights
from medrpn.metrics import DetectionMetrics, EvaluationReport
from medrpn.metrics.froc import HitRule, check_hit_rule
from medrpn.model import (
    AnchorConfig,
    BackboneConfig,
    DetectorConfig,
    DetectorOutput,
    RoIConfig,
    RPNConfig,
    build_detector,
)
from medrpn.model.detector_3d import Detector3DConfig, VolumeModelConfig, build_detector_3d
from medrpn.training.tracking import logger_tracking_uri, mlflow_logger

log = logging.getLogger(__name__)

AUTO = "auto"  # model.anchors value: planned from the data by the command

# Epoch figures are gathered by the metric itself and equal on every rank, so Lightning's advice
# to sync them again (one warning per figure per epoch under DDP) does not apply.
warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")

# Settings that decide the shape or meaning of the weights: a checkpoint only fits a model with
# the same ones (thresholds, NMS and the optimiser may differ).
_MODEL_SHAPE_KEYS = (
    "class_names", "spatial_dims", "backbone", "anchors", "volume", "rpn", "roi", "pixel_mean", "pixel_std", "rpn_only"
)
_SHAPE_FIELDS = {
    "rpn": ("objectness", "conv_depth"),
    "roi": ("output_size", "sampling_ratio", "representation_size", "context_scale", "cascade_iou", "iou_aware", "image_context"),
    "volume": ("backbone", "anchors"),
}
# Settings that come from the data, never from a checkpoint (on_load_checkpoint refuses others).
_FROM_DATA = ("class_names", "spatial_dims")
# Settings only training reads (anchor matching, sampling, losses, optimiser): nothing to say about
# them when a checkpoint is only evaluated.
_TRAINING_ONLY = (
    *(f"rpn.{k}" for k in ("fg_iou_thresh", "bg_iou_thresh", "batch_size_per_image", "positive_fraction",
                            "pre_nms_top_n_train", "post_nms_top_n_train", "nms_thresh_train", "sampler", "hard_negative_pool",
                            "focal_alpha", "focal_gamma")),
    *(f"roi.{k}" for k in ("fg_iou_thresh", "bg_iou_thresh", "batch_size_per_image", "positive_fraction")),
    "anchors_per_position",
    "init_weights",
)


def _shape_part(key: str, value: Any) -> Any:
    if key in _SHAPE_FIELDS and isinstance(value, dict):
        # fields a checkpoint predates have their default, which is the only shape it can have had
        defaults = {"objectness": "sigmoid", "conv_depth": 1, "image_context": False}
        return {k: value.get(k, defaults.get(k)) for k in _SHAPE_FIELDS[key]}
    return value


def checkpoint_model_settings(saved: dict[str, Any], given: dict[str, Any], resume: bool) -> tuple[dict[str, Any], list[str]]:
    """Which model settings a run on a checkpoint takes from it, and what it says about the rest.

    The settings that decide the weights' shape or meaning (`_MODEL_SHAPE_KEYS`) come from the
    checkpoint, since its weights only fit them; when resuming a fit, so does the optimiser's,
    whose state goes on from the checkpoint. Every other setting (proposal top-k and NMS, score
    thresholds, sampler, FROC rule) is the one given in the config or on the command line, so
    `medrpn validate --ckpt_path X --model.rpn.nms_thresh 0.5` evaluates with NMS 0.5. The class
    names are not taken: they come from the data, and `on_load_checkpoint` refuses other ones.

    Args:
        saved: the checkpoint's `hyper_parameters`.
        given: the model settings as configured (`LightningCLI` config of `model`, as a dict).
        resume: the run goes on training from the checkpoint (`fit --ckpt_path`).

    Returns:
        The settings to take from the checkpoint (for rpn and roi only their shape fields), and a
        line for each setting where the checkpoint and the given one differ, saying which is used
        (without resuming, none for the settings only training reads).
    """
    taken: dict[str, Any] = {}
    for key in (*_MODEL_SHAPE_KEYS, *(("optim",) if resume else ())):
        if key in _FROM_DATA or key not in saved:
            continue
        value = saved[key]
        if key in _SHAPE_FIELDS and isinstance(value, dict):
            value = {field: value[field] for field in _SHAPE_FIELDS[key] if field in value}
        taken[key] = value
    flat_saved, flat_given, flat_taken = _flatten(saved), _flatten(given), _flatten(taken)
    notes = [
        f"model.{key}: {value!r} from the checkpoint, not {given[key]!r}"
        for key, value in taken.items()
        if isinstance(value, dict) and key in given and not isinstance(given[key], dict)  # anchors: auto
    ]
    for name, saved_value in flat_saved.items():
        if name not in flat_given or _plain(flat_given[name]) == _plain(saved_value):
            continue
        if not resume and (name in _TRAINING_ONLY or name.startswith("optim.")):
            continue
        if name in flat_taken:
            notes.append(f"model.{name}: {saved_value!r} from the checkpoint, not {flat_given[name]!r}")
        else:
            notes.append(f"model.{name}: {flat_given[name]!r} as given (the checkpoint was trained with {saved_value!r})")
    return taken, notes


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _plain(value: Any) -> Any:
    """Tuples as lists, so that a checkpoint's settings compare equal to the same ones from YAML."""
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


RPN_LOSS_NAMES = ("loss_objectness", "loss_rpn_box_reg")
LOSS_NAMES = (*RPN_LOSS_NAMES, "loss_classifier", "loss_box_reg")
IOU_LOSS_NAME = "loss_box_iou"  # the second stage's IoU prediction, with `roi.iou_aware`
RPN_ONLY_CLASS = "lesion"  # the one class an RPN-only model reports (findings, metrics)


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay to zero over the whole run.

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: optimiser steps of linear warm-up from lr / 100.
    """

    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100


def _as(cls: type, value: Any) -> Any:
    """Accepts a config as its dataclass or as the dict stored in a checkpoint."""
    return value if isinstance(value, cls) else cls(**(value or {}))


class LesionDetectionModule(L.LightningModule):
    """Trains and evaluates a `LesionDetector`.

    Args:
        class_names: lesion classes in label order (linked from the data module by the CLI).
        backbone, anchors, rpn, roi: detector settings (see `medrpn.model`). `anchors: auto` in a
            config has the `medrpn` command plan them from the training boxes (`medrpn plan`).
        anchors_per_position: the planner's budget of anchors per feature-map position (auto only).
        pixel_mean / pixel_std: input standardisation, applied by the detector.
        cross_class_nms_thresh: one box per lesion across classes (see `DetectorConfig`).
        containment_thresh: drop a detection nested in a better one (or holding one) when this
            share of the smaller box lies inside the other; None: off (see `DetectorConfig`).
        rpn_only: no second stage: train the RPN alone and report its proposals as detections of
            the one class `RPN_ONLY_CLASS` (then `class_names` is that, and `roi` is unused).
        optim: optimiser and learning-rate schedule.
        froc_hit_rule: when a detection hits a lesion in FROC: "iou" (IoU >= froc_iou_threshold)
            or "center" (centre within the lesion's radius, LUNA16's rule). The CPM at IoU >= 0.5
            is reported beside it in every case.
        froc_iou_threshold: IoU at which a detection hits a lesion ("iou" rule).
        operating_fp_per_image: false positives per image the operating point is picked for.
        bootstrap_samples: patient resamples for the confidence intervals of the final evaluation.
        init_weights: a checkpoint of `medrpn fit` to start training from (fine-tuning, e.g. at a
            larger input): its tensors that match this model by name and shape are loaded when
            a fit starts, the others are listed (`medrpn.training.init_weights`). A resumed fit
            (`--ckpt_path`) goes on from its own checkpoint's weights instead.
    """

    def __init__(
        self,
        class_names: list[str],
        backbone: BackboneConfig = BackboneConfig(),
        anchors: AnchorConfig | Literal["auto"] = AnchorConfig(),
        anchors_per_position: int = 3,
        rpn: RPNConfig = RPNConfig(),
        roi: RoIConfig = RoIConfig(),
        pixel_mean: float = 0.5,
        pixel_std: float = 0.25,
        cross_class_nms_thresh: float = 0.5,
        containment_thresh: float | None = None,
        rpn_only: bool = False,
        optim: OptimConfig = OptimConfig(),
        froc_hit_rule: HitRule = "iou",
        froc_iou_threshold: float = 0.3,
        operating_fp_per_image: float = 1.0,
        bootstrap_samples: int = 1000,
        init_weights: str | None = None,
        spatial_dims: int = 2,
        volume: VolumeModelConfig = VolumeModelConfig(),
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 (images) or 3 (volumes), got {spatial_dims}")
        self.spatial_dims = int(spatial_dims)
        self.volume = _as(VolumeModelConfig, volume)
        if anchors == AUTO and self.spatial_dims == 3:
            raise ConfigError("model.anchors: 'auto' is for images; for volumes set model.volume.anchors: auto")
        if self.volume.anchors == AUTO:
            raise ConfigError(
                "model.volume.anchors: 'auto' is planned from the training boxes by the medrpn command; in Python, "
                "plan them with medrpn.commands.plan_volumes.plan_volume_anchors(config, ...) and pass the plan's anchors"
            )
        if anchors == AUTO:
            raise ConfigError(
                "anchors: 'auto' is planned from the training boxes by the medrpn command; in Python, "
                "plan them with medrpn.commands.plan.plan_for_config(config) and pass the AnchorConfig it gives"
            )
        self.rpn_only = bool(rpn_only)
        # the classes the model reports; the data's names stay in the hyperparameters
        self.class_names = [RPN_ONLY_CLASS] if self.rpn_only else list(class_names)
        config = DetectorConfig(
            num_classes=len(self.class_names),
            backbone=_as(BackboneConfig, backbone),
            anchors=_as(AnchorConfig, anchors),
            rpn=_as(RPNConfig, rpn),
            roi=_as(RoIConfig, roi),
            pixel_mean=pixel_mean,
            pixel_std=pixel_std,
            cross_class_nms_thresh=cross_class_nms_thresh,
            containment_thresh=containment_thresh,
            rpn_only=self.rpn_only,
        )
        self.detector_config: DetectorConfig | Detector3DConfig = config
        if self.spatial_dims == 3:
            self.detector_config = Detector3DConfig(
                num_classes=len(self.class_names),
                backbone=self.volume.backbone,
                anchors=self.volume.anchors,
                rpn=config.rpn,
                roi=config.roi,
                pixel_mean=pixel_mean,
                pixel_std=pixel_std,
                cross_class_nms_thresh=cross_class_nms_thresh,
                containment_thresh=containment_thresh,
                rpn_only=self.rpn_only,
            )
        self.loss_names = RPN_LOSS_NAMES if self.rpn_only else LOSS_NAMES + ((IOU_LOSS_NAME,) if config.roi.iou_aware else ())
        self.optim = _as(OptimConfig, optim)
        self.save_hyperparameters(
            {
                "class_names": list(class_names),
                "backbone": asdict(config.backbone),
                "anchors": asdict(config.anchors),
                "anchors_per_position": anchors_per_position,
                "rpn": asdict(config.rpn),
                "roi": asdict(config.roi),
                "pixel_mean": pixel_mean,
                "pixel_std": pixel_std,
                "cross_class_nms_thresh": cross_class_nms_thresh,
                "containment_thresh": containment_thresh,
                "rpn_only": self.rpn_only,
                "optim": asdict(self.optim),
                "froc_hit_rule": froc_hit_rule,
                "froc_iou_threshold": froc_iou_threshold,
                "operating_fp_per_image": operating_fp_per_image,
                "bootstrap_samples": bootstrap_samples,
                "init_weights": None if init_weights is None else str(init_weights),
                "spatial_dims": self.spatial_dims,
                "volume": asdict(self.volume),
            },
            logger=False,
        )
        self.model = build_detector_3d(self.detector_config) if self.spatial_dims == 3 else build_detector(config)
        check_hit_rule(froc_hit_rule)
        if operating_fp_per_image < 0:
            raise ValueError(f"operating_fp_per_image must be >= 0, got {operating_fp_per_image}")
        self.operating_fp_per_image = float(operating_fp_per_image)
        self.bootstrap_samples = int(bootstrap_samples)
        self.init_weights = None if init_weights is None else str(init_weights)
        metric_args = dict(
            class_names=self.class_names,
            froc_hit_rule=froc_hit_rule,
            froc_iou_threshold=froc_iou_threshold,
            spatial_dims=self.spatial_dims,
        )
        self.val_metrics = DetectionMetrics(**metric_args)
        self.test_metrics = DetectionMetrics(**metric_args)
        # set by each validation epoch, saved in checkpoints, restored from them
        self.operating_point: dict[str, float] | None = None
        self.mlflow_run: dict[str, str] | None = None  # the run a loaded checkpoint came from
        self.last_test_report: EvaluationReport | None = None

    def setup(self, stage: str) -> None:
        """Refuses, before any step, volumes with another number of channels than the model takes."""
        datamodule = self.trainer.datamodule  # setup runs inside a Trainer; None with bare dataloaders
        channels = getattr(datamodule, "in_channels", None)
        if self.spatial_dims == 3 and channels is not None and channels != self.volume.backbone.in_channels:
            raise ConfigError(
                f"the volumes have {channels} channel(s) (data.sequences) but model.volume.backbone.in_channels "
                f"is {self.volume.backbone.in_channels}: set them alike"
            )

    def on_fit_start(self) -> None:
        """Loads `init_weights` into a fit that starts afresh; a resumed one (its checkpoint already
        restored by now) goes on from its own weights, and needs no init file."""
        if self.init_weights and self.trainer.ckpt_path is None:
            report = load_matching_weights(self, self.init_weights)
            if self.trainer.is_global_zero:  # not self.print: a progress bar drops it before its bar starts
                print(report.summary(), flush=True)

    def forward(self, images: Tensor) -> DetectorOutput:
        """Detections and proposals for a batch of images or volume patches (eval mode)."""
        return self.model(images)

    def detect_scan(self, volume: Tensor) -> dict[str, Tensor]:
        """Findings on a whole scan (C, X, Y, Z), window by window (`model.volume.window`), merged
        in scan voxels (eval mode): {"boxes" (N, 6), "scores", "labels"}, and the RPN's proposals
        merged the same way ("proposals", "proposal_scores", best first)."""
        from medrpn.model.sliding_window_3d import detect_by_windows

        def detect(window: Tensor) -> dict[str, Tensor]:
            out = self.model(window[None])
            return {**out.detections[0], "proposals": out.proposals[0], "proposal_scores": out.proposal_scores[0]}

        return detect_by_windows(
            detect,
            volume,
            window=tuple(self.volume.window),
            overlap=self.volume.window_overlap,
            proposal_merge_iou=self.detector_config.rpn.nms_thresh,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, targets = batch["images"], batch["targets"]
        if len(images) == 0:  # every file of the batch was unreadable (each already reported)
            log.warning("Training batch %d has no readable image: it adds a zero loss", batch_idx)
            return self._zero_loss()
        losses = self.model(images, targets).losses
        loss = sum(losses[name] for name in self.loss_names)
        batch_size = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=True, batch_size=batch_size)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=batch_size)
        return loss

    def _zero_loss(self) -> Tensor:
        """A loss of 0 that reaches every trainable parameter, for a batch with nothing to learn from.

        Under DDP every rank must give a gradient to every parameter at every step (the
        gradients are averaged across ranks in one all-reduce): a rank that skipped its step
        (`None`) or gave some parameters no gradient would leave the others waiting. Its gradients
        are zero, so the step follows the other ranks' gradients (averaged over all ranks). The
        optimiser steps as on any batch (in one process too: AdamW's momentum and weight decay
        still move the weights a little).
        """
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def _evaluate(self, batch: dict[str, Any], metrics: DetectionMetrics) -> None:
        if len(batch["images"]) == 0:  # every file unreadable: an empty update keeps DDP ranks in step
            metrics.update([], [], [], [])
            return
        targets = batch["targets"]
        if self.rpn_only:  # class-agnostic: every lesion is one of the candidates' class
            targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
        if self.spatial_dims == 3:  # whole scans, window by window
            found = [self.detect_scan(volume) for volume in batch["images"]]
            metrics.update(found, targets, [f["proposals"] for f in found], batch.get("meta"))
            return
        out = self.model(batch["images"])
        metrics.update(out.detections, targets, out.proposals, batch.get("meta"))

    def on_validation_epoch_end(self) -> None:
        report = self.val_metrics.report(target_fp_per_image=self.operating_fp_per_image)
        self.val_metrics.reset()
        self._log_scalars("val", report)
        if not self.trainer.sanity_checking and report.operating_point is not None:
            self.operating_point = report.operating_point.as_dict()

    def on_test_epoch_end(self) -> None:
        report = self.final_report(self.test_metrics)
        self.test_metrics.reset()
        self._log_scalars("test", report)
        self.last_test_report = report
        self._log_report_files(report, "evaluation/test")

    def final_report(self, metrics: DetectionMetrics) -> EvaluationReport:
        """The report of a final evaluation (`trainer.test`, `medrpn evaluate`): bootstrap
        intervals, and the sensitivity and FP rate at the operating point chosen on validation."""
        op = self.operating_point
        return metrics.report(
            n_bootstrap=self.bootstrap_samples,
            score_threshold=op["score_threshold"] if op else None,
            target_fp_per_image=op["target_fp_per_image"] if op else None,
        )

    def _log_report_files(self, report: EvaluationReport, artifact_path: str) -> None:
        """The report's table, JSON and plots as artifacts of the run (rank 0; never fatal)."""
        logger = mlflow_logger(self.trainer)
        if logger is None or not self.trainer.is_global_zero:
            return
        from medrpn.training.runs import write_report_files  # matplotlib only when it is needed

        with tempfile.TemporaryDirectory() as tmp:
            write_report_files(report, Path(tmp), artifact_path.rsplit("/", 1)[-1])
            if hasattr(logger, "log_artifacts"):  # medrpn's logger: keeps them if the server is away
                logger.log_artifacts(tmp, artifact_path)
                return
            try:
                logger.experiment.log_artifacts(logger.run_id, tmp, artifact_path)
            except Exception as error:  # the plots must not end a finished training
                rank_zero_warn(f"Could not log the evaluation plots to MLflow: {error.__class__.__name__}: {error}")

    def _log_scalars(self, stage: str, report: EvaluationReport) -> None:
        # nan (nothing to measure, e.g. the sanity check on an image without lesions) is not logged;
        # every rank holds the same gathered values, so no further sync
        self.log_dict(
            {f"{stage}/{k}": float(v) for k, v in report.scalars.items() if not math.isnan(v)},
            prog_bar=False,
            sync_dist=False,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stores the operating point and the MLflow run, as plain data (`weights_only` loading)."""
        if self.operating_point is not None:
            checkpoint["operating_point"] = {k: float(v) for k, v in self.operating_point.items()}
        logger = mlflow_logger(self.trainer)
        if logger is not None and logger.run_id is not None:
            from medrpn.training.runs import absolute_tracking_uri, redact_uri

            checkpoint["mlflow_run"] = {  # the URI without credentials: checkpoints get shared and uploaded
                "run_id": str(logger.run_id),
                "experiment_id": str(logger.experiment_id),
                "tracking_uri": redact_uri(absolute_tracking_uri(logger_tracking_uri(logger))),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuses, with the differing settings named, a checkpoint of another model shape; then
        restores the operating point and the MLflow run (called before the weights are loaded)."""
        saved = checkpoint.get("hyper_parameters", {})
        differences = [
            f"{key}: checkpoint {saved.get(key)!r}, here {self.hparams.get(key)!r}"
            for key in _MODEL_SHAPE_KEYS
            if key in saved and _shape_part(key, saved[key]) != _shape_part(key, self.hparams.get(key))
        ]
        if differences:
            raise ConfigError(
                "this checkpoint was trained with other model settings, so its weights do not fit this model: "
                + "; ".join(differences)
                + ". Use the config it was trained with (it is the run's config.yaml artifact)."
            )
        self.operating_point = checkpoint.get("operating_point")
        self.mlflow_run = checkpoint.get("mlflow_run")

    def configure_optimizers(self) -> dict[str, Any]:
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.optim.warmup_steps, total // 2)

        def factor(step: int) -> float:
            if step < warmup:
                return 0.01 + 0.99 * step / max(warmup, 1)
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def read_module_checkpoint(path: str | Path) -> dict[str, Any]:
    """A medrpn detector checkpoint's contents, read by the one safe reader (`read_checkpoint`:
    tensors and plain data only), checked to hold what `module_from_checkpoint` needs."""
    checkpoint = read_checkpoint(path)
    if "hyper_parameters" not in checkpoint or "state_dict" not in checkpoint:
        raise MedrpnError(f"{path}: not a medrpn checkpoint (no hyper_parameters/state_dict)")
    return checkpoint


def module_from_checkpoint(
    path: str | Path, overrides: dict[str, Any] | None = None, checkpoint: dict[str, Any] | None = None
) -> LesionDetectionModule:
    """The `LesionDetectionModule` of a checkpoint, in eval mode on the CPU: what Lightning's
    `load_from_checkpoint` does (operating point and MLflow run restored, another model shape
    refused with the settings named), with the file read once by `read_module_checkpoint`.

    Args:
        path: the checkpoint file (named in errors).
        overrides: module arguments that replace the saved ones (metric settings, RPN settings).
        checkpoint: its contents, when already read.
    """
    checkpoint = read_module_checkpoint(path) if checkpoint is None else checkpoint
    try:
        module = LesionDetectionModule(**{**checkpoint["hyper_parameters"], **(overrides or {})})
    except ConfigError:
        raise  # it names the setting at fault, which may be a given override
    except (ValueError, TypeError) as error:
        raise MedrpnError(f"{path}: {error}") from None
    try:
        module.on_load_checkpoint(checkpoint)
        module.load_state_dict(checkpoint["state_dict"])
    except ConfigError as error:  # another model shape
        raise ConfigError(f"{path}: {error}") from None
    except RuntimeError as error:  # state dict keys or shapes
        raise MedrpnError(f"{path}: its weights do not fit the model its settings describe ({str(error).splitlines()[0][:200]})") from None
    return module.eval()
