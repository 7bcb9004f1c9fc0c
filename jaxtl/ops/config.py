"""Which implementation the ops take: the fast paths, or the plain references inside a block."""

from __future__ import annotations

import contextvars
from contextlib import contextmanager

_USE_REFERENCE = contextvars.ContextVar("jaxtl_ops_use_reference", default=False)


@contextmanager
def reference_implementations(enabled: bool = True):
    """Every op traced inside this block takes its plain reference implementation.

    Read when a function is traced. JAX caches a function's trace, so trace a
    function inside the block that was not traced outside it (a new lambda will do).
    """
    token = _USE_REFERENCE.set(enabled)
    try:
        yield
    finally:
        _USE_REFERENCE.reset(token)


def fast_paths_enabled() -> bool:
    """False inside :func:`reference_implementations`."""
    return not _USE_REFERENCE.get()
