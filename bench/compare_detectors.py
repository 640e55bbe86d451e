"""Trains and evaluates medrpn, torchvision's Faster R-CNN, MONAI's RetinaNet and Ultralytics YOLO side by side.

Every system but YOLO is trained from scratch on the same data pipeline (medrpn's `LesionDataModule`
reading the recipe's data settings, the same batches in the same order), with the same optimiser,
schedule and training budget; YOLO is trained from scratch by Ultralytics' own trainer on the same
training images for the same budget (bench/detectors/yolo_system.py). All are then evaluated on the same validation split with medrpn's own
metrics (FROC, CPM, mAP, proposal recall) and timed. The split is written to `<out>/split.json`
first: within each class folder, images sorted by file number, the first 80% train and the last
20% validate (contiguous blocks, as a patient's slices have neighbouring numbers).

    python bench/compare_detectors.py --data ../shared/data/brain-tumor-mri --image-size 256 \
        --budget-minutes 12 --out bench/results/
    python bench/compare_detectors.py ... --device cuda --image-size 512          # GPU protocol
    python bench/compare_detectors.py ... --systems medrpn,tv_mobilenet --budget-epochs 2

Systems (`--systems`, comma-separated; default all): medrpn (the recipe's model), medrpn_mobilenet
(the recipe with a MobileNetV3-Large backbone), tv_resnet50 and tv_mobilenet (torchvision
`fasterrcnn_resnet50_fpn` / `fasterrcnn_mobilenet_v3_large_fpn`), monai_retinanet (MONAI 2D
RetinaNet), and yolov8n, yolov8s, yolo11n, yolo11s (Ultralytics YOLO from scratch with its own
trainer and augmentation, as its users run it; needs the `bench` extra, `pip install -e .[bench]`,
and is left out of the default when Ultralytics is not installed). Each runs in its own process,
one after the other. Writes `results.json` and
`results.md` to `--out` after every system. When the data folder is absent it says so and exits 2:
a comparison that measured nothing is not a success.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_CONFIG = "configs/brain_tumor_mri.yaml"
DEFAULT_MINUTES = 12.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import importlib.util

    from bench.detectors.run import SYSTEMS, YOLO_SYSTEMS

    have_yolo = importlib.util.find_spec("ultralytics") is not None
    default_systems = [s for s in SYSTEMS if have_yolo or s not in YOLO_SYSTEMS]

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/brain-tumor-mri"), help="YOLO folder (class folders 0/ 1/ 2/)")
    parser.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG), help="recipe: its model: and data: sections are used")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for split.json, results.json, results.md")
    parser.add_argument("--image-size", type=int, default=None, help="network input side (default: the recipe's)")
    parser.add_argument("--budget-minutes", type=float, default=None, help=f"training wall-clock per system (default {DEFAULT_MINUTES:g} without --budget-epochs)")
    parser.add_argument("--budget-epochs", type=int, default=None, help="training epochs per system (with --budget-minutes: whichever ends first)")
    parser.add_argument("--systems", default=",".join(default_systems), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default: the recipe's)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="share of each class folder (its highest numbers) that validates")
    parser.add_argument("--warmup-seconds", type=float, default=60.0, help="training throughput is also reported after this many seconds")
    parser.add_argument("--monai-backbone", default="resnet50", choices=("resnet50", "resnet18"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per system (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown or not args.systems:
        parser.error(f"--systems: unknown {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.budget_minutes is None and args.budget_epochs is None:
        args.budget_minutes = DEFAULT_MINUTES
    if (args.budget_minutes is not None and args.budget_minutes <= 0) or (args.budget_epochs is not None and args.budget_epochs < 1):
        parser.error("budgets must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"compare_detectors: data folder {args.data} not found; nothing compared (it is the brain tumour MRI set of configs/brain_tumor_mri.yaml)", file=sys.stderr)
        return 2

    import torch
    import yaml

    from bench.detectors.data import build_datamodule
    from bench.detectors.measure import machine
    from bench.detectors.report import markdown, write_reports
    from bench.detectors.run import Job, run_in_process
    from bench.detectors.split import write_block_split
    from medrpn.data.annotations import read_annotations
    from medrpn.data.io import ReadConfig
    from medrpn.data.problems import Problems

    config = args.config if args.config.exists() or args.config.is_absolute() else REPO / args.config
    recipe = yaml.safe_load(config.read_text(encoding="utf-8"))
    data_settings = recipe.get("data") or {}
    image_size = args.image_size or int(data_settings.get("image_size", 256))
    batch_size = args.batch_size or int(data_settings.get("batch_size", 8))
    num_workers = args.num_workers if args.num_workers is not None else int(data_settings.get("num_workers", 0))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device.replace("auto", "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("compare_detectors: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    records, _ = read_annotations(
        args.data,
        data_settings.get("class_names"),
        data_settings.get("format"),
        Problems("skip"),
        read=ReadConfig.parse(data_settings.get("read") or {}),
    )
    split_file = args.out / "split.json"
    write_block_split(split_file, records, args.val_fraction)
    dm = build_datamodule(recipe, args.data, split_file, image_size, batch_size, num_workers)  # checks the split file
    sizes = {name: len(part) for name, part in dm.splits.items()}
    print(f"split {split_file}: {sizes['train']} train / {sizes['val']} val images; systems: {', '.join(args.systems)}", flush=True)

    run = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "command": " ".join(sys.argv),
        "data": str(args.data),
        "config": str(args.config),
        "image_size": image_size,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "budget": {"minutes": args.budget_minutes, "epochs": args.budget_epochs},
        "warmup_seconds": args.warmup_seconds,
        "seed": args.seed,
        "threads": args.threads,
        "split": {"file": str(split_file), "train": sizes["train"], "val": sizes["val"], "val_fraction": args.val_fraction},
        "machine": machine(torch.device(device)),
    }
    if device == "cpu":  # forked system processes then start with every library already imported
        for module in ("bench.detectors.monai_system", "bench.detectors.torchvision_system"):
            importlib.import_module(module)
    results = []
    for name in args.systems:
        job = Job(
            system=name,
            config=str(config),
            data=str(args.data),
            split_file=str(split_file),
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            device=device,
            budget_seconds=None if args.budget_minutes is None else args.budget_minutes * 60,
            budget_epochs=args.budget_epochs,
            warmup_seconds=args.warmup_seconds,
            seed=args.seed,
            threads=args.threads,
            monai_backbone=args.monai_backbone,
            report_dir=str(args.out),
        )
        print(f"== {name}", flush=True)
        results.append(run_in_process(job, args.out / f".{name}.result.json"))
        if "error" in results[-1]:
            print(f"== {name} failed: {results[-1]['error']}", flush=True)
        json_path, md_path = write_reports(args.out, run, results)
    print(markdown(run, results))
    print(f"written: {json_path}, {md_path}")
    return 1 if all("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
