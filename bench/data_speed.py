"""Images per second through the data pipeline: reading alone, the first epoch, and a later epoch.

    python bench/data_speed.py [--n-images 32] [--size 2048] [--image-size 512] [--workers 2]

A folder of synthetic 16-bit DX files (`medrpn.data.synth`, `--size` pixels square, 12 bits stored)
is read four ways:

1. reading alone: `medrpn.data.io.read_image` (plain pydicom: decode, modality LUT, window) over
   every file, and MONAI's `LoadImage` over the same files, for comparison;
2. the first epoch of `LesionDataModule` (setup, which decodes, windows, resizes to
   `--image-size` and caches every image, then one pass of the training loader with
   augmentation), for the memory and the disk cache;
3. a later epoch: the same loader again (its workers kept, as Lightning keeps them), and the
   first epoch of a new data module on the filled disk cache (a later run).

Data time is the wall-clock time to draw every batch of the training loader (no model). The
later epoch must take at most a fifth of the first; the script says whether it does. The
machine's load average is printed beside the figures (they are only comparable on the same load).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from medrpn.data.cache import CacheConfig
from medrpn.data.datamodule import LesionDataModule
from medrpn.data.io import read_image
from medrpn.data.synth import write_synthetic_dataset


def _rate(n: int, seconds: float) -> str:
    return f"{n / seconds:7.1f} images/s ({seconds:6.2f} s for {n})"


def _epoch(loader) -> tuple[int, float]:
    start = time.perf_counter()
    n = sum(len(batch["images"]) for batch in loader)
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--size", type=int, default=2048, help="side of the DICOM files")
    parser.add_argument("--image-size", type=int, default=512, help="network input side")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic_dataset(root / "data", n_images=args.n_images, image_size=args.size, seed=0)
        files = sorted((root / "data" / "images").glob("*.dcm"))
        print(f"{len(files)} DICOM files, {args.size}x{args.size} 16-bit; input {args.image_size} px; "
              f"{args.workers} workers; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")

        for path in files:  # both readers then find the files in the OS cache: decoding is compared, not the disk
            path.read_bytes()
        start = time.perf_counter()
        for path in files:
            read_image(path)
        ours = time.perf_counter() - start
        print(f"reading alone, medrpn (pydicom)   {_rate(len(files), ours)}")
        from monai.transforms import LoadImage  # imported here: MONAI's import alone takes seconds

        load = LoadImage(image_only=True)
        start = time.perf_counter()
        for path in files:
            load(str(path))
        monai = time.perf_counter() - start
        print(f"reading alone, MONAI LoadImage    {_rate(len(files), monai)}  ({monai / ours:.1f}x medrpn's time, "
              "for decoding only: no window, no MONOCHROME1)")

        common = dict(
            annotations=str(root / "data" / "annotations.csv"),
            image_size=args.image_size,
            batch_size=4,
            num_workers=args.workers,
            val_fraction=0.0,
            test_fraction=0.0,
        )
        for mode in ("memory", "disk"):
            cache = CacheConfig(mode=mode, dir=str(root / "cache"))
            dm = LesionDataModule(**common, cache=cache)
            start = time.perf_counter()
            dm.setup("fit")  # decodes, windows, resizes and caches every image (in the workers)
            loader = dm.train_dataloader()  # created once, workers kept between epochs, as in training
            n, _ = _epoch(loader)
            first = time.perf_counter() - start
            n, later = _epoch(loader)
            verdict = "ok" if later <= first / 5 else "SLOWER than 1/5"
            print(f"{mode:<6} cache, first epoch      {_rate(n, first)}")
            print(f"{mode:<6} cache, later epoch      {_rate(n, later)}  ({later / first:.2f} of the first: {verdict})")
        dm = LesionDataModule(**common, cache=CacheConfig(mode="disk", dir=str(root / "cache")))
        start = time.perf_counter()
        dm.setup("fit")  # a later run: finds every image in the disk cache
        n, _ = _epoch(dm.train_dataloader())
        print(f"disk   cache, a later run's first epoch {_rate(n, time.perf_counter() - start)}")

if __name__ == "__main__":
    main()
