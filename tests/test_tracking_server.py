"""MLflow for a team: a real `mlflow server` on 127.0.0.1, a training run that logs to it over
HTTP, the server stopped in the middle of training, and the outbox sent once it is back."""

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

from medrpn.synth import write_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


@pytest.mark.skipif(not MLFLOW.exists(), reason="the mlflow command is not installed beside this Python")
def test_training_survives_the_tracking_server_going_away(tmp_path):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    write_synthetic_dataset(tmp_path / "data", n_images=24, image_size=128, seed=3)
    server = _start_server(tmp_path, port)
    try:
        fit = subprocess.Popen(
            [sys.executable, "-m", "medrpn", "fit", "--config", str(REPO / "configs" / "demo.yaml"),
             "--data.annotations", str(tmp_path / "data" / "annotations.csv"), "--data.image_size", "128",
             "--data.num_workers", "0", "--data.val_fraction", "0.25", "--data.test_fraction", "0.25",
             "--model.backbone.fpn_channels", "32", "--trainer.max_epochs", "4",
             "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "1",
             "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.tracking_uri", uri,
             "--trainer.logger.init_args.run_name", "outage"],
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
        sync = subprocess.run([sys.executable, "-m", "medrpn", "mlflow-sync", str(outbox)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
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
    finally:
        _stop(server)
