# `make demo` and `make test` set everything up (a .venv with the project and its tools) first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint browser bench clean

# Python keeps its compiled modules (__pycache__/) even where the environment says not to: the
# suite starts about 150 Python processes (runs, Ray workers, scripts), and each compiled the
# package again, 0.15 CPU-s apiece
unexport PYTHONDONTWRITEBYTECODE

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $(STAMP)

setup: $(STAMP)

# the demo catalog has bad rows on purpose: it ends with exit 6 (finished, some rows rejected)
demo: $(STAMP)
	$(BIN)/wanbatch run configs/demo.yaml --fresh || [ $$? -eq 6 ]

lint: $(STAMP)
	$(BIN)/ruff check pipeline tests scripts
	$(BIN)/ruff format --check pipeline tests scripts
	$(BIN)/mypy

# Debian's chromium for the report's browser tests, installed before the suite starts (the
# tests' own fixture installs it too when pytest runs alone, but then inside the suite's time)
browser:
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null \
		|| (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null)

# the suite on four workers (pytest-xdist: one test's waits on its sandbox are another's CPU; two
# cores are kept about 95 % busy); the Ray tests share one worker and its one Ray cluster, handed
# out first (tests/conftest.py, ONE_WORKER)
test: lint browser
	$(BIN)/pytest -q -n 4 --dist loadgroup

bench: $(STAMP)
	$(BIN)/python scripts/bench.py

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
