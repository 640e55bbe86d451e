"""`medrpn fit | validate | test`: LightningCLI with medrpn's defaults, links and summary.

Every setting lives in YAML (`--config configs/demo.yaml`), can be overridden on the command line
(`--trainer.max_epochs 3`) and printed (`--print_config`). `fit` ends by evaluating the best
checkpoint on the held-out test split, in the same MLflow run, and prints where everything is.
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path

from jsonargparse import lazy_instance
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from medrpn.data.datamodule import LesionDataModule
from medrpn.errors import MedrpnError
from medrpn.tracking import MLflowConfigLogger, describe_run
from medrpn.tracking_outbox import MLflowLogger
from medrpn.training import LesionDetectionModule


class MedrpnCLI(LightningCLI):
    """LightningCLI with medrpn's links and an evaluation of the held-out split after `fit`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # Every run is tracked in MLflow (an SQLite file in the working directory unless the
        # config names a server), and the checkpoint with the best validation CPM is kept.
        parser.set_defaults(
            {
                "trainer.logger": lazy_instance(
                    MLflowLogger, experiment_name="medrpn", tracking_uri="sqlite:///mlruns.db", log_model=True
                ),
                "trainer.callbacks": [
                    lazy_instance(ModelCheckpoint, monitor="val/cpm", mode="max", save_top_k=1, filename="best-{epoch}"),
                    lazy_instance(LearningRateMonitor, logging_interval="step"),
                ],
                "trainer.default_root_dir": "runs",
            }
        )

    def after_fit(self) -> None:
        trainer, datamodule = self.trainer, self.datamodule
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or None
        test_metrics = {}
        if datamodule.splits["test"] and not trainer.fast_dev_run:
            trainer.test(self.model, datamodule=datamodule, ckpt_path=best, verbose=False)
            test_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        if trainer.is_global_zero:
            _print_fit_summary(trainer, best, test_metrics)


def _print_fit_summary(trainer, best: str | None, test_metrics: dict[str, float]) -> None:
    lines = ["", "medrpn fit finished."]
    run = describe_run(trainer)
    if run:
        lines.append(f"  MLflow run      {run['run_id']} (experiment '{run['experiment']}') in {run['tracking_uri']}")
        lines.append(f"                  see it with: mlflow ui --backend-store-uri {run['tracking_uri']}")
    if best:
        lines.append(f"  best checkpoint {Path(best).resolve()}")
    if test_metrics:
        def fmt(key: str) -> str:
            value = test_metrics.get(f"test/{key}", math.nan)
            return "n/a" if math.isnan(value) else f"{value:.3f}"

        lines.append(
            f"  held-out test   FROC sensitivity at 1 FP/image = {fmt('froc_1fp')}, CPM = {fmt('cpm')}, "
            f"mAP@0.5 = {fmt('map50')}, RPN recall@100 = {fmt('rpn_recall100')}"
        )
    print("\n".join(lines), flush=True)


def run(argv: list[str] | None) -> None:
    """Runs a LightningCLI subcommand (fit, validate, test, ...) with medrpn's model and data.

    Checkpoints are loaded with `weights_only` (torch's default): one that carries pickled code
    is refused with a clear error instead of being run.
    """
    try:
        MedrpnCLI(
            LesionDetectionModule,
            LesionDataModule,
            save_config_callback=MLflowConfigLogger,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except pickle.UnpicklingError as error:
        raise MedrpnError(
            "the checkpoint holds objects other than tensors and plain data, which could run code when "
            f"loaded; it was refused ({str(error).splitlines()[0][:200]})"
        ) from None
