"""How much of a held-out split has a near-twin in the training split: slices of the same patient
on both sides of a split, the likely reason a split's test figure reads above new patients'.

    python bench/split_leakage.py [--config configs/brain_tumor_mri.yaml] [--blocks 10,25,50,100]

For data that names no patients (the brain MRI set: one patient's slices have neighbouring file
numbers), every split is made by medrpn's own code (`LesionDataModule`, the config's data
section) under several settings: the config's, the same cut in file-number order
(`data.split.ordered: true`), and random blocks of other sizes. Each image is reduced to a 64 x 64
thumbnail, standardised; the similarity of two images is their correlation. For each validation
and test image the most similar training image is found, and the image counts as having a
near-twin there when that similarity is above what two images of certainly other patients reach
(the 99th percentile of the best match among training images at least `--far` file numbers
away in the same folder, or in another folder). The table gives, per setting, the share of
held-out images with a near-twin in training, the share whose best match lies within
`--near` file numbers (a neighbouring slice), and the class mix of each split.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

_NUMBER = re.compile(r"(\d+)(?!.*\d)")
THUMB = 64


def thumbnails(paths: list[Path]) -> np.ndarray:
    """(N, THUMB*THUMB) standardised grey thumbnails (zero mean, unit norm): dot products are correlations."""
    from PIL import Image

    out = np.empty((len(paths), THUMB * THUMB), np.float32)
    for i, path in enumerate(paths):
        with Image.open(path) as image:
            out[i] = np.asarray(image.convert("L").resize((THUMB, THUMB), Image.BILINEAR), np.float32).reshape(-1)
    out -= out.mean(axis=1, keepdims=True)
    out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-6
    return out


def number(path: Path) -> int:
    match = _NUMBER.search(path.stem)
    return int(match.group(1)) if match else -1


def best_matches(similarity: np.ndarray, rows: np.ndarray, columns: np.ndarray, allowed: np.ndarray | None = None):
    """For each of `rows`, the most similar of `columns` (index into columns) and its similarity."""
    block = similarity[np.ix_(rows, columns)].copy()
    if allowed is not None:
        block[~allowed] = -np.inf
    best = block.argmax(axis=1)
    return best, block[np.arange(len(rows)), best]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "brain_tumor_mri.yaml")
    parser.add_argument("--data", type=Path, default=None, help="annotations (default: the config's data.annotations)")
    parser.add_argument("--blocks", default="10,25,50,100", help="random-block sizes to compare")
    parser.add_argument("--near", type=int, default=15, help="file numbers apart that count as a neighbouring slice")
    parser.add_argument("--far", type=int, default=100, help="file numbers apart that are certainly another patient")
    args = parser.parse_args(argv)

    from medrpn.data.datamodule import LesionDataModule

    recipe = yaml.safe_load(args.config.read_text(encoding="utf-8"))
    data = dict(recipe["data"])
    if args.data is not None:
        data["annotations"] = str(args.data)
    if not Path(data["annotations"]).exists():
        print(f"split_leakage: {data['annotations']} not found (the brain MRI set lives beside the project)")
        return 2
    split = dict(data.get("split") or {})
    settings = [("the config's", split), ("the config's, ordered", {**split, "ordered": True})]
    settings += [(f"random blocks of {n}", {**split, "group_blocks": n, "ordered": False}) for n in map(int, args.blocks.split(","))]

    first = LesionDataModule(**{**data, "split": split, "cache": {"mode": "none"}})
    records = first.records
    index = {r.key: i for i, r in enumerate(records)}
    paths = [Path(r.image_path) for r in records]
    folders = np.array([str(p.parent) for p in paths])
    numbers = np.array([number(p) for p in paths])
    print(f"{len(records)} images; thumbnails {THUMB} x {THUMB} ...", flush=True)
    thumbs = thumbnails(paths)
    similarity = thumbs @ thumbs.T
    np.fill_diagonal(similarity, -np.inf)

    # what two certainly different patients reach: each image's best match among images far away
    everyone = np.arange(len(records))
    far = (folders[:, None] != folders[None, :]) | (np.abs(numbers[:, None] - numbers[None, :]) >= args.far)
    _, far_best = best_matches(similarity, everyone, everyone, far)
    threshold = float(np.percentile(far_best, 99))
    print(f"near-twin threshold: correlation {threshold:.3f} (99th percentile of the best match >= {args.far} numbers away or in another folder)\n")

    classes = first.class_names
    print(f"| split setting | held out | with a near-twin in train | best match a neighbouring slice (<= {args.near} numbers) | median best correlation | classes train / val / test ({', '.join(classes)}) |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    for name, split_settings in settings:
        dm = first if split_settings is split else LesionDataModule(**{**data, "split": split_settings, "cache": {"mode": "none"}})
        parts = {k: np.array([index[r.key] for r in v]) for k, v in dm.splits.items()}
        held = np.concatenate([parts["val"], parts["test"]])
        best, value = best_matches(similarity, held, parts["train"])
        match = parts["train"][best]
        neighbour = (folders[held] == folders[match]) & (np.abs(numbers[held] - numbers[match]) <= args.near)
        mix = " / ".join(
            ":".join(str(sum(c in records[i].labels for i in parts[k])) for c in range(len(classes)))
            for k in ("train", "val", "test")
        )
        print(
            f"| {name} | {len(held)} | {np.mean(value > threshold):.1%} | {np.mean(neighbour):.1%} | "
            f"{np.median(value):.3f} | {mix} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
