"""`medrpn fit | validate | test`: LightningCLI with medrpn's defaults, links and summary.

Every setting lives in YAML (`--config configs/demo.yaml`), can be overridden on the command line
(`--trainer.max_epochs 3`) and printed (`--print_config`). `fit` ends by evaluating the best
checkpoint on the held-out test split, in the same MLflow run, and prints where everything is.

Every checkpoint is read with medrpn's safe reader (tensors and plain data only): a remote
`--ckpt_path https://...` is downloaded first, and `--weights_only false` is refused.

`fit --ckpt_path last` (or a checkpoint's path) resumes a stopped run: from the newest
`last.ckpt` that `ResumeCheckpoint` wrote, with its optimizer step count, and logging into the
MLflow run the checkpoint came from.
"""

from __future__ import annotations

import math
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from jsonargparse import Namespace, lazy_instance
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from medrpn.training.checkpoint_file import download_checkpoint, is_remote, read_checkpoint
from medrpn.training.checkpointing import ResumeCheckpoint, SafeCheckpointIO, checkpoint_run, find_last_checkpoint
from medrpn.data.datamodule import LesionDataModule
from medrpn.training.distributed import lost_peer, rank, watch_children, watch_launcher
from medrpn.errors import ConfigError, MedrpnError
from medrpn.metrics.report import hit_rule_label
from medrpn.training.runs import absolute_tracking_uri, redact_uri
from medrpn.training.tracking import MLflowConfigLogger, describe_run, logger_tracking_uri, mlflow_logger
from medrpn.training.tracking_outbox import MLflowLogger
from medrpn.training.lightning_module import AUTO, LesionDetectionModule, checkpoint_model_settings


def configure_parser(parser) -> None:
    """medrpn's links and defaults on a parser of the training config (`medrpn fit`'s, and the
    one the other commands read the same config with: `medrpn.commands.config_parser`)."""
    parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
    parser.link_arguments("data.spatial_dims", "model.spatial_dims", apply_on="instantiate")  # 3 for 3D annotations
    # Every run is tracked in MLflow (an SQLite file in the working directory unless the
    # config names a server), and the checkpoint with the best validation CPM is kept.
    parser.set_defaults(
        {
            "trainer.logger": lazy_instance(
                MLflowLogger, experiment_name="medrpn", tracking_uri="sqlite:///mlruns.db", log_model=True
            ),
            "trainer.callbacks": [
                lazy_instance(ModelCheckpoint, monitor="val/cpm", mode="max", save_top_k=1, filename="best-{epoch}"),
                lazy_instance(ResumeCheckpoint, dirpath="runs/checkpoints", every_n_train_steps=100),
                lazy_instance(LearningRateMonitor, logging_interval="step"),
            ],
            "trainer.default_root_dir": "runs",
        }
    )


class MedrpnCLI(LightningCLI):
    """LightningCLI with medrpn's links and an evaluation of the held-out split after `fit`."""

    def add_arguments_to_parser(self, parser) -> None:
        configure_parser(parser)

    def _parse_ckpt_path(self) -> None:  # private LightningCLI hook, no public one: pinned, see pyproject.toml
        """With `--ckpt_path`, takes from the checkpoint only the model settings its weights need
        (and, resuming a fit, the optimiser's); the others stay as configured, and every setting
        where the two differ is printed with the one used.

        LightningCLI's own version replaces the whole model config with the checkpoint's, so a
        `validate` or `test` with other proposal, NMS or threshold settings silently ran the
        trained ones.

        A remote checkpoint is downloaded first, and read from there like a local one."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        if self.config[subcommand].get("weights_only") is False:
            raise MedrpnError(
                "--weights_only false is not supported: medrpn reads checkpoints as tensors and plain data only, "
                "since loading anything else runs code from the file; leave it out"
            )
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if ckpt_path and is_remote(ckpt_path):
            self._downloads = tempfile.TemporaryDirectory(prefix="medrpn-ckpt-")  # removed when the command ends
            local = str(download_checkpoint(ckpt_path, Path(self._downloads.name)))
            if rank() == 0:
                print(f"medrpn: downloaded {redact_uri(ckpt_path)} to {local}", flush=True)
            ckpt_path = self.config[subcommand].ckpt_path = local
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        saved = read_checkpoint(Path(ckpt_path), mmap=True).get("hyper_parameters") or {}  # weights: Lightning's load
        given = self.config[subcommand].model.as_dict()
        taken, notes = checkpoint_model_settings(saved, given, resume=subcommand == "fit")
        if taken:
            self.config = self.parser.parse_object({subcommand: {"model": taken}}, self.config)
        if notes and rank() == 0:
            print(f"medrpn: settings with {ckpt_path}:\n  " + "\n  ".join(notes), flush=True)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """Lightning's trainer, reading checkpoints through medrpn's safe reader."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is not TorchCheckpointIO:
            raise ConfigError(
                f"trainer.plugins: {type(trainer.strategy.checkpoint_io).__name__} cannot be used: medrpn reads "
                "every checkpoint with its own safe reader (SafeCheckpointIO)"
            )
        trainer.strategy.checkpoint_io = SafeCheckpointIO()
        return trainer

    def before_instantiate_classes(self) -> None:
        """Refuses sync BN on CPU in one line (torch fails deep inside DDP), warns of bf16 on a CPU
        that emulates it, and turns `model.anchors: auto` into the anchors planned from the
        training boxes (`medrpn plan`), so the run's config, its MLflow parameters and its
        checkpoints hold the chosen ones."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        on_cpu = trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not _has_gpu())
        if trainer.sync_batchnorm and on_cpu:
            raise MedrpnError("trainer.sync_batchnorm needs GPUs (torch's SyncBatchNorm has no CPU version): leave it off on CPU")
        if on_cpu and "bf16" in str(trainer.precision) and not cpu_has_bf16():
            print(
                f"medrpn: warning: trainer.precision {trainer.precision} on a CPU without bf16 instructions "
                "(AVX512-BF16 or AMX): torch emulates them, which made training about 30x slower than "
                "32-true on such a CPU; use --trainer.precision 32-true here",
                file=sys.stderr, flush=True,
            )
        volume = config.model.get("volume")
        if volume is not None and volume.anchors == AUTO:
            from medrpn.commands.plan_volumes import plan_volume_anchors  # `medrpn plan`'s 3D plan

            plan, *_ = plan_volume_anchors(config.as_dict(), config.model.anchors_per_position, "the config")
            volume.anchors = Namespace(sizes=plan.anchors.sizes, aspect_ratios=plan.anchors.aspect_ratios)
            print(
                f"medrpn: 3D anchors planned from the training boxes: sizes {plan.anchors.sizes}, (h/w, d/w) ratios "
                f"{plan.anchors.aspect_ratios[0]}; coverage {plan.planned.coverage:.1%} at 3D IoU 0.5",
                flush=True,
            )
        if config.model.anchors != AUTO:
            return
        from medrpn.commands.plan import plan_for_config  # what `medrpn plan` prints, run for `anchors: auto`

        plan = plan_for_config(config.as_dict(), anchors_per_position=config.model.anchors_per_position)
        config.model.anchors = Namespace(sizes=plan.anchors.sizes, aspect_ratios=plan.anchors.aspect_ratios)
        print(
            f"medrpn: anchors planned from the training boxes: sizes {plan.anchors.sizes}, aspect ratios "
            f"{plan.anchors.aspect_ratios}; coverage {plan.coverage:.1%} at IoU 0.5, {plan.anchors_per_image} anchors/image",
            flush=True,
        )

    def before_fit(self) -> None:
        """Says when there is no validation split; when resuming, logs into the MLflow run the
        checkpoint was written by."""
        if self.trainer.is_global_zero and getattr(self.datamodule, "validation_by_choice_none", False):
            print(
                "medrpn: no validation split, as asked: training runs the set schedule, and the last "
                "weights are tested and kept (no best epoch, no operating point)",
                flush=True,
            )
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if ckpt_path in (None, "best", "hpc", "registry"):
            return
        path = find_last_checkpoint(self.trainer) if ckpt_path == "last" else Path(ckpt_path)
        logger = mlflow_logger(self.trainer)
        if path is None or logger is None or logger._run_id is not None:
            return
        run = checkpoint_run(path)
        run_uri = redact_uri(run.get("tracking_uri") or "")  # checkpoints keep it without credentials
        if run.get("run_id") and run_uri == redact_uri(absolute_tracking_uri(logger_tracking_uri(logger))):
            # read by MLFlowLogger.experiment, which then reopens that run (private; the public
            # run_id argument is fixed before the checkpoint to resume is known: pinned, see pyproject.toml)
            logger._run_id = run["run_id"]
            print(f"medrpn: resuming from {path}, in MLflow run {run['run_id']}", flush=True)
        elif run.get("run_id"):
            print(f"medrpn: resuming from {path} in a new MLflow run (its run was in {run_uri})", flush=True)

    def after_fit(self) -> None:
        trainer, datamodule = self.trainer, self.datamodule
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or None
        test_metrics = {}
        if datamodule.splits["test"] and not trainer.fast_dev_run:
            trainer.test(self.model, datamodule=datamodule, ckpt_path=best, verbose=False)
            test_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        if trainer.is_global_zero:
            _print_fit_summary(trainer, best, test_metrics, last_weights=getattr(datamodule, "validation_by_choice_none", False))


def _print_fit_summary(trainer, best: str | None, test_metrics: dict[str, float], last_weights: bool = False) -> None:
    lines = ["", "medrpn fit finished."]
    run = describe_run(trainer)
    logger = mlflow_logger(trainer)
    if getattr(logger, "offline", False):
        lines.append(f"  MLflow outbox   {logger.outbox} (its server was away); send it with: medrpn mlflow-sync {logger.outbox}")
    elif run:
        lines.append(f"  MLflow run      {run['run_id']} (experiment '{run['experiment']}') in {run['tracking_uri']}")
        lines.append(f"                  see it with: mlflow ui --backend-store-uri {run['tracking_uri']}")
    if best and last_weights:
        lines.append(f"  checkpoint      {Path(best).resolve()} (no validation: the last epoch's)")
    elif best:
        lines.append(f"  best checkpoint {Path(best).resolve()}")
    elif last_weights and test_metrics:
        lines.append("  tested          the last weights (no validation split)")
    if test_metrics:
        def fmt(key: str) -> str:
            value = test_metrics.get(f"test/{key}", math.nan)
            return "n/a" if math.isnan(value) else f"{value:.3f}"

        module = trainer.lightning_module
        unit = "scan" if getattr(module, "spatial_dims", 2) == 3 else "image"
        lines.append(
            f"  held-out test   FROC sensitivity at 1 FP/{unit} = {fmt('froc_1fp')}, CPM = {fmt('cpm')} "
            f"({hit_rule_label(module.hparams.froc_hit_rule, module.hparams.froc_iou_threshold)}), "
            f"CPM at IoU >= 0.5 = {fmt('cpm_iou50')}, mAP@0.5 = {fmt('map50')}, RPN recall@100 = {fmt('rpn_recall100')}"
        )
    print("\n".join(lines), flush=True)


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (oneDNN's own test)."""
    import torch

    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def run(argv: list[str] | None) -> None:
    """Runs a LightningCLI subcommand (fit, validate, test, ...) with medrpn's model and data.

    Checkpoints are read with `read_checkpoint`: one that carries pickled code is refused with a
    clear error instead of being run.
    """
    watch_launcher()  # a rank whose launcher is killed must not wait forever for it
    watch_children()  # and a launcher whose rank dies says so and stops the others
    try:
        MedrpnCLI(
            LesionDetectionModule,
            LesionDataModule,
            save_config_callback=MLflowConfigLogger,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except RuntimeError as error:
        if not lost_peer(error):
            raise
        raise MedrpnError(
            f"a training process stopped: rank {rank()} lost its connection to the other ranks, so one of them "
            f"died or hung (see its log above; {str(error).splitlines()[0][:200]}). All ranks were stopped; "
            "restart the same command with --ckpt_path last to go on from the last checkpoint."
        ) from None
    except SIGTERMException:
        raise SystemExit(128 + signal.SIGTERM) from None  # what a scheduler expects of a terminated job
