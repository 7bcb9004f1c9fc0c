"""pytest plugin: CPU seconds per test (the worker and its child processes), for finding what costs.

Use: ``pytest -p cpu_time_plugin`` (tests/helpers is on sys.path through conftest) with
``JAXTL_CPU_TIMES=FILE``: each worker appends one JSON line per test phase to FILE. The
suite is CPU-bound on a small machine, so CPU seconds, not wall seconds under contention
from the other worker, say what a test costs.
"""

import json
import os
import resource
import time

import pytest


def _cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        u = resource.getrusage(who)
        total += u.ru_utime + u.ru_stime
    return total


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    cpu0, wall0 = _cpu(), time.perf_counter()
    yield
    path = os.environ.get("JAXTL_CPU_TIMES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"test": item.nodeid, "cpu": round(_cpu() - cpu0, 2),
                                 "wall": round(time.perf_counter() - wall0, 2)}) + "\n")
