# EdgeSpeed: `make demo` runs the demo, `make test` runs the tests. Each sets up .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEPS   := $(VENV)/.deps-installed
# The demo needs only the core and the fallback broker; the tests need the ML runtimes too.
DEMO_DEPS := $(VENV)/.demo-deps-installed

.PHONY: demo test test-fast test-fuzz lint vectors bench mosquitto clean help

help:
	@echo "make demo     run the end-to-end demo (broker, coordinator, device)"
	@echo "make test     run every tier: tests/unit, tests/integration (real Mosquitto), tests/e2e (processes)"
	@echo "make test-fast  the unit tier alone (no broker, no processes), without the slow model-optimisation tests"
	@echo "make lint     ruff and mypy"
	@echo "make bench    the benchmark suite against bare paho and onnxruntime (results in bench/results/)"
	@echo "make vectors  regenerate firmware_bridge/vectors from the reference codecs"

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' || \
	  { echo "EdgeSpeed needs Python 3.10 or newer ($(PYTHON) is older)"; exit 1; }
	$(PYTHON) -m venv $(VENV)

# Our own pins for what we build and test with (users' installs take any torch the extras allow):
# torch 2.13.0 is the CPU build these machines carry; an unpinned torch would pull a multi-GB CUDA build.
CONSTRAINTS := constraints.txt

$(DEMO_DEPS): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[demo]'
	@touch $@

$(DEPS): pyproject.toml $(CONSTRAINTS) | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c $(CONSTRAINTS) -e '.[dev,onnx,torch,tflite]'
	@touch $@

# The tests start their own Mosquitto on free ports; they need its binary and clients.
mosquitto:
	@if { command -v mosquitto || test -x /usr/sbin/mosquitto; } >/dev/null && command -v mosquitto_pub >/dev/null; then \
	  exit 0; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients; \
	elif command -v apt-get >/dev/null && command -v sudo >/dev/null && sudo -n true 2>/dev/null; then \
	  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto mosquitto-clients; \
	elif command -v brew >/dev/null; then \
	  brew install mosquitto; \
	else \
	  echo "The tests need Mosquitto. Install it, then run make test again:"; \
	  echo "  Debian/Ubuntu: sudo apt-get install mosquitto mosquitto-clients"; \
	  echo "  Fedora/RHEL:   sudo dnf install mosquitto"; \
	  echo "  macOS:         brew install mosquitto"; \
	  exit 1; \
	fi

demo: $(DEMO_DEPS)
	$(BIN)/edgespeed demo

test: $(DEPS) mosquitto lint
	$(BIN)/python -m pytest -q

test-fuzz: $(DEPS)
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q -m fuzz

# The unit tier: no broker, no processes; well under a minute.
test-fast: $(DEPS)
	$(BIN)/python -m pytest -q tests/unit -m "not slow"

lint: $(DEPS)
	$(BIN)/ruff check edgespeed tests examples
	$(BIN)/ruff format --check edgespeed tests examples
	$(BIN)/mypy

bench: $(DEPS) mosquitto
	$(BIN)/edgespeed bench --json bench/results/latest.json

vectors: $(DEPS)
	$(BIN)/python -m edgespeed.protocol.vectors firmware_bridge/vectors

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis build *.egg-info
