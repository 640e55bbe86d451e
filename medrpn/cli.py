"""The `medrpn` command.

Training subcommands (fit, validate, test) come from LightningCLI (`medrpn.training.cli`): every
setting lives in YAML (`--config configs/demo.yaml`), can be overridden on the command line and
printed with `--print_config`. check-data, plan, evaluate and fit-crops read that config with the
same parser (`medrpn.commands.config_parser`). Each of the other subcommands is the `main` of its module,
imported only when called so that they start quickly:

    medrpn synth --out DIR                                       the synthetic DICOM demo dataset
    medrpn check-data --config CFG                               what a dataset holds, before training
    medrpn plan --config CFG [--output NEW.yaml]                 anchors planned from the training boxes
    medrpn predict --ckpt CKPT --input FILE_OR_DIR --output DIR  findings, DICOM SR and GSPS for new scans
    medrpn serve --ckpt CKPT --output DIR [--destination AE@HOST:PORT]  a DICOM node: studies in, SR + GSPS back
    medrpn export --ckpt CKPT --output model.onnx                the detector as ONNX, checked against the checkpoint
    medrpn review --findings DIR [--input SCANS]                 a page to confirm / reject findings, marks as CSV
    medrpn evaluate --ckpt CKPT [--config CFG] [--split val|test] the full evaluation table, into the run
    medrpn fit-crops --ckpt CKPT [--config CFG]                  a second-stage crop classifier
    medrpn compare RUN [RUN ...]                                 runs side by side, FROC curves overlaid
    medrpn mlflow-sync OUTBOX                                    send what a run kept while its server was away
"""

from __future__ import annotations

import importlib
import sys

from medrpn.errors import MedrpnError

# Subcommands that need no training config: name -> module whose main(argv) runs it.
TOOLS: dict[str, str] = {
    "synth": "medrpn.commands.synth",
    "check-data": "medrpn.commands.check_data",
    "plan": "medrpn.commands.plan",
    "fit-crops": "medrpn.commands.fit_crops",
    "predict": "medrpn.commands.predict",
    "serve": "medrpn.commands.serve",
    "export": "medrpn.commands.export",
    "review": "medrpn.commands.review",
    "evaluate": "medrpn.commands.evaluate",
    "compare": "medrpn.commands.compare",
    "mlflow-sync": "medrpn.commands.mlflow_sync",
}


def main(argv: list[str] | None = None) -> None:
    """Runs the command given by `argv` (default: the process's command line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if args and args[0] in TOOLS:
            return importlib.import_module(TOOLS[args[0]]).main(args[1:])
        from medrpn.training.cli import run

        run(None if argv is None else args)  # None: LightningCLI reads the command line itself
    except MedrpnError as error:
        print(f"medrpn: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
