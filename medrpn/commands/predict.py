"""`medrpn predict`: the command line of `medrpn.inference.predict.predict_files`.

Only the argument parser lives here, so that `medrpn predict --help` and a mistyped option answer
at once: torch, torchvision and Lightning are imported once the arguments are known.
"""

from __future__ import annotations

import argparse
from pathlib import Path

FLIPS = ("horizontal", "vertical")  # medrpn.model.flip_proposals.FLIP_DIMS (not imported: it loads torch)


def main(argv: list[str]) -> None:
    """`medrpn predict --ckpt CKPT --input FILE_OR_DIR --output DIR [...]`."""
    parser = argparse.ArgumentParser(
        prog="medrpn predict",
        description="Find lesions in new images. Per DICOM study: findings JSON, DICOM SR (TID 1500), "
        "GSPS and overlay PNGs; per folder of PNG/JPEG/NIfTI images: findings JSON and overlays.",
    )
    parser.add_argument(
        "--ckpt", required=True, type=Path,
        help="checkpoint written by `medrpn fit`, a model exported by `medrpn export` (.onnx, run with ONNX Runtime), "
        "or a registered model: models:/NAME/VERSION or models:/NAME@ALIAS",
    )
    parser.add_argument(
        "--tracking-uri", default=None,
        help="MLflow store whose registry a models:/ --ckpt is looked up in (default: MLFLOW_TRACKING_URI, else sqlite:///mlruns.db)",
    )
    parser.add_argument(
        "--input", required=True, type=Path, help="an image file or a folder tree of them (DICOM, PNG, JPEG, NIfTI)"
    )
    parser.add_argument("--output", required=True, type=Path, help="folder for the outputs (one subfolder per study)")
    parser.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="keep findings scoring at least this (default: the checkpoint's operating point, else 0.5)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass")
    parser.add_argument(
        "--num-workers", type=int, default=None, help="reader processes (default: CPU cores - 1, at most 4; 0: none)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: keep them)")
    parser.add_argument(
        "--proposals",
        action="store_true",
        help="also write every RPN proposal (original pixels, mm, objectness; no threshold) to proposals.json "
        "per output folder, for a second stage of your own",
    )
    parser.add_argument(
        "--second-stage", type=Path, default=None, metavar="CKPT",
        help="a crop classifier from `medrpn fit-crops` that re-scores / re-labels the detections "
        "(its operating point then sets the default threshold)",
    )
    parser.add_argument(
        "--proposals-per-image", type=int, default=None, metavar="N",
        help="RPN proposals kept per image after NMS (default: the checkpoint's rpn.post_nms_top_n_test); "
        "more for a candidate generator feeding your own second stage",
    )
    parser.add_argument(
        "--proposal-nms", type=float, default=None, metavar="IOU",
        help="NMS IoU of the RPN's proposals (default: the checkpoint's rpn.nms_thresh); higher keeps more "
        "overlapping boxes, which can raise proposal recall (docs/rpn_ablation.md)",
    )
    parser.add_argument(
        "--test-flips", nargs="+", choices=FLIPS, default=None,
        help="also propose on these mirrored copies of each image and merge (default: the checkpoint's "
        "rpn.test_flips); one more backbone pass each",
    )
    parser.add_argument(
        "--max-decoded-bytes", type=int, default=None, metavar="BYTES",
        help="skip image files whose header declares more decoded pixel data, a guard against decompression "
        "bombs (default: the checkpoint's data.read.max_decoded_bytes, 1 GiB unless set in training)",
    )
    parser.add_argument(
        "--anonymize-paths", action="store_true",
        help="write no file or folder name of the input and no checkpoint path: images are named by their "
        "SOP Instance UID (DICOM) or a hash of their path, the checkpoint by its SHA-256",
    )
    args = parser.parse_args(argv)
    if str(args.ckpt).startswith("models:/"):  # a registered model: its checkpoint (MLflow loads only then)
        from medrpn.training.registry import with_local_checkpoint

        args = parser.parse_args(with_local_checkpoint(argv))
    if _is_volume_checkpoint(args.ckpt):
        _predict_volumes(parser, args)
        return
    from medrpn.inference.predict import predict_files  # torch and Lightning: only once there is work to do

    predict_files(
        args.ckpt,
        args.input,
        args.output,
        score_threshold=args.score_threshold,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        overwrite=args.overwrite,
        proposals=args.proposals,
        second_stage=args.second_stage,
        proposals_per_image=args.proposals_per_image,
        proposal_nms=args.proposal_nms,
        test_flips=args.test_flips,
        max_decoded_bytes=args.max_decoded_bytes,
        anonymize_paths=args.anonymize_paths,
    )


# predict options that only images have so far
_IMAGE_ONLY = ("proposals", "second_stage", "proposals_per_image", "proposal_nms", "test_flips", "anonymize_paths")


def _is_volume_checkpoint(ckpt: Path) -> bool:
    """Whether `ckpt` is a 3D model's (its settings say `spatial_dims: 3`); read without its weights."""
    if not ckpt.is_file() or ckpt.suffix.lower() == ".onnx":
        return False  # predict_files says so, in its words; an exported model is a 2D detector
    from medrpn.training.checkpoint_file import read_checkpoint

    return (read_checkpoint(ckpt, mmap=True).get("hyper_parameters") or {}).get("spatial_dims") == 3


def _predict_volumes(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A 3D checkpoint: findings per scan (`medrpn.inference.predict_volumes`)."""
    given = [f"--{name.replace('_', '-')}" for name in _IMAGE_ONLY if getattr(args, name) not in (None, False)]
    if given:
        parser.error(f"{', '.join(given)}: not available for volumes yet ({args.ckpt} is a 3D model)")
    from medrpn.inference.predict_volumes import predict_volumes

    predict_volumes(
        args.ckpt, args.input, args.output, score_threshold=args.score_threshold, overwrite=args.overwrite,
        max_decoded_bytes=args.max_decoded_bytes,
    )
