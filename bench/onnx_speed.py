"""Images per second of the detector alone: PyTorch against the same model exported to ONNX and run
by ONNX Runtime (`medrpn export`), one image at a time as the exported graph takes them.

    python bench/onnx_speed.py [--ckpt CKPT] [--image-size 256] [--n-images 64] [--threads 2]

Without ``--ckpt`` the model is the demo architecture (ResNet-18 FPN, 64 channels) with untrained
weights. The inputs are lesion-like test images (`medrpn.inference.onnx_export.parity_inputs`
with noise), the same for both; the export's own parity check runs first.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from predict_speed import _demo_checkpoint  # bench/predict_speed.py, beside this script

from medrpn.inference.onnx_export import export_onnx
from medrpn.inference.onnx_model import OnnxDetector
from medrpn.training.lightning_module import module_from_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, default=None)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--n-images", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or _demo_checkpoint(Path(tmp) / "model.ckpt", args.image_size, findings_per_image=100)
        start = time.perf_counter()
        report = export_onnx(ckpt, Path(tmp) / "model.onnx")
        export_s = time.perf_counter() - start
        module = module_from_checkpoint(ckpt).eval()
        onnx = OnnxDetector(report.path, threads=args.threads)
        size = onnx.metadata["image_size"]
        channels = onnx.metadata["input_channels"]
        generator = torch.Generator().manual_seed(0)
        images = [torch.rand(1, channels, size, size, generator=generator) for _ in range(args.n_images)]
        rates = {}
        for name, model in (("PyTorch", module), ("ONNX Runtime", onnx)):
            with torch.inference_mode():
                model(images[0])  # warm-up
                start = time.perf_counter()
                for image in images:
                    model(image)
                rates[name] = len(images) / (time.perf_counter() - start)
        print(f"{args.n_images} images of {size}x{size}, batch 1, {args.threads} threads; export and parity check {export_s:.1f} s "
              f"(largest difference {report.max_box_difference:.2g} px, {report.max_score_difference:.2g} in score)")
        for name, rate in rates.items():
            print(f"{name}: {rate:.1f} images/s")


if __name__ == "__main__":
    main()
