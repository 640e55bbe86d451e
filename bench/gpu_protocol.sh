#!/usr/bin/env bash
# The GPU column of docs/performance.md in one run, for a lent CUDA machine (issue #23, item 6).
#
#   bash bench/gpu_protocol.sh DATA_FOLDER [OUT_FOLDER]
#
# 1. Training speed of the brain recipe's model at 512 px through Lightning, per precision and
#    memory format (fp32, bf16-mixed, 16-mixed, channels_last): mixed precision is measured, not
#    assumed (bench/train_options.py; random pixels, as speed does not depend on them).
# 2. The detector comparison at 512 px: medrpn's brain recipe against Ultralytics YOLOv8n and
#    YOLOv8s from scratch, the same split and the same wall-clock budget per system, scored by
#    medrpn's metrics (bench/compare_detectors.py, which writes results.md: the same table as the
#    CPU protocol).
#
# DATA_FOLDER is the brain tumour MRI set (../shared/data/brain-tumor-mri; copy it into an ignored
# folder of the checkout to take it to the device machine). Settings, as environment variables:
#   MINUTES (3)     training budget per compared system
#   SIZE (512)      input side in pixels
#   DEVICE (cuda)   cpu runs the same steps on the CPU, for checking the script, not for figures
#   SYSTEMS (medrpn,yolov8n,yolov8s)
#   BATCH (16)      batch size of both steps
#   WORKERS (8)     DataLoader workers of the comparison
# Needs the bench extra (pip install -e .[bench]) for the YOLO systems. Exits 2 without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: bash bench/gpu_protocol.sh DATA_FOLDER [OUT_FOLDER]}
OUT=${2:-bench/results/gpu}
MINUTES=${MINUTES:-3}
SIZE=${SIZE:-512}
DEVICE=${DEVICE:-cuda}
SYSTEMS=${SYSTEMS:-medrpn,yolov8n,yolov8s}
BATCH=${BATCH:-16}
WORKERS=${WORKERS:-8}
PYTHON=${PYTHON:-python}
export PYTHONUNBUFFERED=1

if [ "$DEVICE" = cuda ] && ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_protocol: torch sees no CUDA device; this protocol fills the GPU column (DEVICE=cpu only checks the script)" >&2
    exit 2
fi
if [ ! -d "$DATA" ]; then
    echo "gpu_protocol: data folder $DATA not found (the brain tumour MRI set)" >&2
    exit 2
fi
mkdir -p "$OUT"
"$PYTHON" -c "import torch; print('torch', torch.__version__, '| device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee "$OUT/machine.txt"

if [ "$DEVICE" = cuda ]; then
    OPTIONS=fp32,bf16-mixed,16-mixed,channels_last
    ACCELERATOR=gpu
else
    OPTIONS=fp32
    ACCELERATOR=cpu
fi
echo "== 1/2 training speed per option at ${SIZE} px ($OPTIONS)"
"$PYTHON" bench/train_options.py --config configs/brain_tumor_mri.yaml --accelerator "$ACCELERATOR" \
    --image-size "$SIZE" --batch-size "$BATCH" --options "$OPTIONS" --steps 12 --warmup 3 \
    --json "$OUT/train_options.json" 2>&1 | tee "$OUT/train_options.log"

echo "== 2/2 detector comparison at ${SIZE} px, ${MINUTES} min per system: $SYSTEMS"
"$PYTHON" bench/compare_detectors.py --data "$DATA" --device "$DEVICE" --image-size "$SIZE" \
    --systems "$SYSTEMS" --budget-minutes "$MINUTES" --batch-size "$BATCH" --num-workers "$WORKERS" --out "$OUT/compare" \
    2>&1 | tee "$OUT/compare.log"
echo "written: $OUT/train_options.json, $OUT/compare/results.md, $OUT/compare/results.json"
