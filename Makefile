# Every target bootstraps .venv when it is missing or older than pyproject.toml:
# torch==2.13.0 first (the local CPU wheel; a looser pin would pull a CUDA build), then
# the package in editable mode with its dev extras.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PYTHONUNBUFFERED := 1

.PHONY: demo test lint bench check-core clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,faces,svhn]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tlkfac demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

# the `bench` extra (ASDL) with torch pinned, then every default benchmark into docs/benchmarks
bench: $(STAMP)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0 -e '.[bench]'
	$(VENV)/bin/tlkfac bench $(BENCH_ARGS)

# a venv with torch alone and the package without extras: the optimizers must work there
check-core:
	rm -rf $(VENV)-core && $(PYTHON) -m venv $(VENV)-core
	$(VENV)-core/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
	$(VENV)-core/bin/python -m pip install -q --disable-pip-version-check .
	cd tests && ../$(VENV)-core/bin/python core_smoke.py

clean-venv:
	rm -rf $(VENV) $(VENV)-core
