"""Everything medrpn says to MLflow itself (Lightning's `MLFlowLogger` does the rest).

- `MLflowConfigLogger` records the full resolved config of a run as parameters and as a
  `config.yaml` artifact, so runs can be compared and repeated from the MLflow UI.
- `describe_run` says where a run lives, for the summary printed after training.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger


def _mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


class MLflowConfigLogger(SaveConfigCallback):
    """Logs the resolved LightningCLI config to the run (rank 0 only, once per run)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logger = _mlflow_logger(trainer)
        if logger is None:
            return
        text = self.parser.dump(self.config, skip_none=False)
        config = self.config.as_dict()
        config.pop("config", None)  # the paths of the config files, not settings
        logger.log_hyperparams(config)
        logger.experiment.log_text(logger.run_id, text, self.config_filename)


def describe_run(trainer: L.Trainer) -> dict[str, str] | None:
    """Tracking URI, experiment and run id of the trainer's MLflow run, if it has one."""
    logger = _mlflow_logger(trainer)
    if logger is None or logger.run_id is None:
        return None
    return {
        "tracking_uri": logger._tracking_uri,
        "experiment": logger._experiment_name,
        "experiment_id": logger.experiment_id,
        "run_id": logger.run_id,
    }
