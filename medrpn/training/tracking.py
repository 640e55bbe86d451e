"""Everything medrpn says to MLflow itself (Lightning's `MLFlowLogger` does the rest).

- `MLflowConfigLogger` records the full resolved config of a run as parameters and as a
  `config.yaml` artifact, and tags the run with the medrpn git commit, a hash of the config and a
  fingerprint of the dataset, so runs can be compared and repeated from the MLflow UI.
- `describe_run` says where a run lives, for the summary printed after training.
- The config is recorded without credentials (`medrpn.training.runs.redact_uri`).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from medrpn.data.records import Record
from medrpn.training.runs import redact_uri


def mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    """The trainer's MLflow logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


def logger_tracking_uri(logger: MLFlowLogger) -> str:
    """The tracking store or server an MLflow logger writes to. Lightning keeps it only in a
    private attribute (always set: `file:<save_dir>` when none was given), so it is read here once
    (Lightning pinned to the tested minor version for it, see pyproject.toml)."""
    return str(logger._tracking_uri)


class MLflowConfigLogger(SaveConfigCallback):
    """Logs the resolved LightningCLI config to the run (rank 0 only, once per command).

    A resumed run (`fit --ckpt_path last`) already has parameters, and MLflow refuses to change
    one: then only new parameters are logged, the settings that differ are named in the tag
    `medrpn.resume_changed_params`, the run is marked RUNNING again, and the resumed command's
    config is kept beside the first as `config-resume-<time>.yaml`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False
        super().__init__(*args, **kwargs)

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logger = mlflow_logger(trainer)
        if logger is None:
            return
        text = redact_uri(self.parser.dump(self.config, skip_none=False))
        config = self.config.as_dict()
        config.pop("config", None)  # the paths of the config files, not settings
        params = flat_params(config)
        from medrpn.training.tracking_outbox import MLflowLogger  # (it imports this module)

        keeps = isinstance(logger, MLflowLogger)  # what its server does not take goes to its outbox
        run_id = logger.run_id  # opens the run: on the server, or (the server away) in the outbox
        existing = {} if keeps and logger.offline else logger.experiment.get_run(run_id).data.params
        config_file = self.config_filename
        tags = {"medrpn.git_commit": git_commit(), "medrpn.config_sha256": hashlib.sha256(text.encode()).hexdigest()}
        if existing:  # a resumed run
            changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
            params = {k: v for k, v in params.items() if k not in existing}
            tags["medrpn.resume_changed_params"] = ", ".join(changed)[:5000] or "none"
            config_file = f"config-resume-{time.strftime('%Y%m%dT%H%M%S')}.yaml"
            logger.experiment.update_run(run_id, status="RUNNING")
        if params:
            logger.log_hyperparams(params)
        records = getattr(trainer.datamodule, "records", None)
        if records is not None:
            tags["medrpn.dataset_fingerprint"] = dataset_fingerprint(records)
        if keeps:
            logger.log_text(text, config_file)
            logger.set_tags(tags)
            return
        logger.experiment.log_text(run_id, text, config_file)
        for key, value in tags.items():
            logger.experiment.set_tag(run_id, key, value)


def flat_params(config: dict[str, Any]) -> dict[str, str]:
    """A nested config as MLflow parameters: "a/b/c" keys, values as text without credentials
    (`redact_uri`) cut to MLflow's 250 chars (the form Lightning's MLFlowLogger gives them)."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

    return {k: redact_uri(str(v))[:250] for k, v in _flatten_dict(_convert_params(config)).items()}


def git_commit() -> str:
    """The commit medrpn runs from (with "-dirty" when it has uncommitted changes), or "unknown"."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def dataset_fingerprint(records: Sequence[Record]) -> str:
    """A hash of what the dataset says: image names (relative to their common folder), frames,
    boxes, labels and patients. Equal data moved to another folder keeps its fingerprint."""
    paths = [str(r.image_path) for r in records]
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0]) if paths else ""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: (str(r.image_path), str(r.frame))):
        boxes = ",".join(f"{v:.2f}" for v in record.boxes.reshape(-1))
        labels = ",".join(str(int(v)) for v in record.labels)
        name = os.path.relpath(record.image_path, root)
        digest.update(f"{name}|{record.frame}|{boxes}|{labels}|{record.patient_id}\n".encode())
    return digest.hexdigest()


def describe_run(trainer: L.Trainer) -> dict[str, str] | None:
    """Tracking URI, experiment and run id of the trainer's MLflow run, if it has one."""
    logger = mlflow_logger(trainer)
    if logger is None or logger.run_id is None:
        return None
    return {
        "tracking_uri": redact_uri(logger_tracking_uri(logger)),
        "experiment": logger._experiment_name,  # private, pinned (pyproject.toml); public would cost a server call
        "experiment_id": logger.experiment_id,
        "run_id": logger.run_id,
    }
