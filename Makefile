# Two commands for a fresh machine (Python 3.11 only):
#   make serve   -> set up .venv and run the service on its embedded local stack
#   make test    -> set up .venv and run the default test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-slow test-all test-ui serve lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[all]"
	touch $(STAMP)

test: setup
	$(PY) -m pytest

test-slow: setup
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

# Browser tests of the web page (tests/web, marker ui): Playwright (the ui extra) driving
# Debian's Chromium, installed with apt-get when missing. Screenshots go to docs/screenshots/.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
test-ui: setup
	$(PY) -c "import playwright" 2>/dev/null || $(PY) -m pip install --quiet -e ".[ui]"
	@[ -x /usr/bin/chromium ] || [ -n "$$CHROMIUM" ] || { echo "installing chromium (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium; }
	CPFT_REQUIRE_UI=1 CPFT_SCREENSHOT_DIR=$(CURDIR)/docs/screenshots $(PY) -m pytest tests/web -m ui

serve: setup
	$(VENV)/bin/cellpose-finetuning serve $(SERVE_ARGS)

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks bioengine-app
	$(VENV)/bin/ruff format --check src tests benchmarks bioengine-app

format: setup
	$(VENV)/bin/ruff format src tests benchmarks
	$(VENV)/bin/ruff check --fix src tests benchmarks

bench: setup
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
