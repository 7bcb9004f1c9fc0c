"""Shared test set-up.

Tests never touch the network: downloads are switched off, and caches point
into a per-session temporary folder so a developer's real caches are neither
used nor polluted (the embedded offline weights package is still found).

Compiled programs are shared by the whole run: one JAX persistent compilation
cache for every xdist worker, the tests' own processes and the command lines
they start (see :func:`pytest_configure`).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/parity.py, tests/helpers

os.environ.setdefault("JAXTL_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_stack_available() -> bool:
    if not (has_module("torch") and has_module("torchvision") and has_module("timm")):
        return False
    try:
        import torchvision  # noqa: F401  (fails when torch and torchvision builds do not match)
        import timm  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


TORCH_OK = torch_stack_available()


@pytest.hookimpl(trylast=True)  # after pytest's own configure, which makes the temporary-folder factory
def pytest_configure(config):
    """One JAX compilation cache for the run, shared by the xdist workers and their subprocesses.

    Why: the suite is CPU-bound, and many tests compile the same programs (a model's
    initialisation, a small ResNet-18's train step in the command-line tests); measured on
    test_resnet + test_strategies + test_mobilenet: 495 -> 449 CPU seconds. A fresh folder per
    run, in pytest's temporary folder (pytest keeps the last three runs'), so a run never
    loads what an earlier one compiled. The size bound switches on JAX's file lock, which
    makes concurrent writers safe. Tests of jaxtl's own cache choice unset it for their runs.
    """
    from jaxtl import runtime  # the command lines' own settings

    # The tests run under the CPU settings the command lines make, made before any test starts JAX.
    runtime.configure(compile_cache=False)
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") is not None:  # the developer's choice (or a worker's parent)
        return
    base = config._tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla-cache"
    folder.mkdir(exist_ok=True)

    settings = {"jax_compilation_cache_dir": str(folder),
                "jax_persistent_cache_min_compile_time_secs": runtime.COMPILE_CACHE_MIN_SECONDS,
                "jax_compilation_cache_max_size": runtime.COMPILE_CACHE_MAX_BYTES}
    os.environ.update({k.upper(): str(v) for k, v in settings.items()})  # read by jax when it is imported
    if "jax" in sys.modules:  # imported already: tell it directly
        import jax

        for name, value in settings.items():
            jax.config.update(name, value)


def pytest_addoption(parser):
    parser.addoption("--all-variants", action="store_true",
                     help="also run the tests marked 'variants' (every size of every model family; make test-all)")


def pytest_collection_modifyitems(config, items):
    # The larger variants of a family (resnet101/152, efficientnet_b1..b7, ...) run the
    # same code as the variant tested by default, only deeper or wider; their parity is
    # measured by tools/parity_report.py and `make test-all`. Deselected here, not skipped.
    if not config.getoption("--all-variants"):
        kept, variants = [], []
        for item in items:
            (variants if "variants" in item.keywords else kept).append(item)
        if variants:
            config.hook.pytest_deselected(items=variants)
            items[:] = kept
    if TORCH_OK:
        return
    skip = pytest.mark.skip(reason="needs the [torch] extra (torch, torchvision>=0.29, timm): pip install -e '.[dev]'")
    for item in items:
        if "torch" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_caches(tmp_path_factory):
    cache = tmp_path_factory.mktemp("caches")
    old = {k: os.environ.get(k) for k in ("TORCH_HOME", "HF_HOME", "HF_HUB_CACHE", "JAXTL_CACHE")}
    os.environ["TORCH_HOME"] = str(cache / "torch")
    os.environ["HF_HOME"] = str(cache / "hf")
    os.environ.pop("HF_HUB_CACHE", None)
    os.environ["JAXTL_CACHE"] = str(cache / "jaxtl")
    yield cache
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
