# ocm — two commands matter: `make demo` and `make test`. Both install what they need first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export OCM_HOME ?= $(CURDIR)/.ocm
export DAGSTER_HOME ?= $(OCM_HOME)/dagster
export RAY_USAGE_STATS_ENABLED := 0
export DVC_NO_ANALYTICS := 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export RAY_DATA_DISABLE_PROGRESS_BARS := 1

.PHONY: install demo test test-all test-slow dev stop lint bench lock clean-state lineage-screenshots

install:
	@scripts/install.sh

demo: install
	@$(PY) -m scripts.demo

# The tests not marked slow, in file order (what .ci/run runs). `make test-all` runs every test, the slow
# ones included, in a shuffled order (its seed is printed: PYTEST_ARGS=--randomly-seed=N repeats an order).
# It is not CI's default yet: its first full run here failed tests that pass alone (docs/embedded.md#tests).
test: install
	@$(PY) -m pytest -m "not slow" -p no:cacheprovider $(PYTEST_ARGS)

test-all: install
	@$(PY) -m pytest -p no:cacheprovider -p randomly $(PYTEST_ARGS)

test-slow: install
	@$(PY) -m pytest -m slow -p no:cacheprovider --durations=0 $(PYTEST_ARGS)

dev: install
	@scripts/dev.sh start

stop:
	@scripts/dev.sh stop

lint: install
	@$(VENV)/bin/ruff check ocm_assets ocm_resources ocm_ml ocm_cli tests benchmarks scripts
	@$(VENV)/bin/basedpyright -p pyproject.toml

bench: install
	@$(PY) benchmarks/load_time.py
	@$(PY) benchmarks/sensor_tick.py

# Headless Chromium screenshots of the asset lineage into docs/ (installs Debian's chromium).
lineage-screenshots:
	@OCM_INSTALL_CHROMIUM=1 scripts/install.sh
	@$(PY) scripts/screenshot_lineage.py

# Regenerate requirements.lock from requirements.txt (needs the package registry).
lock:
	rm -rf .venv-lock && python3 -m venv .venv-lock
	.venv-lock/bin/pip install -q -r requirements.txt
	.venv-lock/bin/pip install -q --no-deps antlr4-python3-runtime==4.13.2 omegaconf==2.4.0
	.venv-lock/bin/pip uninstall -y -q hydra-core
	.venv-lock/bin/pip freeze --all --exclude pip --exclude-editable | grep -v '^ocm' > requirements.lock
	rm -rf .venv-lock

clean-state:
	rm -rf $(OCM_HOME)
