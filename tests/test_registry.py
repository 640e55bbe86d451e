"""The MLflow model registry on a real SQLite store: `fit` registers its best checkpoint, and
`predict` and `evaluate` take `models:/name/version` or `models:/name@alias` for `--ckpt`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from medrpn.errors import MedrpnError
from trained_run import REGISTERED_MODEL, TrainedRun, medrpn, trained_run


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory) -> TrainedRun:
    return trained_run(request, tmp_path_factory)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_fit_registers_its_best_checkpoint_as_a_model_version(trained: TrainedRun):
    from mlflow.tracking import MlflowClient

    assert f"registered the best checkpoint as models:/{REGISTERED_MODEL}/1 (alias candidate)" in trained.output
    client = MlflowClient(tracking_uri=trained.tracking_uri)
    version = client.get_model_version_by_alias(REGISTERED_MODEL, "candidate")
    run = client.get_run(version.run_id)
    assert str(version.version) == "1" and run.info.run_name == "eval-e2e"
    assert version.source.rstrip("/").endswith("/best")  # the run's logged best checkpoint
    # registered once, though fit's test stage finalizes the logger again
    assert len(client.search_model_versions(f"name='{REGISTERED_MODEL}'")) == 1


def test_predict_and_evaluate_run_a_registered_model(trained: TrainedRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # medrpn's download cache, not the user's
    images = trained.annotations.parent / "images"
    out = tmp_path / "findings"
    result = medrpn(
        "predict", "--ckpt", f"models:/{REGISTERED_MODEL}@candidate", "--tracking-uri", trained.tracking_uri,
        "--input", str(images), "--output", str(out), cwd=trained.work,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    downloaded = tmp_path / "cache" / "medrpn" / "models" / REGISTERED_MODEL / "1" / "best" / "best.ckpt"
    assert f"medrpn: models:/{REGISTERED_MODEL}@candidate is {downloaded}" in result.stdout
    assert _sha256(downloaded) == _sha256(trained.ckpt)  # the very checkpoint fit kept as best
    document = json.loads(next(out.rglob("findings.json")).read_text())
    assert document["model"]["checkpoint_sha256"] == _sha256(trained.ckpt)
    # evaluate by version number, from the store named in the environment; the copy is reused
    monkeypatch.setenv("MLFLOW_TRACKING_URI", trained.tracking_uri)
    evaluated = medrpn("evaluate", "--ckpt", f"models:/{REGISTERED_MODEL}/1", "--split", "val", cwd=trained.work)
    assert evaluated.returncode == 0, (evaluated.stdout + evaluated.stderr)[-3000:]
    assert f"medrpn evaluate: {downloaded} on the val split" in evaluated.stdout


def test_a_model_uri_the_registry_does_not_hold_is_one_clear_line(trained: TrainedRun, tmp_path: Path):
    missing = medrpn(
        "predict", "--ckpt", f"models:/{REGISTERED_MODEL}@production", "--tracking-uri", trained.tracking_uri,
        "--input", str(tmp_path), "--output", str(tmp_path / "out"), cwd=trained.work,
    )
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"medrpn: error: models:/{REGISTERED_MODEL}@production: the registry of {trained.tracking_uri} "
        f"has no model '{REGISTERED_MODEL}' with alias 'production'"
    )
    from medrpn.training.registry import resolve_checkpoint

    with pytest.raises(MedrpnError, match="not a model URI; give models:/NAME/VERSION or models:/NAME@ALIAS"):
        resolve_checkpoint("models:/only-a-name", trained.tracking_uri)


def test_registration_settings_are_checked_when_the_logger_is_made(tmp_path: Path):
    from medrpn.training.tracking_outbox import MLflowLogger

    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    with pytest.raises(MedrpnError, match="registered_model_alias needs registered_model"):
        MLflowLogger(tracking_uri=uri, log_model=True, registered_model_alias="candidate")
    with pytest.raises(MedrpnError, match="set log_model: true"):
        MLflowLogger(tracking_uri=uri, registered_model="brain")
