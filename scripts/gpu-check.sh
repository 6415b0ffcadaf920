#!/usr/bin/env bash
# The GPU checks in one call, the first command on a machine with a CUDA GPU (docs/gpu.md):
#   data             256 JPEG crops of the @sample photographs (needs scikit-image and
#                    scikit-learn, which ship them) -> shards (selective search, 4 shards)
#   pytest-gpu       pytest -m gpu
#   pipeline-mos     ssl-cli bench pipeline, batch 256 (ours, torchvision + PIL, decode + crop)
#   pipeline-univip
#   train-mos        ssl-cli bench train: ViT-S/16 MOS compiled against MoCo v3, synthetic
#                    on-device batches, global batch 256
#   train-mos-e2e    the same MOS step on the shards, batch 128, against its synthetic ceiling
#   train-univip     ResNet-50 UniVIP on the shards, batch 128
#   quality          ssl-cli bench quality, GPU recipe at a reduced budget, on Fashion-MNIST
#                    shards (built from FMNIST_DIR unless QUALITY_TRAIN / QUALITY_VAL are given;
#                    skipped without them)
# Every figure goes as JSON into OUT (default runs/gpu-check), every step's output into
# OUT/NAME.log, the device and library versions (a missing one named) into OUT/env.txt; the
# summary lists each step with its status and seconds, and the exit status is 1 when a step
# failed.
#   make gpu-check [DRY_RUN=1] [GPU_CHECK_OUT=DIR] [STEPS=data,train-univip]
# STEPS: only these steps (the data step is added where a step needs the shards).
#
# DRY_RUN=1 runs every step for real on the CPU: the same commands on the same data with the same
# batch sizes, view sizes and compile settings, so that a step that would fail on the GPU for any
# reason but the GPU fails here. Besides --device, two things differ, for the CPU's time and
# memory (measured on two cores, docs/gpu.md): the repetition counts (one timed batch after
# 2 warm-up batches in bench pipeline, 3 steps without warm-up in bench train: still
# past an epoch's end of the 256 samples at every batch size), and bench train's models, which
# keep their family, input sizes and heads' layout at a fraction of the width and depth (a ViT
# of one block of width 32; a ResNet-50 of one block per stage at 1/8 width). bench quality
# prints its plan (--dry-run) instead of training: its data is built for real, but one step of
# the GPU recipe at batch 512 takes minutes per method on two cores.
#
# On an offline GPU node whose Python already has torch, timm, pyarrow, OpenCV with its contrib
# modules (opencv-contrib-python[-headless]: selective search, for the data step and the shards
# the gpu-marked tests build), click, pytest, DALI, scikit-image and scikit-learn (no venv,
# nothing to install), run the script itself with that Python (env.txt names what is missing):
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
ONLY=${STEPS:-}
FMNIST_DIR=${FMNIST_DIR:-/usr/share/datasets/fashion-mnist}
SHARDS=$OUT/sample-shards
# The data fills the largest global batch below; the batch sizes are the GPU figures' own.
SAMPLES=256
PIPELINE_BATCH=256
VERSUS_BATCH=256
TRAIN_BATCH=128
mkdir -p "$OUT"

if [ -n "$DRY" ]; then
    DEVICE=cpu
    PIPELINE_TIME=(--seconds 0 --rounds 1)
    TRAIN_TIME=(--steps 3 --warmup 0)
    SMALL_VIT=(--set "model.backbone_kwargs={depth: 1, embed_dim: 32, num_heads: 2}"
               --set "model.projector=[64, 64, 32]" --set "model.predictor=[64, 32]")
    SMALL_RESNET=(--set "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [8, 16, 32, 64], stem_width: 8}"
                  --set "model.projector=[64, 32]" --set "model.predictor=[64, 32]")
    QUALITY_MODE=(--dry-run)
else
    DEVICE=cuda
    PIPELINE_TIME=(--seconds 8 --rounds 3)
    TRAIN_TIME=(--steps 30 --warmup 10)
    SMALL_VIT=()
    SMALL_RESNET=()
    QUALITY_MODE=()
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: run with DRY_RUN=1 to run every step on the CPU')"
fi

NAMES=()
declare -A STATUS

wanted() {
    [ -z "$ONLY" ] && return 0
    case ",$ONLY," in *",$1,"*) return 0 ;; esac
    return 1
}

# run NAME CMD...: the command, its output in OUT/NAME.log (the last lines shown on failure),
# its status and seconds for the summary.
run() {
    local name=$1; shift
    NAMES+=("$name")
    echo "== $name: $*"
    local t0=$SECONDS
    if "$@" > "$OUT/$name.log" 2>&1; then
        STATUS[$name]="ok ($((SECONDS - t0)) s)"
    else
        STATUS[$name]="FAILED ($((SECONDS - t0)) s, see $OUT/$name.log)"
        tail -20 "$OUT/$name.log" || true
    fi
}

skip() {
    NAMES+=("$1")
    STATUS[$1]="skipped ($2)"
    echo "== $1: skipped ($2)"
}

environment() {
    echo "mode: ${DRY:+dry run (CPU)}${DRY:-GPU}"
    # never fails: what is missing is reported, and the steps that need it fail on their own
    "$PY" scripts/gpu-env.py || echo "the environment report failed: $PY scripts/gpu-env.py"
    if command -v nvidia-smi > /dev/null; then nvidia-smi || true; fi
}

build_data() {
    # one command, so that the step fails as a whole (a missing package, a failed search)
    PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} "$PY" scripts/sample-crops.py \
        "$OUT/sample-crops" "$SAMPLES" \
        && "${SSL[@]}" shards build "$OUT/sample-crops" "$SHARDS" --shard-size 64 --max-side 160 \
            --no-progress \
        && "${SSL[@]}" shards verify "$SHARDS"
}

environment | tee "$OUT/env.txt"

needs_shards=0
for s in pipeline-mos pipeline-univip train-mos-e2e train-univip; do
    wanted "$s" && needs_shards=1
done
if wanted data || [ "$needs_shards" = 1 ]; then
    if [ -f "$SHARDS/manifest.json" ]; then
        NAMES+=(data); STATUS[data]="ok (already built)"
    else
        run data build_data
    fi
fi
shards_ok() { [ -f "$SHARDS/manifest.json" ]; }

wanted pytest-gpu && run pytest-gpu "$PY" -m pytest -q -m gpu --junitxml="$OUT/pytest-gpu.xml"

for m in mos univip; do
    wanted "pipeline-$m" || continue
    if ! shards_ok; then skip "pipeline-$m" "no shards: the data step failed"; continue; fi
    run "pipeline-$m" "${SSL[@]}" bench pipeline --data "$SHARDS" --method "$m" \
        --batch-size "$PIPELINE_BATCH" --device "$DEVICE" "${PIPELINE_TIME[@]}" \
        --json "$OUT/pipeline_$m.json"
done

wanted train-mos && run train-mos "${SSL[@]}" bench train --config configs/mos_vits16_coco.yaml \
    --synthetic --baseline mocov3 --batch-size "$VERSUS_BATCH" --device "$DEVICE" \
    "${TRAIN_TIME[@]}" "${SMALL_VIT[@]}" --json "$OUT/train_mos_vs_mocov3.json"
if wanted train-mos-e2e; then
    if shards_ok; then
        run train-mos-e2e "${SSL[@]}" bench train --config configs/mos_vits16_coco.yaml \
            --data "$SHARDS" --batch-size "$TRAIN_BATCH" --device "$DEVICE" "${TRAIN_TIME[@]}" \
            "${SMALL_VIT[@]}" --json "$OUT/train_mos.json"
    else
        skip train-mos-e2e "no shards: the data step failed"
    fi
fi
if wanted train-univip; then
    if shards_ok; then
        run train-univip "${SSL[@]}" bench train --config configs/univip_r50_coco.yaml \
            --data "$SHARDS" --batch-size "$TRAIN_BATCH" --device "$DEVICE" "${TRAIN_TIME[@]}" \
            "${SMALL_RESNET[@]}" --json "$OUT/train_univip.json"
    else
        skip train-univip "no shards: the data step failed"
    fi
fi

build_fmnist() {
    for split in train test; do
        dir=$OUT/fmnist-$split
        test -f "$dir/manifest.json" || "${SSL[@]}" shards build "$FMNIST_DIR" "$dir" \
            --layout idx --split "$split" --min-side 8 --no-progress || return 1
    done
}

if wanted quality; then
    QTRAIN=${QUALITY_TRAIN:-$OUT/fmnist-train}
    QVAL=${QUALITY_VAL:-$OUT/fmnist-test}
    quality_data=1
    if [ -z "${QUALITY_TRAIN:-}" ]; then
        if [ -d "$FMNIST_DIR" ]; then
            run quality-data build_fmnist
            case "${STATUS[quality-data]}" in FAILED*) quality_data=0 ;; esac
        else
            quality_data=0
            skip quality "no Fashion-MNIST at $FMNIST_DIR: set FMNIST_DIR, or QUALITY_TRAIN and QUALITY_VAL"
        fi
    fi
    if [ "$quality_data" = 1 ]; then
        run quality "${SSL[@]}" bench quality --train "$QTRAIN" --val "$QVAL" \
            --out "$OUT/quality" --recipe gpu --device "$DEVICE" --budget-seconds 40 --seeds 0 \
            "${QUALITY_MODE[@]}"
    elif [ -z "${STATUS[quality]:-}" ]; then
        skip quality "no data: the quality-data step failed"
    fi
fi

echo "== gpu-check summary ($OUT${DRY:+, dry run on the CPU})"
failed=0
for name in "${NAMES[@]}"; do
    echo "  $name: ${STATUS[$name]}"
    case "${STATUS[$name]}" in FAILED*) failed=1 ;; esac
done
exit $failed
