# The two quick-start commands: `make run` (the main job) and `make test`.
# Both create the virtualenv at .venv/ when missing and reuse it when present.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) sweeps/run.py space=kd_prune num_samples=50

data: $(STAMP)
	$(PY) data_prep/build.py

test: $(STAMP)  # lint and format check first (seconds), then every test; inner loop: `$(PY) -m pytest -m "not slow"`
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest
