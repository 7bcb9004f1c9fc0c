"""Default XLA flags that make jaxtl fast on CPU, applied before JAX starts.

Why: jaxlib 0.10 sends every CPU convolution to YNNPACK. That path uses one
core and is very slow for convolutions (measured on a 2-core AVX-512 machine:
dense 3x3 conv forward 94 -> 164 GFLOP/s and backward 55 -> 126 GFLOP/s when
convolutions go back to Eigen). Only convolutions are moved: switching YNNPACK
off entirely lost the ResNet training gain.

The flag only exists in some jaxlib builds, and XLA aborts the process on an
unknown flag, so it is added only when the installed jaxlib binary contains
its name. Users opt out with ``JAXTL_NO_XLA_FLAGS=1`` or by setting any
``--xla_cpu_experimental_ynn_fusion_type`` themselves.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import sys
from pathlib import Path

YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
CPU_CONV_FLAG = f"--{YNN_FLAG_NAME}=-individual_convolution"


def _jaxlib_knows_flag(name: str) -> bool:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return False
    needle = name.encode()
    for location in spec.submodule_search_locations:
        for lib in sorted(Path(location).glob("*.so")):
            try:
                with open(lib, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as m:
                    if m.find(needle) >= 0:
                        return True
            except (OSError, ValueError):
                continue
    return False


def backend_already_started() -> bool:
    """True when JAX has created its backends (too late for XLA_FLAGS)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


def apply_default_flags() -> str | None:
    """Add the CPU convolution flag to XLA_FLAGS if it is safe and useful.

    Returns the flag added, or None when nothing was changed.
    """
    if os.environ.get("JAXTL_NO_XLA_FLAGS"):
        return None
    current = os.environ.get("XLA_FLAGS", "")
    if YNN_FLAG_NAME in current:
        return None  # the user chose a setting; respect it
    if backend_already_started():
        return None  # XLA already parsed its flags; changing them now does nothing
    if not _jaxlib_knows_flag(YNN_FLAG_NAME):
        return None
    os.environ["XLA_FLAGS"] = (current + " " + CPU_CONV_FLAG).strip()
    return CPU_CONV_FLAG
