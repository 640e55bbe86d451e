"""Images per second through `medrpn predict`, from DICOM file to written SR, GSPS, JSON and overlay.

    python bench/predict_speed.py [--n-images 200] [--image-size 256] [--ckpt CKPT] [--workers 0 1]
                                  [--findings-per-image 5] [--backbone resnet18]

A folder of synthetic DX files (`medrpn.data.synth`) goes through
`medrpn.inference.predict.predict_files` once per worker setting, into a fresh output folder each
time: scan, read + transform in DataLoader workers, batched inference with the model loaded once,
and per study the overlay PNGs, findings JSON, DICOM SR and GSPS. Without ``--ckpt`` the model is
the demo architecture (ResNet-18 FPN, 64 channels, 256 px input) with untrained weights, run at
threshold 0 with at most ``--findings-per-image`` detections per image (default 5; ``--backbone``
swaps the network, e.g. regnet_x_400mf), so every image gets that many findings to write (5 is more
work than a trained model at its operating point usually leaves; 1 is nearer what a lesion dataset
gives). The figure printed is images / wall-clock seconds of the whole call, model loading
included; the load alone is printed beside it, as is the machine's load. Beside it, the model
alone: the same images, read and transformed beforehand, through the network in batches (``model
only``), which is what predict's end-to-end figure would be if reading and writing cost nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medrpn.data.io import ReadConfig, read_image
from medrpn.data.synth import write_synthetic_dataset
from medrpn.data.transforms import build_transform
from medrpn.inference.predict import default_num_workers, load_checkpoint, predict_files
from medrpn.training.lightning_module import LesionDetectionModule


def _demo_checkpoint(path: Path, image_size: int, findings_per_image: int, backbone: str = "resnet18") -> Path:
    torch.manual_seed(0)
    module = LesionDetectionModule(  # the demo recipe's model (configs/demo.yaml)
        class_names=["nodule", "spiculated"],
        backbone={"name": backbone, "fpn_channels": 64},
        rpn={"pre_nms_top_n_test": 300, "post_nms_top_n_test": 100},
        roi={"detections_per_img": findings_per_image},
    )
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "datamodule_hyper_parameters": {"image_size": image_size},
        },
        path,
    )
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=256, help="side of the synthetic images and the model input")
    parser.add_argument("--ckpt", type=Path, default=None, help="a trained checkpoint (default: untrained demo model)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, default_num_workers()])
    parser.add_argument("--findings-per-image", type=int, default=5, help="detections per image of the untrained model")
    parser.add_argument("--backbone", default="resnet18", help="the untrained model's backbone.name (ignored with --ckpt)")
    parser.add_argument("--onnx", action="store_true", help="also export the model (medrpn export) and run predict on it")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_synthetic_dataset(tmp / "data", n_images=args.n_images, image_size=args.image_size, seed=0)
        images = tmp / "data" / "images"
        ckpt = args.ckpt or _demo_checkpoint(tmp / "model.ckpt", args.image_size, args.findings_per_image, args.backbone)
        threshold = None if args.ckpt else 0.0

        start = time.perf_counter()
        module, data_settings = load_checkpoint(ckpt)
        load_s = time.perf_counter() - start

        print(f"{args.n_images} DICOM files of {args.image_size}x{args.image_size}, batch {args.batch_size}, "
              f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}")
        models = {"PyTorch": (ckpt, module)}
        if args.onnx:
            from medrpn.inference.onnx_export import export_onnx
            from medrpn.inference.onnx_model import OnnxDetector

            exported = export_onnx(ckpt, tmp / "model.onnx").path
            models["ONNX Runtime"] = (exported, OnnxDetector(exported))
        for name, (model_file, model) in models.items():
            _end_to_end(name, model_file, images, tmp, threshold, args, load_s)
            rate = _model_only(model, data_settings, sorted(images.glob("*.dcm")), args.batch_size)
            print(f"{name}, model only: {rate:.1f} images/s (the same images, read and transformed beforehand, batch {args.batch_size})")


def _end_to_end(name: str, ckpt: Path, images: Path, tmp: Path, threshold: float | None, args: argparse.Namespace, load_s: float) -> None:
    """predict_files on every image, once per reader setting; prints images/s."""
    for workers in dict.fromkeys(args.workers):
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        with redirect_stdout(io.StringIO()):
            report = predict_files(
                ckpt, images, tmp / f"out-{name}-{workers}", score_threshold=threshold,
                batch_size=args.batch_size, num_workers=workers,
            )
        seconds = time.perf_counter() - start
        srs = sum(1 for p in report.written if p.name == "sr.dcm")
        print(
            f"{name}, num_workers={workers}: {report.images / seconds:.1f} images/s "
            f"({report.images} images, {report.findings} findings, {srs} SRs in {seconds:.1f} s; "
            f"checkpoint load {load_s:.1f} s of it); load average {load_before:.2f} before, "
            f"{os.getloadavg()[0]:.2f} after"
        )


def _model_only(module: Any, data_settings: dict, paths: list[Path], batch_size: int) -> float:
    """Images/s of the network alone on ``paths``, read and transformed as predict does, beforehand."""
    transform = build_transform(int(data_settings.get("image_size", 256)))
    read_config = ReadConfig.parse(data_settings.get("read"))
    tensors = []
    for path in paths:
        pixels = transform(image=read_image(path, None, read_config).array, bboxes=np.zeros((0, 4)), labels=[])["image"]
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        tensors.append(torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)))
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, len(tensors), batch_size)]
    with torch.inference_mode():
        module(batches[0])  # warm-up
        start = time.perf_counter()
        for batch in batches:
            module(batch)
        return len(tensors) / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
