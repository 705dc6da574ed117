# The README's commands. Each sets itself up on a fresh machine, then runs.
#   make demo   set up, then run the Linear layer against torch (correctness and speed)
#   make test   set up, then run the whole test suite
#   make bench  set up, then run `brainkern bench linear`, `conv` and `pool`

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch's CPU build; on this project's machines pip finds it on local disk. Elsewhere set
# TORCH_SPEC (e.g. to a CUDA build) or preinstall torch in the venv.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.brainkern-setup

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	# The native core builds against pybind11 only (never torch): no build isolation needed.
	$(PY) -m pip install -q "setuptools>=77" wheel "pybind11>=2.12"
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/brainkern demo

# Two test processes (this project's machines have two cores): most of the suite is single-threaded
# Python (Triton's interpreter, Numba's first compiles); 11.6 -> 9.1 min on a Zen 1.
TEST_WORKERS ?= 2

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal

bench: setup
	$(VENV)/bin/brainkern bench linear
	$(VENV)/bin/brainkern bench conv
	$(VENV)/bin/brainkern bench pool

clean:
	rm -rf build brainkern/*.so *.egg-info
