"""RoI Align in training on the CPU: torchvision's `MultiScaleRoIAlign` against medrpn's
`SparseMultiScaleRoIAlign`, forward and backward, on a feature pyramid of the brain recipe's shape.

Prints milliseconds per forward and per backward pass and the largest difference between the two
(outputs and feature gradients). Boxes are drawn like the second stage's training RoIs: sizes
from 4 px to half the image, spread over the pyramid's levels by torchvision's level rule.

    python bench/roi_align_speed.py [--batch 8] [--rois 128] [--image-size 256] [--channels 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch
from torchvision.ops import MultiScaleRoIAlign

from medrpn.model.sparse_roi_align import SparseMultiScaleRoIAlign


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rois", type=int, default=128, help="RoIs per image (the recipe's roi.batch_size_per_image)")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    size = args.image_size
    names = ["0", "1", "2", "3"]
    features = {n: torch.randn(args.batch, args.channels, size // 4 >> i, size // 4 >> i, requires_grad=True) for i, n in enumerate(names)}
    boxes = []
    for _ in range(args.batch):
        side = 4 + torch.rand(args.rois, 2) * (size / 2 - 4)
        corner = torch.rand(args.rois, 2) * (size - side)
        boxes.append(torch.cat([corner, corner + side], 1))
    shapes = [(size, size)] * args.batch
    pools = {"torchvision": MultiScaleRoIAlign(names, 7, 2), "sparse": SparseMultiScaleRoIAlign(names, 7, 2)}
    print(f"{args.batch} images x {args.rois} RoIs, {size} px, {args.channels} channels, levels 4-32, {args.threads} threads")
    outputs = {}
    for name, pool in pools.items():
        out = pool(features, boxes, shapes)
        grad = torch.ones_like(out)
        forward = backward = 0.0
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = pool(features, boxes, shapes)
            forward += time.perf_counter() - start
            start = time.perf_counter()
            grads = torch.autograd.grad(out, list(features.values()), grad)
            backward += time.perf_counter() - start
        outputs[name] = (out.detach(), grads)
        print(f"{name:12s} forward {1000 * forward / args.repeats:7.1f} ms   backward {1000 * backward / args.repeats:7.1f} ms")
    (a, ga), (b, gb) = outputs["torchvision"], outputs["sparse"]
    print(f"largest difference: outputs {(a - b).abs().max():.2e}, gradients {max((x - y).abs().max() for x, y in zip(ga, gb)):.2e}")


if __name__ == "__main__":
    main()
