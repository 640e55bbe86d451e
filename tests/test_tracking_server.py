"""MLflow for a team: a real `mlflow server` on 127.0.0.1, a training run that logs to it over
HTTP, the server stopped in the middle of training, and the outbox sent once it is back. The
tracking URI carries a user and password (the server ignores them): none of it may be written
anywhere, neither in files nor in what is printed."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from medrpn.training.runs import redact_uri
from medrpn.data.synth import write_synthetic_dataset
from medrpn.training.tracking_outbox import MLflowLogger
from support import free_port, run_medrpn

REPO = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")
PASSWORD = "S3cretPw"
needs_mlflow = pytest.mark.skipif(not MLFLOW.exists(), reason="the mlflow command is not installed beside this Python")


@pytest.fixture(autouse=True)
def _restore_mlflow_credentials(monkeypatch):
    """A logger puts a URI's user and password into MLflow's variables; the other tests must not see them."""
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)


def _start_server(root: Path, port: int) -> subprocess.Popen:
    server = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(root / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.5)
    _stop(server)
    pytest.fail("mlflow server did not start within 90 s")


def _stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _logged(db: Path, key: str) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as connection:
        try:
            return connection.execute("select count(*) from metrics where key = ?", (key,)).fetchone()[0]
        except sqlite3.OperationalError:  # tables not created yet
            return 0


def _fit_args(tmp_path: Path, tracking_uri: str, epochs: int) -> list[str]:
    return [sys.executable, "-m", "medrpn", "fit", "--config", str(REPO / "configs" / "demo.yaml"),
            "--data.annotations", str(tmp_path / "data" / "annotations.csv"), "--data.image_size", "128",
            "--data.num_workers", "0", "--data.val_fraction", "0.25", "--data.test_fraction", "0.25",
            "--model.backbone.fpn_channels", "32", "--trainer.max_epochs", str(epochs),
            "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.tracking_uri", tracking_uri,
            "--trainer.logger.init_args.run_name", "outage"]


@needs_mlflow
def test_training_survives_the_tracking_server_going_away(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    write_synthetic_dataset(tmp_path / "data", n_images=24, image_size=128, seed=3)
    server = _start_server(tmp_path, port)
    try:
        fit = subprocess.Popen(
            _fit_args(tmp_path, f"http://mlflow:{PASSWORD}@127.0.0.1:{port}", epochs=4),
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        deadline = time.monotonic() + 300
        while _logged(tmp_path / "server.db", "val/cpm") < 1 and fit.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _logged(tmp_path / "server.db", "val/cpm") >= 1, "the first epoch never reached the server"
        _stop(server)  # the server goes away after the first validation
        output, _ = fit.communicate(timeout=600)
    finally:
        if server.poll() is None:
            _stop(server)
    assert fit.returncode == 0, output[-3000:]
    assert "Training goes on" in output and "medrpn mlflow-sync" in output
    assert (tmp_path / "demo" / "checkpoints" / "best.ckpt").is_file()  # checkpoints are local anyway
    (outbox,) = (tmp_path / "mlflow-outbox").glob("*.jsonl")

    server = _start_server(tmp_path, port)
    try:
        sync = run_medrpn("mlflow-sync", str(outbox), cwd=tmp_path, timeout=300)
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert not outbox.exists() and outbox.with_suffix(".synced").exists()
        client = mlflow.MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("medrpn-demo").experiment_id])
        assert run.info.status == "FINISHED"
        assert run.data.params["model/backbone/name"] == "resnet18"  # sent over HTTP before the outage
        assert len(client.get_metric_history(run.info.run_id, "val/cpm")) == 4  # 1 live + 3 from the outbox
        assert "test/froc_1fp" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts and "best" in artifacts
        # the credentials: in no parameter, file (config.yaml, checkpoints, outbox, the server's
        # store and artifacts) or printed line; where the URI is kept, it is kept without them
        assert run.data.params["trainer/logger/init_args/tracking_uri"] == uri
        config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path / "downloaded")))
        assert f"tracking_uri: {uri}" in config.read_text()
    finally:
        _stop(server)
    assert PASSWORD not in output and PASSWORD not in sync.stdout + sync.stderr
    assert not _files_holding(tmp_path, PASSWORD)
    best = torch.load(tmp_path / "demo" / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    assert best["mlflow_run"]["tracking_uri"] == uri


@needs_mlflow
def test_an_unreachable_tracking_server_stops_the_fit_in_one_line(tmp_path):
    write_synthetic_dataset(tmp_path / "data", n_images=8, image_size=128, seed=3)
    port = free_port()  # nothing listens there
    fit = subprocess.run(_fit_args(tmp_path, f"http://mlflow:{PASSWORD}@127.0.0.1:{port}", epochs=1),
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert fit.returncode == 2, fit.stderr[-3000:]
    assert f"medrpn: error: MLflow tracking server http://127.0.0.1:{port} failed when the run started" in fit.stderr
    assert "Connection refused" in fit.stderr and "Traceback" not in fit.stderr
    assert PASSWORD not in fit.stdout + fit.stderr
    assert not (tmp_path / "demo" / "checkpoints").exists()  # stopped before training


def _files_holding(root: Path, secret: str) -> list[Path]:
    """The files under `root` whose bytes hold `secret` (checkpoints store their pickles uncompressed)."""
    return [p for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


@needs_mlflow
def test_outbox_skips_a_cut_off_line_appends_after_it_and_holds_no_password(tmp_path, recwarn):
    port = free_port()
    server = _start_server(tmp_path, port)
    try:
        logger = MLflowLogger(
            experiment_name="cut", tracking_uri=f"http://mlflow:{PASSWORD}@127.0.0.1:{port}", outbox_dir=str(tmp_path / "outbox")
        )
        logger.log_metrics({"loss": 1.0}, step=0)  # sent
        _stop(server)
        logger.log_metrics({"loss": 2.0}, step=1)  # kept: the outbox's lines 1 (run) and 2
    finally:
        if server.poll() is None:
            _stop(server)
    with open(logger.outbox, "a") as f:
        f.write('{"kind": "metrics", "metrics": {"loss": 9')  # line 3: its process died while writing it
    logger.log_metrics({"loss": 3.0}, step=2)  # a resumed run appends to the same outbox

    server = _start_server(tmp_path, port)
    try:
        sync = run_medrpn("mlflow-sync", str(logger.outbox), cwd=tmp_path, timeout=300)
        assert sync.returncode == 0, sync.stderr[-3000:]
        assert f"{logger.outbox}, line 3: cut off or damaged" in sync.stderr and "Traceback" not in sync.stderr
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        history = sorted((m.step, m.value) for m in client.get_metric_history(logger.run_id, "loss"))
        assert history == [(0, 1.0), (1, 2.0), (2, 3.0)]
    finally:
        _stop(server)
    assert [str(w.message) for w in recwarn if "Training goes on" in str(w.message)]
    assert not [w for w in recwarn if PASSWORD in str(w.message)]
    assert PASSWORD not in sync.stdout + sync.stderr
    assert not _files_holding(tmp_path, PASSWORD)  # the outbox included


def test_redact_uri_strips_user_and_password_and_secret_query_values():
    assert redact_uri(f"postgresql://mlflow:{PASSWORD}@db:5432/mlflow") == "postgresql://db:5432/mlflow"
    assert redact_uri("https://h/m.ckpt?X-Amz-Credential=a&X-Amz-Signature=b&v=1") == (
        "https://h/m.ckpt?X-Amz-Credential=***&X-Amz-Signature=***&v=1"
    )
    assert redact_uri("s3://b/k?token=t&access_token=u#x") == "s3://b/k?token=***&access_token=***#x"
    message = f"API request to http://mlflow:{PASSWORD}@127.0.0.1:5000/api/2.0 failed"  # as MLflow words it
    assert redact_uri(message) == "API request to http://127.0.0.1:5000/api/2.0 failed"
    assert redact_uri("sqlite:///mlruns.db") == "sqlite:///mlruns.db"


@needs_mlflow
def test_a_run_whose_server_is_away_at_the_start_can_go_on_in_the_outbox(tmp_path):
    write_synthetic_dataset(tmp_path / "data", n_images=8, image_size=128, seed=3)
    port = free_port()  # the server starts only after training
    fit = subprocess.run(_fit_args(tmp_path, f"http://127.0.0.1:{port}", epochs=1)
                         + ["--trainer.logger.init_args.on_unreachable", "outbox"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    output = fit.stdout + fit.stderr
    assert fit.returncode == 0, output[-3000:]
    assert "Training goes on" in output and "medrpn mlflow-sync" in output
    (outbox,) = (tmp_path / "mlflow-outbox").glob("*.jsonl")
    server = _start_server(tmp_path, port)
    try:
        sync = run_medrpn("mlflow-sync", str(outbox), cwd=tmp_path, timeout=300)
        assert sync.returncode == 0, sync.stderr[-3000:]
        client = mlflow.MlflowClient(f"http://127.0.0.1:{port}")
        (run,) = client.search_runs([client.get_experiment_by_name("medrpn-demo").experiment_id])  # made by the sync
        assert run.info.run_name == "outage" and run.info.status == "FINISHED"
        assert run.data.params["trainer/logger/init_args/on_unreachable"] == "outbox"
        assert "val/cpm" in run.data.metrics and "test/cpm" in run.data.metrics
        assert len(run.data.tags["medrpn.config_sha256"]) == 64
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert "config.yaml" in artifacts and "best" in artifacts
    finally:
        _stop(server)
