"""`medrpn export`: a checkpoint as an ONNX model (`medrpn.inference.onnx_export`).

    medrpn export --ckpt CKPT --output model.onnx [--format onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="medrpn export",
        description="Export a trained 2D detector to ONNX: the whole detector for one image (backbone to final NMS), "
        "its preprocessing, classes and operating point in the model's metadata. The exported model is run against "
        "the checkpoint on test inputs before it is written. `medrpn predict/serve --ckpt model.onnx` run it with "
        "ONNX Runtime.",
    )
    parser.add_argument("--ckpt", required=True, type=Path,
                        help="checkpoint written by `medrpn fit`, or models:/NAME/VERSION or models:/NAME@ALIAS")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of a models:/ --ckpt (as `medrpn predict`)")
    parser.add_argument("--output", required=True, type=Path, help="the .onnx file to write")
    parser.add_argument("--format", choices=["onnx"], default="onnx", help="onnx (the only format so far)")
    args = parser.parse_args(argv)
    if str(args.ckpt).startswith("models:/"):
        from medrpn.training.registry import with_local_checkpoint

        args = parser.parse_args(with_local_checkpoint(argv))
    if not args.ckpt.is_file():
        parser.error(f"--ckpt {args.ckpt}: no such file")
    if args.output.suffix.lower() != ".onnx":
        parser.error(f"--output {args.output}: name it *.onnx (predict and serve know an exported model by it)")
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        parser.error("exporting needs onnx and onnxruntime: pip install 'medrpn[onnx]'")
    from medrpn.inference.onnx_export import PARITY, export_onnx

    report = export_onnx(args.ckpt, args.output)
    print(
        f"medrpn export: {report.path} written; on {report.detections_compared} detections of the test inputs it "
        f"differs from the checkpoint by at most {report.max_box_difference:.2g} px in a box corner and "
        f"{report.max_score_difference:.2g} in a score (allowed: {PARITY['boxes_px']} px, {PARITY['scores']})",
        flush=True,
    )
