"""The MLflow model registry: a run's best checkpoint registered as a version of a named model,
and `models:/name/version` or `models:/name@alias` accepted wherever a checkpoint is.

`fit` registers when its logger names a model (`trainer.logger.init_args.registered_model`,
optionally `registered_model_alias`, e.g. "candidate"): at the end of a successful fit, after the
best checkpoint was logged to the run (`log_model: true`), a new version of that model is created
with the run's logged checkpoint as its source. A team then moves an alias such as "production"
to the version it has reviewed (MLflow's UI or `MlflowClient.set_registered_model_alias`), and
`medrpn predict --ckpt models:/brain@production` always runs the reviewed one.

A model URI is resolved in the tracking store (`--tracking-uri`, else MLFLOW_TRACKING_URI, else
medrpn's default `sqlite:///mlruns.db`), and the version's checkpoint is downloaded once into
`$XDG_CACHE_HOME/medrpn/models/<name>/<version>/` (else `~/.cache/...`): versions do not change,
so a later run reads the copy.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from medrpn.errors import MedrpnError

PREFIX = "models:/"
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))/?$")


def is_model_uri(value: str | Path) -> bool:
    """Whether `value` names a registered model rather than a checkpoint file."""
    return str(value).startswith(PREFIX)


def register_checkpoint(client, run_id: str, artifact_path: str, name: str, alias: str | None = None) -> str:
    """Registers the run's logged checkpoint folder `artifact_path` as a new version of model
    `name` (created if new), pointing `alias` at it when given; returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="medrpn lesion detector (checkpoints written by `medrpn fit`)")
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
    version = client.create_model_version(name, source, run_id=run_id, description=f"best checkpoint of run {run_id}")
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def cache_root() -> Path:
    """Where downloaded model versions are kept."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "medrpn" / "models"


def resolve_checkpoint(uri: str, tracking_uri: str | None = None) -> Path:
    """The local checkpoint file of the registered model version `uri` (downloaded once).

    Raises:
        MedrpnError: naming the URI and the store: malformed, no such model, version or alias,
            or a version whose files hold no single checkpoint.
    """
    from medrpn.training.runs import DEFAULT_TRACKING_URI, client_for, redact_uri

    match = _URI.match(str(uri))
    if not match:
        raise MedrpnError(f"{uri}: not a model URI; give models:/NAME/VERSION or models:/NAME@ALIAS")
    tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    client = client_for(tracking_uri)
    name, number, alias = match["name"], match["version"], match["alias"]
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version(name, number) if number else client.get_model_version_by_alias(name, alias)
    except MlflowException:
        what = f"version {number}" if number else f"alias {alias!r}"
        raise MedrpnError(f"{uri}: the registry of {redact_uri(tracking_uri)} has no model {name!r} with {what}") from None
    folder = cache_root() / name / str(version.version)
    found = sorted(folder.rglob("*.ckpt")) if folder.is_dir() else []
    if not found:
        import mlflow.artifacts

        folder.mkdir(parents=True, exist_ok=True)
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(folder), tracking_uri=tracking_uri)
        except (MlflowException, OSError) as error:
            raise MedrpnError(f"{uri}: version {version.version}'s files ({version.source}) could not be read: {error}") from None
        found = sorted(folder.rglob("*.ckpt"))
    if len(found) != 1:
        raise MedrpnError(f"{uri}: version {version.version}'s files ({version.source}) hold {len(found)} checkpoints, not one")
    return found[0]


def with_local_checkpoint(argv: list[str]) -> list[str]:
    """`argv` of a command that takes `--ckpt`, with a model URI there replaced by the version's
    downloaded checkpoint (resolved in the store of the command's `--tracking-uri`, if given)."""
    values = _option_values(argv)
    ckpt = values.get("--ckpt")
    if ckpt is None or not is_model_uri(ckpt[1]):
        return argv
    local = str(resolve_checkpoint(ckpt[1], values.get("--tracking-uri", (None, None))[1]))
    print(f"medrpn: {ckpt[1]} is {local}", flush=True)
    out = list(argv)
    index = ckpt[0]
    out[index] = f"--ckpt={local}" if out[index].startswith("--ckpt=") else local
    return out


def _option_values(argv: list[str]) -> dict[str, tuple[int, str]]:
    """Each `--name value` or `--name=value` of `argv`: (index of the value's item, value)."""
    found: dict[str, tuple[int, str]] = {}
    for i, item in enumerate(argv):
        if item.startswith("--") and "=" in item:
            name, value = item.split("=", 1)
            found[name] = (i, value)
        elif item.startswith("--") and i + 1 < len(argv):
            found[item] = (i + 1, argv[i + 1])
    return found
