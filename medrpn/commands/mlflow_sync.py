"""`medrpn mlflow-sync OUTBOX`: sends what a run kept in its outbox while its MLflow server was away
(`medrpn.training.tracking_outbox`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from medrpn.training.tracking_outbox import sync_outbox


def main(argv: list[str]) -> None:
    """`medrpn mlflow-sync OUTBOX [OUTBOX ...]`."""
    parser = argparse.ArgumentParser(prog="medrpn mlflow-sync", description="Send kept MLflow outbox files to their runs.")
    parser.add_argument("outbox", nargs="+", type=Path, help="outbox file(s) written by a run whose server went away")
    parser.add_argument("--tracking-uri", help="send to this tracking URI instead of the one the run used")
    args = parser.parse_args(argv)
    for path in args.outbox:
        counts = sync_outbox(path, args.tracking_uri)
        print(f"{path}: sent {counts['metrics']} metric values, {counts['params']} parameters, {counts['artifacts']} artifacts")
