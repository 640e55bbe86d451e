"""Training speed of each Lightning/PyTorch option, measured before any is recommended.

Trains the recipe's model (default: configs/demo.yaml) through Lightning's Trainer, as `medrpn
fit` does, on random images with one or two boxes each, and prints images per second for:

    fp32 (the baseline), bf16-mixed, 16-mixed (GPU only), channels_last, torch.compile of the
    backbone, gradient accumulation (half the batch, 2 batches per step), and, with --ddp,
    2 processes with and without synchronised batch norm.

    python bench/train_options.py [--config configs/demo.yaml] [--steps 12] [--accelerator cpu|gpu]
        [--image-size 256] [--batch-size 4] [--options fp32,bf16-mixed,...] [--ddp]

The first `--warmup` steps of each option are not timed (allocators, kernels, compilation; the
compilation time is printed separately).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from medrpn.training.lightning_module import LesionDetectionModule

OPTIONS = ("fp32", "bf16-mixed", "16-mixed", "channels_last", "compile", "accumulate2")


def random_batches(count: int, batch_size: int, image_size: int, seed: int = 0) -> list[dict]:
    """Batches in medrpn's batch contract: random pixels, one or two boxes per image."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        targets = []
        for i in range(batch_size):
            n = 1 + i % 2
            xy = torch.rand(n, 2, generator=generator) * image_size * 0.7
            wh = 8 + torch.rand(n, 2, generator=generator) * image_size * 0.25
            targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 2, (n,), generator=generator)})
        images = torch.rand(batch_size, 1, image_size, image_size, generator=generator)
        batches.append({"images": images, "targets": targets})
    return batches


class StepTimer(Callback):
    """Times the training batches after the first `warmup` ones.

    Batches are counted here, not by Lightning's `batch_idx`: under DDP each process sees its
    share of the loader, so an epoch ends early and `batch_idx` starts again at 0 (counting by it
    restarted the clock every epoch and overstated DDP's speed about 2x)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.first = warmup, None, None, None
        self.images = 0
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.batches == 0:
            self.first = time.perf_counter()
        if self.batches == self.warmup:
            _sync()
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.batches >= self.warmup:
            self.images += len(batch["images"])
        self.batches += 1
        _sync()
        self.end = time.perf_counter()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class ChannelsLast(Callback):
    """Puts the model and every batch's images in channels-last memory format."""

    def on_fit_start(self, trainer, pl_module) -> None:
        pl_module.to(memory_format=torch.channels_last)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        batch["images"] = batch["images"].contiguous(memory_format=torch.channels_last)


def module_from_recipe(path: Path) -> LesionDetectionModule:
    model = dict(yaml.safe_load(path.read_text(encoding="utf-8")).get("model") or {})
    if model.get("anchors") == "auto":
        model.pop("anchors")
    return LesionDetectionModule(class_names=["a", "b"], **model)


def measure(option: str, args: argparse.Namespace, devices: int = 1, sync_batchnorm: bool = False) -> dict:
    """Images per second of one option (all ranks together under DDP)."""
    torch.manual_seed(0)
    module = module_from_recipe(args.config)
    batch_size = args.batch_size // 2 if option == "accumulate2" else args.batch_size
    accumulate = 2 if option == "accumulate2" else 1
    steps = (args.warmup + args.steps) * accumulate
    batches = random_batches(steps, batch_size, args.image_size)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    timer = StepTimer(args.warmup * accumulate)
    callbacks = [timer] + ([ChannelsLast()] if option == "channels_last" else [])
    compile_seconds = None
    if option == "compile":
        module.model.backbone = torch.compile(module.model.backbone)
    trainer = L.Trainer(
        accelerator=args.accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
        precision=option if option in ("bf16-mixed", "16-mixed") else "32-true",
        max_steps=args.warmup + args.steps, accumulate_grad_batches=accumulate, sync_batchnorm=sync_batchnorm,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks,
    )
    trainer.fit(module, train_dataloaders=loader)
    seconds = timer.end - timer.start
    if option == "compile":
        compile_seconds = timer.start - timer.first
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    return {
        "option": option if not sync_batchnorm else "ddp2+sync_bn",
        "images_per_s": timer.images * devices / seconds,
        "seconds_per_step": seconds / args.steps,
        "warmup_seconds": compile_seconds,
        "peak_gpu_mib": peak,
        "rank": trainer.global_rank,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--options", default=None, help=f"comma list of {', '.join(OPTIONS)}")
    parser.add_argument("--ddp", action="store_true", help="also 2 processes (gloo on CPU), with and without sync BN")
    parser.add_argument("--ddp-worker", choices=["plain", "sync"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)

    if args.ddp_worker:  # one 2-process measurement, started by --ddp below
        result = measure("fp32", args, devices=2, sync_batchnorm=args.ddp_worker == "sync")
        if result["rank"] == 0:
            result["option"] = "ddp2" if args.ddp_worker == "plain" else "ddp2+sync_bn"
            print("RESULT " + json.dumps(result), flush=True)
        return

    gpu = args.accelerator in ("gpu", "cuda")
    default = [o for o in OPTIONS if gpu or o != "16-mixed"]
    options = args.options.split(",") if args.options else default
    device = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(
        f"{args.config}: {args.image_size}x{args.image_size}, batch {args.batch_size}, {args.accelerator} ({device}), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    results = []
    for option in options:
        result = measure(option, args)
        results.append(result)
        _print(result)
    if args.ddp:
        kinds = ("plain", "sync") if gpu else ("plain",)
        if not gpu:
            print("  ddp2+sync_bn: not measured on CPU (torch's SyncBatchNorm runs on GPUs only)")
        for kind in kinds:
            command = [sys.executable, __file__, "--ddp-worker", kind, "--config", str(args.config),
                       "--steps", str(args.steps), "--warmup", str(args.warmup), "--image-size", str(args.image_size),
                       "--batch-size", str(args.batch_size), "--accelerator", args.accelerator]
            if args.threads:
                command += ["--threads", str(args.threads)]
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
            out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(f"{kind} DDP failed:\n{(out.stdout + out.stderr)[-2000:]}")
                continue
            results.append(json.loads(line[7:]))
            _print(results[-1])
    base = next((r for r in results if r["option"] == "fp32"), None)
    if base:
        print("relative to fp32: " + ", ".join(f"{r['option']} x{r['images_per_s'] / base['images_per_s']:.2f}" for r in results))
    if args.json:
        args.json.write_text(json.dumps({"device": device, "results": results}, indent=2), encoding="utf-8")


def _print(result: dict) -> None:
    extra = f", first steps {result['warmup_seconds']:.0f} s (compilation)" if result["warmup_seconds"] else ""
    memory = f", peak {result['peak_gpu_mib']:.0f} MiB" if result["peak_gpu_mib"] else ""
    print(f"{result['option']:>14}: {result['images_per_s']:6.2f} images/s ({result['seconds_per_step']:.2f} s per step{extra}{memory})", flush=True)


if __name__ == "__main__":
    main()
