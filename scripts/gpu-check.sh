#!/usr/bin/env bash
# The GPU checks in one call, for a machine with a CUDA GPU (about 8 minutes in all):
#   1. pytest -m gpu
#   2. ssl-cli bench pipeline (mos, univip) on the sample shards
#   3. ssl-cli bench train: ViT-S/16 MOS compiled (against MoCo v3 in the same run) and
#      ResNet-50 UniVIP, synthetic on-device batches and end to end
#   4. ssl-cli bench quality, GPU recipe at a reduced budget, on Fashion-MNIST shards
#      (built from FMNIST_DIR when QUALITY_TRAIN / QUALITY_VAL are not given)
# Every figure goes as JSON into OUT (default runs/gpu-check). DRY_RUN=1 checks every command
# line (each subcommand parses its options; bench quality prints its plan) without a GPU.
#   make gpu-check [DRY_RUN=1] [GPU_CHECK_OUT=DIR]
# On an offline GPU node whose Python already has torch, timm, pyarrow, OpenCV, click, pytest
# and DALI (no venv, nothing to install), run the script itself with that Python:
#   PYTHON=$(command -v python3) FMNIST_DIR=DIR bash scripts/gpu-check.sh
# Without an installed `ssl-cli` the commands run as `python -m cli.main` from this checkout.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
PY=${PYTHON:-$BIN/python}
if [ -x "$BIN/ssl-cli" ] && [ -z "${PYTHON:-}" ]; then
    SSL=("$BIN/ssl-cli")
else
    SSL=("$PY" -m cli.main)
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
OUT=${GPU_CHECK_OUT:-runs/gpu-check}
DRY=${DRY_RUN:-}
FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
SHARDS=$OUT/sample-shards
mkdir -p "$OUT"
declare -A STATUS

# run NAME CMD...: the command; with DRY_RUN the command line plus --help, which parses every
# option (click rejects an unknown option or a bad choice before it prints the help) and runs
# nothing.
run() {
    local name=$1; shift
    echo "== $name: $*"
    if [ -n "$DRY" ]; then
        "$@" --help > /dev/null
        STATUS[$name]="dry-run ok"
        return 0
    fi
    local t0=$SECONDS
    if "$@" > "$OUT/$name.log" 2>&1; then
        STATUS[$name]="ok ($((SECONDS - t0)) s)"
    else
        STATUS[$name]="FAILED ($((SECONDS - t0)) s, see $OUT/$name.log)"
        tail -20 "$OUT/$name.log" || true
    fi
}

if [ -z "$DRY" ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run with DRY_RUN=1 to check the commands only')"
    "$PY" -c "import torch; print(torch.cuda.get_device_name(0))" | tee "$OUT/device.txt"
    test -f "$SHARDS/manifest.json" || "${SSL[@]}" shards build @sample "$SHARDS" --shard-size 8 --no-progress
fi

run pytest-gpu "$PY" -m pytest -q -m gpu --junitxml="$OUT/pytest-gpu.xml"
for m in mos univip; do
    run "pipeline-$m" "${SSL[@]}" bench pipeline --data "$SHARDS" --method "$m" --device cuda \
        --seconds 8 --rounds 3 --json "$OUT/pipeline_$m.json"
done
run train-mos "${SSL[@]}" bench train --config configs/mos_vits16_coco.yaml --synthetic \
    --baseline mocov3 --batch-size 256 --device cuda --steps 30 --warmup 10 \
    --json "$OUT/train_mos_vs_mocov3.json"
run train-mos-e2e "${SSL[@]}" bench train --config configs/mos_vits16_coco.yaml --data "$SHARDS" \
    --batch-size 128 --device cuda --steps 30 --warmup 10 --json "$OUT/train_mos.json"
run train-univip "${SSL[@]}" bench train --config configs/univip_r50_coco.yaml --data "$SHARDS" \
    --batch-size 128 --device cuda --steps 30 --warmup 10 --json "$OUT/train_univip.json"

QTRAIN=${QUALITY_TRAIN:-$OUT/fmnist-train}
QVAL=${QUALITY_VAL:-$OUT/fmnist-test}
if [ -z "${QUALITY_TRAIN:-}" ] && [ -z "$DRY" ]; then
    if [ -d "$FMNIST_DIR" ]; then
        for split in train test; do
            dir=$OUT/fmnist-$split
            test -f "$dir/manifest.json" || "${SSL[@]}" shards build "$FMNIST_DIR" "$dir" \
                --layout idx --split "$split" --min-side 8 --no-progress
        done
    else
        echo "== quality: skipped, no Fashion-MNIST at $FMNIST_DIR (set FMNIST_DIR, or QUALITY_TRAIN and QUALITY_VAL)"
        STATUS[quality]="skipped (no data)"
    fi
fi
if [ -z "${STATUS[quality]:-}" ]; then
    if [ -n "$DRY" ]; then
        echo "== quality: ${SSL[*]} bench quality --recipe gpu --device cuda --budget-seconds 40 --seeds 0"
        STATUS[quality]="dry-run ok"
        "${SSL[@]}" bench quality --help > /dev/null
    else
        run quality "${SSL[@]}" bench quality --train "$QTRAIN" --val "$QVAL" --out "$OUT/quality" \
            --recipe gpu --device cuda --budget-seconds 40 --seeds 0
    fi
fi

echo "== gpu-check summary ($OUT)"
failed=0
for name in "${!STATUS[@]}"; do
    echo "  $name: ${STATUS[$name]}"
    case "${STATUS[$name]}" in FAILED*) failed=1 ;; esac
done
exit $failed
