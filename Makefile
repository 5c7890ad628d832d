# Two commands for a fresh machine (Python 3.11 only):
#   make serve   -> set up .venv and run the service on its embedded local stack
#   make test    -> set up .venv and run the default test suite
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Pinned versions that pass the tests (pip freeze of .[all]); `make lock` refreshes it.
LOCK   := requirements-lock.txt

.PHONY: setup setup-cpu lock test test-slow test-all test-ui test-install serve lint format bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(LOCK) -e ".[all]"
	touch $(STAMP)

# CPU-only torch, no CUDA libraries (2.4 GB instead of 6.8 GB; see README "Installing").
# CPU_TORCH is what pip installs first: PyTorch's CPU wheel index where it can be reached;
# on a machine that has a CPU build on disk, e.g. `make setup-cpu CPU_TORCH=torch==2.13.0`.
CPU_TORCH ?= torch --index-url https://download.pytorch.org/whl/cpu
setup-cpu:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(CPU_TORCH)
	grep -vE '^(torch|torchvision|triton|nvidia-|cuda-)' $(LOCK) > $(VENV)/lock-cpu.txt
	# keep the torch just installed: a newer torchvision would otherwise pull PyPI's CUDA torch
	$(PY) -m pip list --format=freeze | grep -E '^(torch|torchvision)==' >> $(VENV)/lock-cpu.txt
	$(PY) -m pip install --quiet -c $(VENV)/lock-cpu.txt -e ".[all]"
	touch $(STAMP)

# Resolve afresh (newest versions pyproject.toml allows), rewrite the lock, reinstall, test.
lock:
	rm -rf .venv-lock
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --upgrade pip
	.venv-lock/bin/python -m pip install --quiet ".[all]"
	{ sed -n '/^#/p' $(LOCK); .venv-lock/bin/python -m pip freeze --exclude cellpose-finetuning; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf .venv-lock
	$(MAKE) test

# The default suite, then the built wheel in a fresh venv per extra (tests/packaging/
# test_install.py: marked slow, minutes on 2 cores, so it runs once here rather than in
# every `pytest`; CI runs `make test`, so it runs both).
test: setup
	$(PY) -m pytest
	$(PY) -m pytest -m slow tests/packaging/test_install.py

test-slow: setup
	$(PY) -m pytest -m slow

test-all: setup
	$(PY) -m pytest -m "slow or not slow"

# The built wheel in a fresh venv per extra (base, client, export, server): imports and
# `demo` from outside the checkout (tests/packaging/test_install.py, marked slow; installs
# with uv, torch downloaded once into uv's cache). `make test` runs it too.
test-install: setup
	$(PY) -m pytest tests/packaging/test_install.py -m slow -v -rA


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
	rm -rf $(VENV) .venv-lock .pytest_cache .ruff_cache
