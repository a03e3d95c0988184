# Single entry point. Every target that needs Python creates the venv first, so
# `make test` and `make serve` work alone on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch for the build side. This project's machines resolve it to a CPU build; plain PyPI's
# Linux wheel carries CUDA (GBs): there set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.installed

.PHONY: help setup test test-fast lint data train evaluate proto export parity gpu-check serve deploy-tools image-tools image image-test bench loadtest gpu-bench gpu-stage
.DEFAULT_GOAL := help

help:
	@echo "make serve   - export (if needed) and serve the default models on 127.0.0.1:50051"
	@echo "make test    - the whole test suite (what CI runs)"
	@echo "make test-fast - the tests not marked slow or e2e"
	@echo "make lint    - ruff + mypy"
	@echo "make export  - ONNX model repository models/<name>/<version>/ from the checkpoints"
	@echo "make parity  - ONNX vs PyTorch parity table (docs/parity.md)"
	@echo "make gpu-check / make gpu-bench - fp16 parity and timings / GPU benchmark (on a CUDA machine)"
	@echo "make bench   - every engine side by side -> docs/benchmarks.md (CPU, up to 20 min: its --max-minutes)"
	@echo "make loadtest - open-loop load test of a running server (RATE, DURATION, TARGET;"
	@echo "               LOADTEST_ARGS, e.g. --allow-remote for a TARGET off this machine)"
	@echo "make gpu-stage - stage the GPU checks for the device tool (.gpustage/CALLS)"
	@echo "make data    - build the Bible corpus, splits and tokenizers under data/"
	@echo "make train   - train the default models into models/"
	@echo "make evaluate - test scores and model cards (models/<name>/README.md)"
	@echo "make proto   - regenerate service/gen/ from proto/"
	@echo "make deploy-tools - promtool and yamllint for the deploy tests (as root)"
	@echo "make image-tools - buildah, podman, debootstrap and runc for the images (as root)"
	@echo "make image / make image-test - build the CPU image / build it and check it with podman (deploy/README.md)"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(if $(TORCH_INDEX),--index-url "$(TORCH_INDEX)") "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e '.[train,dev,peers,plot]'
	touch $@

setup: $(STAMP)

test: setup lint
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not e2e"

lint: setup
	$(PY) -m ruff check .
	$(PY) -m mypy transformer export service loadtest tests

SWORD_PACKAGES := sword-text-kjv sword-text-web sword-text-sparv
data: setup
	@test -d /usr/share/sword/modules/texts || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SWORD_PACKAGES); \
	  else echo "as root: apt-get install -y $(SWORD_PACKAGES)"; exit 1; fi; }
	$(PY) -m transformer.data build --out data

# The step counts the committed models were trained for (see their training.json). en-es
# is trained in two runs: the first stopped at its time limit with dev loss still falling,
# the second goes on from its weights. en-lm too: on 128-token blocks, then from those
# weights on 512-token ones, every position it serves. One run of 512-token blocks from
# scratch read far worse on short contexts (README.md gives both).
TRANSLATOR_STEPS ?= 3943
TRANSLATOR_MORE_STEPS ?= 2931
LM_STEPS ?= 1560
LM_LONG_STEPS ?= 400
train: setup
	$(PY) -m transformer.train translator --data data --out runs/translator-1/checkpoint --work-dir runs/translator-1/work --max-steps $(TRANSLATOR_STEPS) --eval-every 500
	$(PY) -m transformer.train translator --data data --out models/en-es/checkpoint --work-dir runs/translator-2/work --init-from runs/translator-1/checkpoint --lr 3.5e-4 --warmup 400 --max-steps $(TRANSLATOR_MORE_STEPS) --eval-every 500
	$(PY) -m transformer.train lm --data data --out runs/lm-128/checkpoint --work-dir runs/lm-128/work --block 128 --max-steps $(LM_STEPS) --eval-every 400
	$(PY) -m transformer.train lm --data data --out models/en-lm/checkpoint --work-dir runs/lm-512/work --init-from runs/lm-128/checkpoint --block 512 --lr 3e-4 --warmup 100 --max-steps $(LM_LONG_STEPS) --eval-every 100
	$(MAKE) evaluate

# Test scores and model cards (models/<name>/README.md).
evaluate: setup
	$(PY) -m transformer.evaluate translator --data data
	$(PY) -m transformer.evaluate lm --data data

proto: setup
	$(PY) -m service.gen

# ONNX model repository models/<name>/<version>/ from models/<name>/checkpoint/ (skips if up to date).
# Here version 1 is the build output of the checkpoint `make train` rewrites: --replace. Publish
# a new model beside a running one as a new version instead (deploy/README.md).
export: setup
	$(PY) -m export --repository models --replace

# ONNX vs PyTorch on the held-out test verses (needs `make data`): docs/parity.md.
parity: export
	$(PY) -m export.parity --repository models --data data --verses 1207 --out docs/parity.md

# On a CUDA machine with onnxruntime-gpu: fp16 + IOBinding parity and timings.
gpu-check:
	$(PY) -m export.gpu_check --version-dir models/en-es/1 --data data --out docs/gpu_check.md

# Deploy checks: tools the manifest tests use (each test skips, naming the tool, without it).
DEPLOY_BASE_IMAGE ?= localhost/transformer-serving-base:bookworm
IMAGE_FLAVOUR ?= cpu
IMAGE ?= localhost/transformer-serving:$(IMAGE_FLAVOUR)

deploy-tools: setup
	if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus yamllint; else echo "as root: apt-get install -y prometheus yamllint"; fi
	@command -v kubectl >/dev/null || echo "kubectl missing: the kustomize tests will skip"

# Container images without a Docker engine (buildah + podman + debootstrap base).
IMAGE_PACKAGES := buildah podman debootstrap runc
image-tools:
	if [ "$$(id -u)" = 0 ]; then apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(IMAGE_PACKAGES); else echo "as root: apt-get install -y $(IMAGE_PACKAGES)"; exit 1; fi

image:
	FLAVOUR=$(IMAGE_FLAVOUR) IMAGE=$(IMAGE) BASE_IMAGE=$(DEPLOY_BASE_IMAGE) deploy/scripts/build-image.sh

image-test: setup
	FLAVOUR=$(IMAGE_FLAVOUR) IMAGE=$(IMAGE) BASE_IMAGE=$(DEPLOY_BASE_IMAGE) PYTHON=$(PY) deploy/scripts/image-test.sh

# Side by side: PyTorch naive, HF generate, CTranslate2, onnxruntime offline, served
# static vs continuous (needs the en-es checkpoint; exports first) -> docs/benchmarks.md.
bench: export
	$(PY) -m loadtest.bench

TARGET ?= 127.0.0.1:50051
RATE ?= 5
DURATION ?= 30
LOADTEST_ARGS ?=
# Open-loop load test of a running server (make serve in another shell).
loadtest: setup
	$(PY) -m loadtest run --target $(TARGET) --rate $(RATE) --duration $(DURATION) $(LOADTEST_ARGS)

# For the lent GPU machine: onnxruntime-gpu and missing wheels, split to fit its calls;
# the calls to make are written to .gpustage/CALLS (the last runs loadtest/device/run.sh).
gpu-stage:
	loadtest/device/stage.sh

# On a CUDA machine: Transformer-base-shaped and en-es GPU benchmark with rooflines.
gpu-bench: setup
	$(PY) -m loadtest.gpu_bench --record docs/benchmarks.md

SERVE_ARGS ?=
serve: export
	$(PY) -m service --model-repository models $(SERVE_ARGS)
