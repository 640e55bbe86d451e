"""The `medrpn` command.

Training subcommands (fit, validate, test) come from `LightningCLI`: every setting lives in YAML
(`--config configs/demo.yaml`), can be overridden on the command line (`--trainer.max_epochs 3`)
and printed (`--print_config`). `fit` ends by evaluating the best checkpoint on the held-out test
split, in the same MLflow run. Two subcommands need no training config and have small parsers:

    medrpn synth --out DIR                                       the synthetic DICOM demo dataset
    medrpn predict --ckpt CKPT --input FILE_OR_DIR --output DIR  findings for new images
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from jsonargparse import lazy_instance

from medrpn.data.datamodule import LesionDataModule
from medrpn.errors import MedrpnError
from medrpn.tracking import MLflowConfigLogger, describe_run
from medrpn.training import LesionDetectionModule

class MedrpnCLI(LightningCLI):
    """LightningCLI with medrpn's links and an evaluation of the held-out split after `fit`."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        # Every run is tracked in MLflow (an SQLite file in the working directory unless the
        # config names a server), and the checkpoint with the best validation CPM is kept.
        parser.set_defaults(
            {
                "trainer.logger": lazy_instance(
                    MLFlowLogger, experiment_name="medrpn", tracking_uri="sqlite:///mlruns.db", log_model=True
                ),
                "trainer.callbacks": [
                    lazy_instance(ModelCheckpoint, monitor="val/cpm", mode="max", save_top_k=1, filename="best-{epoch}"),
                    lazy_instance(LearningRateMonitor, logging_interval="step"),
                ],
                "trainer.default_root_dir": "runs",
            }
        )

    def after_fit(self) -> None:
        trainer, datamodule = self.trainer, self.datamodule
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or None
        test_metrics = {}
        if datamodule.splits["test"] and not trainer.fast_dev_run:
            trainer.test(self.model, datamodule=datamodule, ckpt_path=best, verbose=False)
            test_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
        if trainer.is_global_zero:
            _print_fit_summary(trainer, best, test_metrics)


def _print_fit_summary(trainer, best: str | None, test_metrics: dict[str, float]) -> None:
    lines = ["", "medrpn fit finished."]
    run = describe_run(trainer)
    if run:
        lines.append(f"  MLflow run      {run['run_id']} (experiment '{run['experiment']}') in {run['tracking_uri']}")
        lines.append(f"                  see it with: mlflow ui --backend-store-uri {run['tracking_uri']}")
    if best:
        lines.append(f"  best checkpoint {Path(best).resolve()}")
    if test_metrics:
        def fmt(key: str) -> str:
            value = test_metrics.get(f"test/{key}", math.nan)
            return "n/a" if math.isnan(value) else f"{value:.3f}"

        lines.append(
            f"  held-out test   FROC sensitivity at 1 FP/image = {fmt('froc_1fp')}, CPM = {fmt('cpm')}, "
            f"mAP@0.5 = {fmt('map50')}, RPN recall@100 = {fmt('rpn_recall100')}"
        )
    print("\n".join(lines), flush=True)


def _synth_main(argv: list[str]) -> None:
    from medrpn.synth import write_synthetic_dataset

    parser = argparse.ArgumentParser(prog="medrpn synth", description="Write the synthetic DICOM lesion dataset.")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n-images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--pixel-spacing", type=float, default=0.5, help="millimetres per pixel")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = write_synthetic_dataset(
        args.out, n_images=args.n_images, image_size=args.image_size, pixel_spacing_mm=args.pixel_spacing, seed=args.seed
    )
    print(summary)


def _predict_main(argv: list[str]) -> None:
    from medrpn.predict import predict_files

    parser = argparse.ArgumentParser(
        prog="medrpn predict", description="Find lesions in new images: findings JSON and overlay PNG per image."
    )
    parser.add_argument("--ckpt", required=True, type=Path, help="checkpoint written by `medrpn fit`")
    parser.add_argument("--input", required=True, type=Path, help="an image file or a folder of them (DICOM, PNG, JPEG)")
    parser.add_argument("--output", required=True, type=Path, help="folder for the findings")
    parser.add_argument("--score-threshold", type=float, default=0.5, help="keep findings scoring at least this")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args(argv)
    predict_files(args.ckpt, args.input, args.output, score_threshold=args.score_threshold, batch_size=args.batch_size)


# Subcommands that need no training config: name -> function taking the remaining arguments.
TOOLS: dict[str, Callable[[list[str]], None]] = {
    "synth": _synth_main,
    "predict": _predict_main,
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in TOOLS:
            return TOOLS[argv[0]](argv[1:])
        MedrpnCLI(
            LesionDetectionModule,
            LesionDataModule,
            save_config_callback=MLflowConfigLogger,
            save_config_kwargs={"overwrite": True},
            args=argv,
        )
    except MedrpnError as error:
        print(f"medrpn: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
