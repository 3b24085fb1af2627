# Two commands set everything up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-dev

.PHONY: install test lint bench demo sweep clean protos

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# pytest exits 5 when it collected nothing: that must fail, not pass.
test: $(STAMP)
	$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check andes tests benchmarks
	$(VENV)/bin/mypy andes

# Regenerate andes/v1/*_pb2*.py* from protos/andes/v1/*.proto (the generated files are
# committed; tests/test_protos.py fails when they are stale).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. protos/andes/v1/*.proto

bench: $(STAMP)
	$(PY) benchmarks/planner.py
	$(PY) benchmarks/sim_speed.py

demo: $(STAMP)
	$(PY) -m andes demo

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis *.egg-info
