"""bench/compare_detectors.py end to end on a tiny YOLO folder: split file, every system's figures, the skip."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "compare_detectors.py"
SYSTEMS = ("medrpn", "tv_mobilenet", "monai_retinanet")
# file numbers with gaps, so that sorting by name ("10" < "3") and by number differ
NUMBERS = (3, 10, 11, 12, 40, 41)
METRICS = (
    "froc_0.5fp", "froc_1fp", "froc_2fp", "cpm", "map50", "rpn_recall100",
    "train_images_per_s", "train_images_per_s_after_warmup", "infer_images_per_s_b1", "infer_images_per_s_b8",
    "peak_rss_mb", "peak_gpu_mb", "epochs_completed", "images_seen", "batch_fingerprint",
)


def _yolo_folder(root: Path) -> Path:
    """Class folders 0/ 1/ 2/ of 64 px JPEGs with one bright square each, labelled like the brain MRI set."""
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / str(c)).mkdir(parents=True)
        for n in NUMBERS:
            image = (rng.random((64, 64)) * 50).astype(np.uint8)
            side = 12 + 4 * c
            x, y = (int(v) for v in rng.integers(2, 64 - side - 2, 2))
            image[y : y + side, x : x + side] = 220
            Image.fromarray(image).save(root / str(c) / f"{n}.jpg")
            cx, cy, s = (x + side / 2) / 64, (y + side / 2) / 64, side / 64
            (root / str(c) / f"{n}.txt").write_text(f"{c} {cx:.2f} {cy:.2f} {s:.2f} {s:.2f}\n")
    return root


def _skip_without_ultralytics() -> None:
    """Skips without the bench extra. Looked up, not imported: importing Ultralytics patches
    PIL.Image.open for the whole process (it retries unreadable files with a HEIF plugin it tries
    to install), which would change what every later test sees of a broken image."""
    if importlib.util.find_spec("ultralytics") is None:
        pytest.skip("ultralytics (the bench extra) is not installed")


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("compare")
    data, out = _yolo_folder(tmp / "data"), tmp / "out"
    done = _run(
        "--data", str(data), "--out", str(out), "--image-size", "64", "--budget-epochs", "1",
        "--systems", ",".join(SYSTEMS), "--monai-backbone", "resnet18",
        "--num-workers", "0", "--threads", "1", "--warmup-seconds", "0.01",
        cwd=tmp,
    )
    return data, out, done


def test_every_system_is_trained_evaluated_and_measured(compared):
    _, out, done = compared
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "results.json").read_text())
    results = {r["system"]: r for r in report["results"]}
    assert list(results) == list(SYSTEMS)
    for name, result in results.items():
        assert "error" not in result, result
        missing = [k for k in METRICS if k not in result]
        assert not missing, f"{name} lacks {missing}"
        for key in ("froc_0.5fp", "froc_1fp", "froc_2fp", "cpm", "map50"):
            assert 0.0 <= result[key] <= 1.0, (name, key, result[key])
        assert result["epochs_completed"] == 1 and result["images_seen"] == result["train_size"] == 15
        assert result["val_images"] == 3
        assert result["train_images_per_s"] > 0 and result["infer_images_per_s_b1"] > 0 and result["infer_images_per_s_b8"] > 0
        assert result["peak_rss_mb"] > result["data_rss_mb"] > 0 and result["peak_gpu_mb"] is None
    # proposal recall is measured for the two-stage systems only
    assert 0.0 <= results["medrpn"]["rpn_recall100"] <= 1.0 and 0.0 <= results["tv_mobilenet"]["rpn_recall100"] <= 1.0
    assert results["monai_retinanet"]["rpn_recall100"] is None
    # one data pipeline: every system saw the same first batches
    assert len({r["batch_fingerprint"] for r in results.values()}) == 1
    assert report["ratios_to_medrpn"]["medrpn"]["train_images_per_s"] == 1.0
    assert set(report["ratios_to_medrpn"]) == set(SYSTEMS)
    assert report["image_size"] == 64 and report["budget"] == {"minutes": None, "epochs": 1}
    assert report["machine"]["torch"] and report["machine"]["device"] == "cpu"
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in SYSTEMS) and "CPM" in table


def test_the_split_file_holds_contiguous_number_blocks_per_class(compared):
    data, out, _ = compared
    split = json.loads((out / "split.json").read_text())
    resolve = lambda entries: [((out / e).resolve()) for e in entries]  # noqa: E731 - relative to the file
    train, val = resolve(split["train"]), resolve(split["val"])
    assert not set(train) & set(val) and split["test"] == []
    assert set(train) | set(val) == {p.resolve() for p in data.glob("*/*.jpg")}
    for c in range(3):
        numbers = lambda paths: sorted(int(p.stem) for p in paths if p.parent.name == str(c))  # noqa: E731
        assert numbers(train) == list(NUMBERS[:5]) and numbers(val) == list(NUMBERS[5:])


def test_a_missing_data_folder_fails_naming_it(tmp_path):
    done = _run("--data", str(tmp_path / "absent"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "not found" in done.stderr and str(tmp_path / "absent") in done.stderr
    assert not (tmp_path / "out").exists()


def test_ultralytics_yolo_trains_on_the_same_split_and_is_scored_by_medrpn_metrics(tmp_path):
    """The YOLO system (bench extra): Ultralytics' own trainer on the split's training images,
    evaluated on the same validation tensors with medrpn's metrics; nothing is written into the
    data folder (Ultralytics caches labels beside them) or the working folder."""
    _skip_without_ultralytics()
    data, out = _yolo_folder(tmp_path / "data"), tmp_path / "out"
    done = _run(
        "--data", str(data), "--out", str(out), "--image-size", "64", "--budget-epochs", "1",
        "--systems", "yolov8n", "--num-workers", "0", "--threads", "1", "--warmup-seconds", "0.01",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "results.json").read_text())["results"][0]
    assert "error" not in result, result
    assert result["system"] == "yolov8n" and result["epochs_completed"] == 1 and result["val_images"] == 3
    for key in ("froc_1fp", "cpm", "cpm_iou50", "map50", "map50_95"):
        assert 0.0 <= result[key] <= 1.0, (key, result[key])
    assert result["rpn_recall100"] is None and result["infer_images_per_s_b1"] > 0
    assert set(result["map50_per_class"]) == {"pituitary", "meningioma", "glioma"}  # the recipe's class names
    linked = {p.resolve() for p in (out / "yolo" / "data" / "images" / "train").iterdir()}
    split = json.loads((out / "split.json").read_text())
    assert linked == {(out / e).resolve() for e in split["train"]}
    assert sorted(p.name for p in data.iterdir()) == ["0", "1", "2"] and not list(tmp_path.glob("*.db"))
    assert "| yolov8n |" in (out / "results.md").read_text()


def test_the_gpu_protocol_runs_every_step_and_refuses_without_cuda(tmp_path):
    """bench/gpu_protocol.sh, checked on the CPU (DEVICE=cpu, tiny sizes): both steps run and
    write their figures; with the default DEVICE=cuda on a machine without CUDA it exits 2."""
    _skip_without_ultralytics()
    import torch

    data, out = _yolo_folder(tmp_path / "data"), tmp_path / "gpu"
    script = REPO / "bench" / "gpu_protocol.sh"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "SIZE": "64", "MINUTES": "0.05",
           "SYSTEMS": "medrpn,yolov8n", "BATCH": "4", "WORKERS": "0"}
    done = subprocess.run(["bash", str(script), str(data), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    options = json.loads((out / "train_options.json").read_text())
    assert "fp32" in json.dumps(options)
    results = {r["system"]: r for r in json.loads((out / "compare" / "results.json").read_text())["results"]}
    assert set(results) == {"medrpn", "yolov8n"} and not any("error" in r for r in results.values())
    if not torch.cuda.is_available():
        refused = subprocess.run(["bash", str(script), str(data), str(tmp_path / "refused")], env={**env, "DEVICE": "cuda"},
                                 capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "no CUDA device" in refused.stderr
