# Every target that needs the virtual environment creates it first, so on a fresh machine
# `make train` and `make test` are each one command.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
BASE_STAMP := $(VENV)/.installed-base
# Where the embedded defaults live: shards, checkpoints, the MLflow store (absolute path).
export CYCLEGAN_HOME ?= $(CURDIR)/runs
# A local Ray started by these targets runs without token auth (see README, "Ray jobs").
export RAY_AUTH_MODE ?= disabled
RAY_PORT ?= 6390
DASHBOARD_PORT ?= 8265
UI_PORT ?= 5000
ARGS ?=

.PHONY: setup setup-base test test-fast lint format train data ui bench ray-up-local ray-down-local cluster-local submit-demo clean help

help:
	@echo "make setup          create $(VENV) and install the project with its test tools"
	@echo "make setup-base     the same without the test tools (what make train installs)"
	@echo "make train          train the demo preset on the built-in scenes data (ARGS='...' adds flags)"
	@echo "make test           run the whole test suite"
	@echo "make lint           ruff lint + format check"
	@echo "make bench          train-step benchmark of the demo preset (see README, Performance)"
	@echo "make gpu-check      CUDA only: GPU tests, GPU train + translate, paper step TFLOP/s"
	@echo "make ui             MLflow UI on the local store, http://127.0.0.1:$(UI_PORT)"
	@echo "make ray-up-local   start a local Ray head for 'ray job submit'"
	@echo "make cluster-local  a local head plus a second node in its own mount namespace"
	@echo "make submit-demo    submit the demo training as a Ray job to the local head"

# Two stamps: the package alone (what training, the UI and Ray need) and, on top, the test
# tools (what the tests, lint and the GPU check need).
$(BASE_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -c constraints.txt -e .
	touch $(BASE_STAMP)

$(STAMP): $(BASE_STAMP)
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

setup-base: $(BASE_STAMP)

test: setup
	$(PY) -m pytest -q --durations=15 tests

test-fast: setup
	$(PY) -m pytest -q tests -m "not integration"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

data: setup-base
	@test -f $(CYCLEGAN_HOME)/data/scenes/manifest.json || \
		$(PY) -m pipeline.synth scenes $(CYCLEGAN_HOME)/data/scenes

train: data
	$(PY) -m pipeline.train --preset demo $(ARGS)

bench: setup
	$(PY) -m pipeline.bench step --preset demo --no-compile $(ARGS)

# The CUDA path in one command, meant to take under 8 minutes on one H100/H200; the report goes to
# $(CYCLEGAN_HOME)/bench/gpu-check-TIME.json (ARGS='--json FILE' to choose). Exits at once
# without a CUDA GPU.
.PHONY: gpu-check
gpu-check: setup
	$(PY) -m pipeline.bench gpu $(ARGS)

ui: setup-base
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CYCLEGAN_HOME)/mlflow.db \
		--default-artifact-root $(CYCLEGAN_HOME)/mlartifacts --host 127.0.0.1 --port $(UI_PORT)

ray-up-local: setup-base
	@# Two logical CPUs beyond the cores, so data decoding always fits beside training workers;
	@# idle workers kept a minute, so the data-decoding workers live from one pass to the next;
	@# workers at niceness 0, so Ray's own processes do not preempt a training step's threads.
	RAY_idle_worker_killing_time_threshold_ms=60000 RAY_worker_niceness=0 $(VENV)/bin/ray start --head --port $(RAY_PORT) --dashboard-host 127.0.0.1 \
		--dashboard-port $(DASHBOARD_PORT) --include-dashboard true --num-cpus $$(( $$(nproc) + 2 ))

ray-down-local: setup-base
	$(VENV)/bin/ray stop

# A second node on this machine in its own mount namespace (cluster/start_node.sh): it sees
# none of the driver's /tmp; training workers go there with
# ARGS='--set scaling.worker_resources=trainer=1'.
cluster-local: ray-up-local
	RAY=$(VENV)/bin/ray cluster/start_node.sh 127.0.0.1:$(RAY_PORT) $(CYCLEGAN_HOME)/cluster-local/node2 \
		node2 --num-cpus 2 --resources '{"trainer": 1}' --min-worker-port 30000 --max-worker-port 30999

submit-demo: data
	$(VENV)/bin/ray job submit --address http://127.0.0.1:$(DASHBOARD_PORT) --working-dir . \
		--runtime-env-json '{"env_vars": {"CYCLEGAN_HOME": "$(CYCLEGAN_HOME)", "RAY_AUTH_MODE": "$(RAY_AUTH_MODE)"}}' \
		-- $(abspath $(PY)) -m pipeline.train --preset demo $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
