"""Keep XLA's CPU step memory between steps, applied before JAX starts.

Why: XLA's CPU runtime allocates all of a step's temporaries as one block per
execution (495 MiB for a ViT-Tiny fine-tune step at 128 px, batch 32). glibc
serves blocks that large with a fresh ``mmap`` and unmaps them on ``free``, so
every step page-faults its whole working set again: measured on a 2-core Xeon,
139,000 minor faults and 0.3 s of kernel time per ViT-Tiny step, 152,000 per
MobileNetV2 step.

Two settings together stop that:

* ``jax_cpu_enable_async_dispatch=False``: single-device CPU executions run on
  the calling thread. With async dispatch a pool thread allocates the block,
  from a glibc arena other than the main one; those arenas ``mmap`` large
  blocks whatever ``mallopt`` says. The GIL is released while a step runs, so
  jaxtl's background loader threads keep decoding during the step.
* ``mallopt(M_MMAP_MAX, 0)`` and ``mallopt(M_TRIM_THRESHOLD, -1)``: the main
  arena serves large blocks from its heap and keeps them after ``free`` (no
  trimming), so the next step reuses the same, already mapped, pages.

Measured same machine, fine-tune 128 px batch 32, ms per step before -> after:
MobileNetV2 718 -> 493, ViT-Tiny 716 -> 473, ResNet-18 894 -> 793; MobileNetV2
inference 140 -> 82. The cost: the process keeps its peak heap instead of
returning freed memory to the system. Multi-device steps (pmap / shard_map over
several devices) still run on pool threads and are unchanged: they fault their
temporaries in every step. ``mallopt(M_ARENA_MAX, 1)`` would stop that, but it
made the single-device MobileNetV2 step at 224 px 1.6x slower (one arena for all
of XLA's threads), so it is not set; see benchmarks/README.md.

Opt out with ``JAXTL_NO_MALLOC_TUNING=1``. Nothing is changed when the user set
``JAX_CPU_ENABLE_ASYNC_DISPATCH`` or glibc's malloc variables themselves, when
JAX's backends already exist (too late for the dispatch setting), or when the C
library is not glibc.
"""

from __future__ import annotations

import ctypes
import os
import sys

from jaxtl._xla_flags import backend_already_started

OPT_OUT = "JAXTL_NO_MALLOC_TUNING"
# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# -1 disables trimming (mallopt(3)): a positive int tops out at 2 GiB, and a ResNet-50
# fine-tune step at 224 px (2.9 GiB of temporaries) was returned and faulted in every step.
NO_TRIM = -1
GLIBC_DEFAULT_MMAP_MAX = 65536  # glibc's DEFAULT_MMAP_MAX (malloc.c)
USER_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")


def _user_chose_malloc_settings() -> bool:
    if any(name in os.environ for name in USER_MALLOC_VARIABLES):
        return True
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def _glibc():
    """The process's C library when it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # only glibc has it (musl does not)
        return libc
    except (OSError, AttributeError):
        return None


def keep_step_memory() -> bool:
    """Apply both settings if it is safe; returns True when they were applied."""
    if os.environ.get(OPT_OUT):
        return False
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ or _user_chose_malloc_settings():
        return False  # the user chose; respect it
    if backend_already_started():
        return False  # the CPU client exists: the dispatch setting would not apply to it
    libc = _glibc()
    if libc is None:
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    if not libc.mallopt(M_MMAP_MAX, 0):
        return False
    if not libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM):
        libc.mallopt(M_MMAP_MAX, GLIBC_DEFAULT_MMAP_MAX)  # undo the half that applied
        return False
    import jax

    jax.config.update("jax_cpu_enable_async_dispatch", False)
    return True
