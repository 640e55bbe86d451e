"""`medrpn synth --out DIR`: the built-in demo dataset (`medrpn.data.synth`) written as DICOM files;
with `--volumes N`, N synthetic MR-like volumes instead (`medrpn.data.synth_volumes`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> None:
    """`medrpn synth --out DIR [--n-images N] [--image-size PX] [--pixel-spacing MM] [--seed S] [--volumes N]`."""
    parser = argparse.ArgumentParser(prog="medrpn synth", description="Write the synthetic DICOM lesion dataset.")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--n-images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--pixel-spacing", type=float, default=0.5, help="millimetres per pixel")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--volumes", type=int, default=None, metavar="N",
        help="write N MR-like volumes (DICOM series and NIfTI, 96 x 96 x 32 voxels of 0.9 x 0.9 x 3 mm) with "
        "csv3d boxes and lesion masks, instead of radiographs",
    )
    args = parser.parse_args(argv)
    if args.volumes is not None:
        from medrpn.data.synth_volumes import write_synthetic_volumes

        print(write_synthetic_volumes(args.out, n_volumes=args.volumes, seed=args.seed))
        return
    from medrpn.data.synth import write_synthetic_dataset

    summary = write_synthetic_dataset(
        args.out, n_images=args.n_images, image_size=args.image_size, pixel_spacing_mm=args.pixel_spacing, seed=args.seed
    )
    print(summary)
