# ssl-cli: every target sets up what it needs (the venv) by itself.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev

DATASET ?= sample
OUT ?= data/shards/$(DATASET)$(if $(filter fmnist,$(DATASET)),_$(SPLIT))
COCO_DIR ?= data/coco/train2017
COCO_ANN ?=
IMAGENET_DIR ?=
FMNIST_DIR ?= /usr/share/datasets/fashion-mnist
SPLIT ?= train
SRC ?=
WORKERS ?=
SHARDS_ARGS ?=

METHOD ?= mos
NPROC ?= 1
CONFIG ?= $(firstword $(wildcard configs/$(METHOD)_*_$(DATASET).yaml))
RUN ?= runs/$(METHOD)_$(DATASET)
PRETRAIN_ARGS ?=

.PHONY: setup setup-dev test lint demo shards pretrain bench gpu-check wheel clean

# setup: the package and the demo's sample photographs (scikit-image, scikit-learn);
# setup-dev: also pytest, ruff, Ray and the test-only references.
setup: $(STAMP)
setup-dev: $(DEV_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[demo]'
	touch $(STAMP)

$(DEV_STAMP): pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install -q -e '.[dev]'
	touch $(DEV_STAMP) $(STAMP)

test: $(DEV_STAMP)
	$(BIN)/pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check pipeline shards train cli tests
	$(BIN)/ruff format --check pipeline shards train cli tests

demo: $(STAMP)
	$(BIN)/ssl-cli demo --out runs/demo

shards: $(STAMP)
	@set -e; case "$(DATASET)" in \
	  sample)   src="@sample" ;; \
	  coco)     test -d "$(COCO_DIR)" || { echo "error: COCO images not found at '$(COCO_DIR)'; set COCO_DIR=/path/to/coco/train2017" >&2; exit 2; }; src="$(COCO_DIR)"; \
	            if [ -n "$(COCO_ANN)" ]; then test -f "$(COCO_ANN)" || { echo "error: COCO annotations not found at '$(COCO_ANN)'; set COCO_ANN=/path/to/instances_train2017.json" >&2; exit 2; }; src="$$src --annotations $(COCO_ANN)"; fi ;; \
	  imagenet) test -n "$(IMAGENET_DIR)" -a -d "$(IMAGENET_DIR)" || { echo "error: ImageNet not found at '$(IMAGENET_DIR)'; set IMAGENET_DIR=/path/to/imagenet/train" >&2; exit 2; }; src="$(IMAGENET_DIR) --layout imagenet" ;; \
	  folder)   test -n "$(SRC)" -a -d "$(SRC)" || { echo "error: folder '$(SRC)' not found; set SRC=/path/to/images" >&2; exit 2; }; src="$(SRC)" ;; \
	  fmnist)   test -d "$(FMNIST_DIR)" || { echo "error: Fashion-MNIST not found at '$(FMNIST_DIR)'; apt-get install dataset-fashion-mnist, or set FMNIST_DIR" >&2; exit 2; }; src="$(FMNIST_DIR) --layout idx --split $(SPLIT)" ;; \
	  *) echo "error: unknown DATASET='$(DATASET)'; choose one of: sample coco imagenet folder fmnist" >&2; exit 2 ;; \
	esac; \
	$(BIN)/ssl-cli shards build $$src $(OUT) $(if $(WORKERS),--workers $(WORKERS)) $(SHARDS_ARGS); \
	$(BIN)/ssl-cli shards verify $(OUT)

pretrain: $(STAMP)
	@test -n "$(CONFIG)" || { echo "error: no configs/$(METHOD)_*_$(DATASET).yaml (METHOD=mos|univip|byol|mocov3, DATASET=coco; or CONFIG=path)" >&2; exit 2; }
	@test -f "$(OUT)/manifest.json" || { echo "error: no finished shards in '$(OUT)'; run: make shards DATASET=$(DATASET)" >&2; exit 2; }
	$(if $(filter 1,$(NPROC)),$(BIN)/ssl-cli,$(BIN)/torchrun --standalone --nproc-per-node $(NPROC) $(BIN)/ssl-cli) pretrain --config $(CONFIG) --data $(OUT) --out $(RUN) $(PRETRAIN_ARGS)

# A wheel in dist/ (pip install 'dist/ssl_cli-VERSION-py3-none-any.whl[demo]' elsewhere).
wheel: $(STAMP)
	rm -rf build
	$(BIN)/pip wheel -q --no-deps -w dist .
	@ls dist/*.whl

clean:
	rm -rf runs build dist *.egg-info

# Benchmarks on the embedded sample (BENCH_SHARDS= a real shard folder for real figures).
BENCH_SHARDS ?= runs/bench/shards
BENCH_OUT ?= runs/bench

bench: $(STAMP)
	mkdir -p $(BENCH_OUT)
	$(BIN)/ssl-cli bench shards @sample --max-side 224 --max-side 320 --max-side 400 --json $(BENCH_OUT)/shards.json
	test -f $(BENCH_SHARDS)/manifest.json || $(BIN)/ssl-cli shards build @sample $(BENCH_SHARDS) --shard-size 8 --no-progress
	for m in mos univip multicrop; do $(BIN)/ssl-cli bench pipeline --data $(BENCH_SHARDS) --method $$m --json $(BENCH_OUT)/pipeline_$$m.json || exit 1; done
	$(BIN)/ssl-cli bench train --config configs/demo_mos_cpu.yaml --data $(BENCH_SHARDS) --json $(BENCH_OUT)/train_mos.json
	$(BIN)/ssl-cli bench train --config configs/demo_univip_cpu.yaml --data $(BENCH_SHARDS) --json $(BENCH_OUT)/train_univip.json

# Every GPU check in one call, the first command on a GPU machine (docs/gpu.md): sample data,
# pytest -m gpu, pipeline/train/quality benchmarks; JSON figures and logs in GPU_CHECK_OUT.
# DRY_RUN=1: every step on the CPU, same data, batch and view sizes; STEPS=a,b: only those.
# On an offline GPU node with its own Python: PYTHON=... bash scripts/gpu-check.sh (no venv).
GPU_CHECK_OUT ?= runs/gpu-check
gpu-check: $(DEV_STAMP)
	BIN=$(BIN) DRY_RUN=$(DRY_RUN) GPU_CHECK_OUT=$(GPU_CHECK_OUT) STEPS=$(STEPS) bash scripts/gpu-check.sh
