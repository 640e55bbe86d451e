"""What medrpn's evaluation and comparison say to MLflow (training metrics go through Lightning's
``MLFlowLogger``; the config goes through ``medrpn.training.tracking``).

- an evaluation report as metrics and as artifacts (table, JSON, FROC / precision-recall /
  proposal-recall plots) in a run;
- the run a checkpoint came from (its id is stored in the checkpoint; a checkpoint kept under a
  run's artifact folder names it in its path), or a new run when there is none;
- runs named by id or by name, for ``medrpn compare``;
- ``redact_uri``: a URI (or a message that holds one) without its credentials, for whatever is
  logged, saved or printed: ``postgresql://user:password@db/mlflow`` must not end up in parameters,
  config files, checkpoints or logs.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from medrpn.metrics import plots
from medrpn.errors import MedrpnError
from medrpn.metrics.report import EvaluationReport

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
_RUN_ID = re.compile(r"[0-9a-f]{32}")
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@?#'\"]+@")
_SECRET_QUERY = re.compile(
    r"(?P<name>[?&][^=&\s#'\"]*(?:token|password|passwd|pwd|secret|key|sig|credential|auth)[^=&\s#'\"]*=)[^&\s#'\"]*",
    re.IGNORECASE,
)


def redact_uri(text: str) -> str:
    """`text` (a URI, or a message or config that holds URIs) without credentials: the
    `user:password@` of every URI is removed, and the value of every query parameter named like a
    secret (token, access_token, password, api_key, sig, X-Amz-Credential, ...) becomes `***`."""
    return _SECRET_QUERY.sub(r"\g<name>***", _USERINFO.sub(r"\g<scheme>", text))


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with a relative SQLite or file path made absolute, so it still works from elsewhere."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    return uri


def client_for(uri: str, create: bool = False) -> MlflowClient:
    """The one way medrpn makes an MLflow client: of the store at ``uri``. A missing SQLite file
    is an error, not a new empty store, unless ``create`` (then its folder is made)."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
        elif not path.is_file():
            raise MedrpnError(f"{path}: no MLflow store here (give --tracking-uri)")
    return MlflowClient(tracking_uri=uri)


def write_report_files(report: EvaluationReport, folder: Path, title: str) -> list[Path]:
    """The report's table, JSON and three plots, written into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.txt").write_text(report.to_table() + "\n", encoding="utf-8")
    (folder / "report.json").write_text(report.to_json(), encoding="utf-8")
    return [
        folder / "metrics.txt",
        folder / "report.json",
        plots.save(plots.froc_figure(report, f"FROC, {title}"), folder / "froc.png"),
        plots.save(plots.precision_recall_figure(report, f"Precision-recall at IoU 0.5, {title}"), folder / "precision_recall.png"),
        plots.save(plots.proposal_recall_figure(report, f"RPN proposal recall at IoU 0.5, {title}"), folder / "proposal_recall.png"),
    ]


def log_report_artifacts(client: MlflowClient, run_id: str, report: EvaluationReport, artifact_path: str) -> None:
    """Writes the report files under ``artifact_path`` of the run (e.g. ``evaluation/test``)."""
    with tempfile.TemporaryDirectory() as tmp:
        write_report_files(report, Path(tmp), artifact_path.rsplit("/", 1)[-1])
        client.log_artifacts(run_id, tmp, artifact_path)


def log_report_metrics(client: MlflowClient, run_id: str, report: EvaluationReport, prefix: str, step: int = 0) -> int:
    """Logs the report's scalars as ``{prefix}/{name}`` (nan left out); returns how many."""
    now = int(time.time() * 1000)
    metrics = [
        Metric(f"{prefix}/{key}", float(value), now, step)
        for key, value in report.scalars.items()
        if value == value  # not nan
    ]
    for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[start : start + 1000])
    return len(metrics)


def checkpoint_run(client: MlflowClient, ckpt_path: str | Path, stored: dict[str, Any] | None) -> str | None:
    """The id of the run ``ckpt_path`` came from, if the store has it.

    Looks at the run id stored in the checkpoint first, then at folder names in its path that
    look like run ids (MLflow keeps a run's artifacts under ``<experiment>/<run id>/artifacts``).
    """
    candidates = [stored["run_id"]] if stored and stored.get("run_id") else []
    candidates += [p.name for p in Path(ckpt_path).resolve().parents if _RUN_ID.fullmatch(p.name)]
    for run_id in candidates:
        try:
            return client.get_run(run_id).info.run_id
        except MlflowException:
            continue
    return None


def new_run(client: MlflowClient, experiment_name: str, run_name: str, tags: dict[str, str] | None = None) -> str:
    """Creates a run (and its experiment if needed) and returns its id.

    A new experiment in a SQLite store keeps its artifacts in ``mlruns/`` beside the database
    file, not in whatever folder the command happens to run in (MLflow's default).
    """
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is not None:
        experiment_id = experiment.experiment_id
    else:
        experiment_id = client.create_experiment(experiment_name, artifact_location=artifact_location(client.tracking_uri))
    return client.create_run(experiment_id, run_name=run_name, tags=tags or {}).info.run_id


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment of the store at ``tracking_uri`` keeps its artifacts: ``mlruns/``
    beside an SQLite file; None (the server's choice) for other stores."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlruns").as_uri()
    return None


def resolve_run(client: MlflowClient, ref: str) -> tuple[Run, str | None]:
    """The run with id ``ref``, or else the newest run named ``ref`` in any experiment.

    Returns the run and a note when the name was ambiguous.
    """
    if _RUN_ID.fullmatch(ref):
        try:
            return client.get_run(ref), None
        except MlflowException:
            pass
    experiment_ids = [e.experiment_id for e in client.search_experiments()]
    escaped = ref.replace("'", "\\'")
    runs = client.search_runs(
        experiment_ids, filter_string=f"attributes.run_name = '{escaped}'", order_by=["attributes.start_time DESC"]
    ) if experiment_ids else []
    if not runs:
        raise MedrpnError(f"{ref}: no run with this id or name in {redact_uri(client.tracking_uri)}")
    note = None
    if len(runs) > 1:
        note = f"{len(runs)} runs are named '{ref}'; using the newest, {runs[0].info.run_id}"
    return runs[0], note
