# Two commands: `make demo` and `make test`. Each creates .venv when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXTRAS ?= merlin,triton,serve,test

.PHONY: demo test test-fast bench clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: 2.13.0 is the local CPU wheel, so no CUDA build gets pulled on a CPU machine
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m merlin_longseq.cli demo

test: $(STAMP)
	$(PY) -m pytest -q tests

test-fast: $(STAMP)
	$(PY) -m pytest -q tests -m "not slow"

bench:
	python3 benchmarks/bench_kernels.py
	python3 benchmarks/bench_stca_layer.py
	python3 benchmarks/bench_group_attention.py

clean-venv:
	rm -rf $(VENV)
