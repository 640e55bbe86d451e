"""An MLflow logger that survives its tracking server going away, and the replay of what it kept.

Training on a shared MLflow server must not die, stall for minutes, or lose metrics because the
server restarts or the network drops. `MLflowLogger` is Lightning's `MLFlowLogger` with one
change: when a call to the server fails, it warns once, stops calling the server for the rest of
the run, and appends everything it could not send (metrics with their steps and times,
parameters, checkpoints to upload, the final run status) to a JSON-lines outbox file. Checkpoints
are written locally as always. `medrpn mlflow-sync OUTBOX` sends the outbox to the run later.

HTTP retries are capped (MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, backoff factor 1, 20 s timeout,
unless set in the environment), so a dead server costs seconds, not MLflow's default minutes. A
server that cannot be reached when the run starts stops the command in one line, before training
(`on_unreachable: stop`), or the run starts on the outbox and `mlflow-sync` creates it later
(`on_unreachable: outbox`).

Credentials in the tracking URI (`https://user:password@host`) are not kept in it: MLflow gets them
as MLFLOW_TRACKING_USERNAME/PASSWORD (it sends those the same way, HTTP basic auth), so no message,
outbox line, checkpoint or summary holds them. `medrpn mlflow-sync` then needs the same two
variables (or `--tracking-uri` with the credentials).

The logger works inside Lightning's `MLFlowLogger` (its private `_run_id`, `_initialized`,
`_mlflow_client`, `_experiment_name`, `_run_name`), since its public API has no hook for a failed
call: Lightning is pinned to the minor version this was tested with (pyproject.toml).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.loggers.utilities import _scan_checkpoints
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from medrpn.errors import MedrpnError
from medrpn.training.runs import client_for, redact_uri
from medrpn.training.tracking import flat_params, logger_tracking_uri

_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


class MLflowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, plus an outbox for whatever the server did not take.

    Args:
        outbox_dir: folder of the outbox files (`<run id>.jsonl`), created when first needed.
        on_unreachable: what a server that fails when the run starts does: "stop" the command
            (one line, nothing run), or "outbox": run, keeping everything in the outbox (under a
            local run id), for `medrpn mlflow-sync` to create the run with.
        registered_model: at the end of a successful fit, register the best checkpoint as a new
            version of this model in the MLflow registry (`medrpn.training.registry`; needs
            `log_model`); None: no registration.
        registered_model_alias: also point this alias of the model (e.g. "candidate") at it.
        *args, **kwargs: as `lightning.pytorch.loggers.MLFlowLogger`.
    """

    def __init__(
        self,
        *args: Any,
        outbox_dir: str = "mlflow-outbox",
        on_unreachable: Literal["stop", "outbox"] = "stop",
        registered_model: str | None = None,
        registered_model_alias: str | None = None,
        **kwargs: Any,
    ) -> None:
        if registered_model_alias and not registered_model:
            raise MedrpnError("trainer.logger.init_args.registered_model_alias needs registered_model (the model's name)")
        if registered_model and not kwargs.get("log_model"):
            raise MedrpnError("trainer.logger.init_args.registered_model registers the logged best checkpoint: set log_model: true")
        for key, value in _HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if kwargs.get("tracking_uri"):
            kwargs["tracking_uri"] = _credentials_to_environment(kwargs["tracking_uri"])
        # Opening an SQLite store creates or migrates its schema; processes started together
        # (torchrun, SLURM tasks, two users at once) must take turns or the migration races.
        with _sqlite_lock(kwargs.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")):
            super().__init__(*args, **kwargs)
        self.outbox_dir = Path(outbox_dir)
        self.on_unreachable = on_unreachable
        self.offline = False  # True once the server failed: everything goes to the outbox
        self.registered_model, self.registered_model_alias = registered_model, registered_model_alias
        self.registered_version: str | None = None  # set once the best checkpoint is registered

    @property
    def experiment(self) -> Any:
        """Lightning's (it opens the run at its first use), with a server that fails then said in
        one line: the command stops before running anything, or (`on_unreachable: outbox`) the run
        starts in the outbox under a local id."""
        try:
            return super().experiment
        except Exception as error:  # noqa: BLE001 - any failure of the server or the network
            if self.on_unreachable != "outbox":
                raise MedrpnError(
                    f"MLflow tracking server {self.tracking_uri} failed when the run started ({_reason(error)}), so "
                    "nothing was run; start it, give another --trainer.logger.init_args.tracking_uri, or set "
                    "--trainer.logger.init_args.on_unreachable outbox"
                ) from None
            self._run_id = self._run_id or uuid.uuid4().hex  # local: mlflow-sync creates the run
            self._initialized = True
            self._go_offline(error, new_run=True)
            return self._mlflow_client

    @property
    def tracking_uri(self) -> str:
        """The tracking store or server this run is logged to, without credentials (to print or keep)."""
        return redact_uri(logger_tracking_uri(self))

    @property
    def outbox(self) -> Path:
        """The file that keeps what could not be sent for this run."""
        return self.outbox_dir / f"{self.run_id}.jsonl"

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        params = flat_params(params)  # as MLflow keeps them, without credentials
        self._send(lambda: super(MLflowLogger, self).log_hyperparams(params), {"kind": "params", "params": params})

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

        if not self.offline:
            try:
                self.experiment.log_artifacts(self.run_id, str(local_dir), artifact_path)
                return
            except Exception as error:  # noqa: BLE001 - any failure of the server or the network
                self._go_offline(error)
        self._keep(keep_copies())

    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        """Models to keep are logged; `ResumeCheckpoint`'s `last.ckpt` is a local resume aid and is not."""
        from medrpn.training.checkpointing import ResumeCheckpoint

        if not isinstance(checkpoint_callback, ResumeCheckpoint):
            super().after_save_checkpoint(checkpoint_callback)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if not self._initialized:
            return
        if not self.offline:
            try:
                super().finalize(status)
            except Exception as error:  # noqa: BLE001 - any failure of the server or the network
                self._go_offline(error)
            else:
                if status == "success":
                    self._register_best()
                return
        if self._checkpoint_callback:
            for _, path, _, _ in _scan_checkpoints(self._checkpoint_callback, {}):
                self._keep({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": Path(path).stem})
        self._keep({"kind": "status", "status": "FAILED" if status == "failed" else "FINISHED"})

    def _register_best(self) -> None:
        """The logged best checkpoint as a new version of `registered_model` (once per run: a
        fit's test stage finalizes the logger again)."""
        best = getattr(self._checkpoint_callback, "best_model_path", "") if self._checkpoint_callback else ""
        if not self.registered_model or self.registered_version is not None or not best:
            return
        from medrpn.training.registry import register_checkpoint

        try:
            self.registered_version = register_checkpoint(
                self.experiment, self.run_id, Path(best).stem, self.registered_model, self.registered_model_alias
            )
        except Exception as error:  # noqa: BLE001 - the run and its checkpoint are kept; only the registry entry is missing
            rank_zero_warn(
                f"The best checkpoint of run {self.run_id} was logged but not registered as model "
                f"{self.registered_model!r} ({_reason(error)}); register it from the run later"
            )
            return
        alias = f" (alias {self.registered_model_alias})" if self.registered_model_alias else ""
        print(
            f"medrpn: registered the best checkpoint as models:/{self.registered_model}/{self.registered_version}{alias} "
            f"in {self.tracking_uri}",
            flush=True,
        )

    def _send(self, send: Callable[[], None], entry: dict[str, Any]) -> None:
        if not self.offline:
            try:
                send()
                return
            except Exception as error:  # noqa: BLE001 - any failure of the server or the network
                self._go_offline(error)
        self._keep(entry)

    def _go_offline(self, error: Exception, new_run: bool = False) -> None:
        """Warns once and starts the outbox; `new_run`: the server never had the run, the sync creates it."""
        self.offline = True
        rank_zero_warn(
            f"MLflow tracking server {self.tracking_uri} failed ({_reason(error)}). "
            f"Training goes on; what is not logged to run {self.run_id} is kept in {self.outbox.resolve()}. "
            f"Send it later with: medrpn mlflow-sync {self.outbox}"
        )
        header = {"kind": "run", "tracking_uri": self.tracking_uri, "run_id": self.run_id}
        if new_run:
            header["new_run"] = {"experiment": self._experiment_name, "run_name": self._run_name, "tags": self.tags or {}}
        self._keep(header)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Logs `text` as the run's file `artifact_file` (kept in the outbox if the server is away)."""
        self._send(lambda: self.experiment.log_text(self.run_id, text, artifact_file),
                   {"kind": "text", "text": text, "artifact_file": artifact_file})

    def set_tags(self, tags: dict[str, str]) -> None:
        """Sets the run's tags (kept in the outbox if the server is away)."""
        def send() -> None:
            for key, value in tags.items():
                self.experiment.set_tag(self.run_id, key, value)

        self._send(send, {"kind": "tags", "tags": tags})

    def _keep(self, entry: dict[str, Any]) -> None:
        """Appends `entry` as one line, on disk when this returns. A line that a crash cut off is
        ended first, so the entry stays readable (the sync skips the cut one)."""
        self.outbox_dir.mkdir(parents=True, exist_ok=True)
        with open(self.outbox, "a+b") as f:
            if f.seek(0, os.SEEK_END) > 0 and f.seek(-1, os.SEEK_END) >= 0 and f.read(1) != b"\n":
                f.write(b"\n")  # ends the line a crash cut off
            f.write(json.dumps(entry).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())


def _credentials_to_environment(tracking_uri: str) -> str:
    """An HTTP(S) tracking URI without its `user:password@`, which become MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (a database URI keeps them: its driver reads them only from the URI)."""
    parts = urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https") or parts.username is None:
        return tracking_uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(parts.username)
    if parts.password is not None:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(parts.password)
    return redact_uri(tracking_uri)


def _reason(error: Exception) -> str:
    """Why a call to MLflow failed, in a few words without credentials: the operating system's
    reason where there is one ("[Errno 111] Connection refused"), else the message's first line."""
    text = redact_uri(str(error))
    errno = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    return (errno.group(0) if errno else f"{error.__class__.__name__}: {(text.splitlines() or [''])[0]}")[:200]


def _sqlite_lock(tracking_uri: str | None) -> contextlib.AbstractContextManager:
    """An inter-process lock beside an SQLite tracking store's file (a no-op for other stores)."""
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    from filelock import FileLock

    database = Path(tracking_uri.removeprefix("sqlite:///")).expanduser()
    return FileLock(f"{database}.lock", timeout=300)


def sync_outbox(path: str | Path, tracking_uri: str | None = None) -> dict[str, int]:
    """Sends an outbox file to its MLflow run; renames it `*.synced` when everything went through.

    Parameters that the run already has are skipped (MLflow parameters cannot change). A line that
    is not a whole entry (cut off when the writing process died) is skipped and named on stderr.
    """
    from mlflow.entities import Metric, Param

    path = Path(path)
    if not path.is_file():
        raise MedrpnError(f"{path}: no such outbox file")
    entries = _read_entries(path)
    header = next((e for e in entries if e["kind"] == "run"), None)
    if header is None:
        raise MedrpnError(f"{path}: not a medrpn MLflow outbox (no run line)")
    client = client_for(tracking_uri or header["tracking_uri"], create=True)
    if "new_run" in header:  # the server was away when the run started
        from medrpn.training.runs import new_run

        new = header["new_run"]
        run_id = new_run(client, new["experiment"], new["run_name"], new["tags"])
    else:
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
        elif entry["kind"] == "text":
            client.log_text(run_id, entry["text"], entry["artifact_file"])
            counts["artifacts"] += 1
        elif entry["kind"] == "tags":
            for key, value in entry["tags"].items():
                client.set_tag(run_id, key, value)
        elif entry["kind"] == "status":
            client.set_terminated(run_id, entry["status"])
    path.rename(path.with_suffix(".synced"))
    return counts


def _read_entries(path: Path) -> list[dict[str, Any]]:
    """The entries of an outbox file; a broken line is skipped, named on stderr."""
    entries = []
    for number, line in enumerate(path.read_text(errors="replace", encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            problem = None if isinstance(entry, dict) and "kind" in entry else "not an outbox entry"
        except json.JSONDecodeError as error:
            problem = f"cut off or damaged ({error.msg}, column {error.colno})"
        if problem:
            print(f"medrpn: warning: {path}, line {number}: {problem}, skipped: {line[:80]!r}", file=sys.stderr, flush=True)
        else:
            entries.append(entry)
    return entries

