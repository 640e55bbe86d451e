"""`medrpn synth --out DIR`: the built-in demo dataset (`medrpn.data.synth`) written as DICOM files."""

from __future__ import annotations

import argparse
from pathlib import Path

from medrpn.data.synth import write_synthetic_dataset


def main(argv: list[str]) -> None:
    """`medrpn synth --out DIR [--n-images N] [--image-size PX] [--pixel-spacing MM] [--seed S]`."""
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
