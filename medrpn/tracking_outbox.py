"""An MLflow logger that survives its tracking server going away, and the replay of what it kept.

Training on a shared MLflow server must not die, stall for minutes, or lose metrics because the
server restarts or the network drops. `MLflowLogger` is Lightning's `MLFlowLogger` with one
change: when a call to the server fails, it warns once, stops calling the server for the rest of
the run, and appends everything it could not send (metrics with their steps and times,
parameters, checkpoints to upload, the final run status) to a JSON-lines outbox file. Checkpoints
are written locally as always. `medrpn mlflow-sync OUTBOX` sends the outbox to the run later.

HTTP retries are capped (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, backoff factor 1, 20 s timeout,
unless set in the environment), so a dead server costs seconds, not MLflow's default minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.utilities import _scan_checkpoints
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from medrpn.errors import MedrpnError
from medrpn.tracking import flat_params, logger_tracking_uri

_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, plus an outbox for whatever the server did not take.

    Args:
        outbox_dir: folder of the outbox files (`<run id>.jsonl`), created when first needed.
        *args, **kwargs: as `lightning.pytorch.loggers.MLFlowLogger`.
    """

    def __init__(self, *args: Any, outbox_dir: str = "mlflow-outbox", **kwargs: Any) -> None:
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        # Opening an SQLite store creates or migrates its schema; processes started together
        # (torchrun, SLURM tasks, two users at once) must take turns or the migration races.
        with _sqlite_lock(kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")):
            super().__init__(*args, **kwargs)
        self.outbox_dir = Path(outbox_dir)
        self._offline = False

    @property
    def tracking_uri(self) -> str:
        """The tracking store or server this run is logged to."""
        return logger_tracking_uri(self)

    @property
    def outbox(self) -> Path:
        """The file that keeps what could not be sent for this run."""
        return self.outbox_dir / f"{self.run_id}.jsonl"

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        self._send(lambda: super(MLflowLogger, self).log_hyperparams(params), {"kind": "params", "params": flat_params(params)})

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        values = {k: float(v) for k, v in metrics.items() if not isinstance(v, str)}
        entry = {"kind": "metrics", "metrics": values, "step": step or 0, "timestamp": int(time.time() * 1000)}
        self._send(lambda: super(MLflowLogger, self).log_metrics(metrics, step), entry)

    @rank_zero_only
    def log_artifacts(self, local_dir: str | Path, artifact_path: str | None = None) -> None:
        """Uploads the files of `local_dir` to the run (kept in the outbox folder if the server is away)."""
        local_dir = Path(local_dir)

        def keep_copies() -> dict[str, Any]:
            kept = self.outbox_dir / f"{self.run_id}-files" / (artifact_path or "")
            shutil.copytree(local_dir, kept, dirs_exist_ok=True)
            return {"kind": "artifacts", "path": str(kept.resolve()), "artifact_path": artifact_path}

        if not self._offline:
            try:
                self.experiment.log_artifacts(self.run_id, str(local_dir), artifact_path)
                return
            except Exception as error:  # noqa: BLE001 - any failure of the server or the network
                self._go_offline(error)
        self._keep(keep_copies())

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Models to keep are logged; `ResumeCheckpoint`'s `last.ckpt` is a local resume aid and is not."""
        from medrpn.checkpointing import ResumeCheckpoint

        if not isinstance(checkpoint_callback, ResumeCheckpoint):
            super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        if not self._offline:
            try:
                super().finalize(status)
                return
            except Exception as error:  # noqa: BLE001 - any failure of the server or the network
                self._go_offline(error)
        if self._checkpoint_callback:
            for _, path, _, _ in _scan_checkpoints(self._checkpoint_callback, {}):
                self._keep({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": Path(path).stem})
        self._keep({"kind": "status", "status": "FAILED" if status == "failed" else "FINISHED"})

    def _send(self, send: Callable[[], None], entry: dict[str, Any]) -> None:
        if not self._offline:
            try:
                send()
                return
            except Exception as error:  # noqa: BLE001 - any failure of the server or the network
                self._go_offline(error)
        self._keep(entry)

    def _go_offline(self, error: Exception) -> None:
        self._offline = True
        rank_zero_warn(
            f"MLflow tracking server {self.tracking_uri} failed ({error.__class__.__name__}: {str(error)[:200]}). "
            f"Training goes on; what is not logged to run {self.run_id} is kept in {self.outbox.resolve()}. "
            f"Send it later with: medrpn mlflow-sync {self.outbox}"
        )
        self._keep({"kind": "run", "tracking_uri": self.tracking_uri, "run_id": self.run_id})

    def _keep(self, entry: dict[str, Any]) -> None:
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        with open(self.outbox, "a") as f:
            f.write(json.dumps(entry) + "\n")


def _sqlite_lock(tracking_uri: str | None) -> contextlib.AbstractContextManager:
    """An inter-process lock beside an SQLite tracking store's file (a no-op for other stores)."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
    return FileLock(f"{database}.lock", timeout=300)


def sync_outbox(path: str | Path, tracking_uri: str | None = None) -> dict[str, int]:
    """Sends an outbox file to its MLflow run; renames it `*.synced` when everything went through.

    Parameters that the run already has are skipped (MLflow parameters cannot change).
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    path = Path(path)
    if not path.is_file():
        raise MedrpnError(f"{path}: no such outbox file")
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = next((e for e in entries if e["kind"] == "run"), None)
    if header is None:
        raise MedrpnError(f"{path}: not a medrpn MLflow outbox (no run line)")
    client = MlflowClient(tracking_uri or header["tracking_uri"])
    run_id = header["run_id"]
    existing = client.get_run(run_id).data.params
    counts = {"metrics": 0, "params": 0, "artifacts": 0}
    uploaded: set[str] = set()
    for entry in entries:
        if entry["kind"] == "metrics":
            metrics = [Metric(k, v, entry["timestamp"], entry["step"]) for k, v in entry["metrics"].items()]
            client.log_batch(run_id, metrics=metrics)
            counts["metrics"] += len(metrics)
        elif entry["kind"] == "params":
            params = [Param(k, v) for k, v in entry["params"].items() if k not in existing]
            for start in range(0, len(params), 100):
                client.log_batch(run_id, params=params[start : start + 100])
            counts["params"] += len(params)
        elif entry["kind"] == "artifact" and entry["path"] not in uploaded and Path(entry["path"]).is_file():
            client.log_artifact(run_id, entry["path"], entry["artifact_path"])
            uploaded.add(entry["path"])
            counts["artifacts"] += 1
        elif entry["kind"] == "artifacts" and Path(entry["path"]).is_dir():
            client.log_artifacts(run_id, entry["path"], entry["artifact_path"])
            counts["artifacts"] += 1
        elif entry["kind"] == "status":
            client.set_terminated(run_id, entry["status"])
    path.rename(path.with_suffix(".synced"))
    return counts


def main(argv: list[str]) -> None:
    """`medrpn mlflow-sync OUTBOX [OUTBOX ...]`."""
    parser = argparse.ArgumentParser(prog="medrpn mlflow-sync", description="Send kept MLflow outbox files to their runs.")
    parser.add_argument("outbox", nargs="+", type=Path, help="outbox file(s) written by a run whose server went away")
    parser.add_argument("--tracking-uri", help="send to this tracking URI instead of the one the run used")
    args = parser.parse_args(argv)
    for path in args.outbox:
        counts = sync_outbox(path, args.tracking_uri)
        print(f"{path}: sent {counts['metrics']} metric values, {counts['params']} parameters, {counts['artifacts']} artifacts")
