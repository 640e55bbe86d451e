"""Training and inference speed of the detector on this machine (plain PyTorch, no Lightning).

Prints images per second for training steps and for inference at batch 1 and batch 8, for the
settings of a recipe (default: configs/demo.yaml). Inputs are random images with one or two
lesion boxes each: speed does not depend on what the pixels show.

    python bench/train_speed.py [--config configs/demo.yaml] [--steps 10]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml

from medrpn.model import AnchorConfig, BackboneConfig, DetectorConfig, RoIConfig, RPNConfig, build_detector


def detector_from_recipe(path: Path, num_classes: int = 2) -> tuple[torch.nn.Module, int, int]:
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    model, data = recipe.get("model", {}), recipe.get("data", {})
    config = DetectorConfig(
        num_classes=num_classes,
        backbone=BackboneConfig(**model.get("backbone", {})),
        anchors=AnchorConfig(**model.get("anchors", {})),
        rpn=RPNConfig(**model.get("rpn", {})),
        roi=RoIConfig(**model.get("roi", {})),
    )
    return build_detector(config), int(data.get("image_size", 256)), int(data.get("batch_size", 4))


def batch(size: int, image_size: int) -> tuple[torch.Tensor, list[dict[str, torch.Tensor]]]:
    images = torch.rand(size, 1, image_size, image_size)
    targets = []
    for i in range(size):
        n = 1 + i % 2
        xy = torch.rand(n, 2) * image_size * 0.7
        wh = 8 + torch.rand(n, 2) * image_size * 0.25
        targets.append({"boxes": torch.cat([xy, xy + wh], 1), "labels": torch.randint(0, 2, (n,))})
    return images, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=Path("configs/demo.yaml"))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, image_size, batch_size = detector_from_recipe(args.config)
    print(f"{args.config}: {image_size}x{image_size}, batch {batch_size}, {torch.get_num_threads()} threads")

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    images, targets = batch(batch_size, image_size)
    for step in range(args.steps + 2):
        if step == 2:  # first steps warm up allocators and kernels
            start = time.perf_counter()
        loss = sum(model(images, targets).losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    print(f"training:  {args.steps * batch_size / seconds:6.2f} images/s ({seconds / args.steps:.2f} s per step)")

    model.eval()
    for size in (1, 8):
        images, _ = batch(size, image_size)
        with torch.inference_mode():
            model(images)
            start = time.perf_counter()
            for _ in range(max(args.steps // 2, 1)):
                model(images)
        seconds = (time.perf_counter() - start) / max(args.steps // 2, 1)
        print(f"inference: {size / seconds:6.2f} images/s at batch {size}")


if __name__ == "__main__":
    main()
