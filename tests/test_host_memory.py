"""`import jaxtl` keeps XLA's CPU step memory between steps (jaxtl/_host_memory.py).

Each case runs in a fresh interpreter: the settings act only before JAX's CPU
backend exists, and glibc's malloc settings are per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxtl import _host_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")

# A jitted step whose temporaries (128 MiB: cumsum's intermediate) are far over
# glibc's 32 MiB mmap threshold, like a training step's.
CHILD = r"""
import json, resource
import jaxtl, jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0)[::64].sum())
x = jnp.ones((4096, 4096), jnp.float32)
expected = float(step(x))
faults, values = [], []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    values.append(float(step(x)))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"median_faults_per_call": sorted(faults)[len(faults) // 2], "async": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
                  "same": values == [expected] * 7}))
"""
# Every variable that makes jaxtl leave the settings alone: the children start without them.
SCRUB = (_host_memory.OPT_OUT, "JAX_CPU_ENABLE_ASYNC_DISPATCH", "GLIBC_TUNABLES", *_host_memory.USER_MALLOC_VARIABLES)


def run_python(code: str, **env_extra: str) -> str:
    """stdout of ``code`` in a fresh interpreter whose environment lacks SCRUB (plus env_extra)."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def run_child(**env_extra: str) -> dict:
    return json.loads(run_python(CHILD, **env_extra).strip().splitlines()[-1])


def test_import_cuts_per_step_page_faults():
    tuned = run_child()
    untuned = run_child(JAXTL_NO_MALLOC_TUNING="1")
    assert tuned["async"] is False and untuned["async"] is True
    assert tuned["same"] and untuned["same"]
    # 128 MiB of fresh pages is ~32,800 faults per call; a reused heap block needs none.
    # The median call: in some processes one call (not always the first) grows the heap
    # once (strace: a single brk, no mmap) and faults 32,768 pages, and every later call
    # reuses it (measured per call: [1, 1, 2, 1, 1, 32767, 0, 0]). Untuned, every call
    # mmaps and faults the whole block afresh.
    assert untuned["median_faults_per_call"] > 25_000, untuned
    assert tuned["median_faults_per_call"] < 100, (tuned, untuned)


GIL_CHILD = r"""
import threading, time
import jaxtl, jax, jax.numpy as jnp
assert not jax.config.read("jax_cpu_enable_async_dispatch")
step = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0)[::64].sum())
x = jnp.ones((4096, 4096), jnp.float32)
step(x).block_until_ready()
count, stop = [0], [False]
def spin():
    while not stop[0]:
        count[0] += 1
thread = threading.Thread(target=spin)
thread.start()
t0, c0 = time.perf_counter(), count[0]
for _ in range(4):
    step(x)
during_steps, elapsed = count[0] - c0, time.perf_counter() - t0
c1 = count[0]
time.sleep(elapsed)
during_sleep = count[0] - c1
stop[0] = True
thread.join()
print(during_steps / during_sleep)
"""


def test_python_threads_run_during_a_synchronous_step():
    """The loader's threads keep decoding while a step runs: the step releases the GIL.

    A thread spinning in Python advances during the steps at a good fraction of its pace
    during a sleep of the same length; with the GIL held it would advance only between steps.
    """
    # measured: ~0.5 on 2 busy cores; a call that holds the GIL (ctypes.PyDLL usleep) gives ~0.03
    assert float(run_python(GIL_CHILD).split()[-1]) > 0.15


def test_user_malloc_or_dispatch_settings_are_respected():
    assert run_child(MALLOC_ARENA_MAX="2")["async"] is True
    assert run_child(JAX_CPU_ENABLE_ASYNC_DISPATCH="true")["async"] is True


def test_late_import_changes_nothing():
    """After JAX's backend exists the dispatch choice cannot apply, so neither setting is made."""
    code = ("import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready()\n"
            "import jaxtl._host_memory as hm\n"
            "print(hm.keep_step_memory(), jax.config.read('jax_cpu_enable_async_dispatch'))")
    assert run_python(code).split() == ["False", "True"]


class _RefusingLibc:
    """A C library whose mallopt accepts M_MMAP_MAX but refuses M_TRIM_THRESHOLD."""

    def __init__(self):
        self.calls = []

        def mallopt(param, value):  # a plain function: keep_step_memory sets .argtypes on it
            self.calls.append((param, value))
            return 0 if param == _host_memory.M_TRIM_THRESHOLD else 1

        self.mallopt = mallopt


def test_half_applied_malloc_settings_are_undone(monkeypatch):
    """If glibc takes the first setting and refuses the second, the first is put back and nothing else changes."""
    for name in SCRUB:
        monkeypatch.delenv(name, raising=False)
    libc = _RefusingLibc()
    monkeypatch.setattr(_host_memory, "_glibc", lambda: libc)
    monkeypatch.setattr(_host_memory, "backend_already_started", lambda: False)
    assert _host_memory.keep_step_memory() is False
    assert libc.calls == [(_host_memory.M_MMAP_MAX, 0), (_host_memory.M_TRIM_THRESHOLD, _host_memory.NO_TRIM),
                          (_host_memory.M_MMAP_MAX, _host_memory.GLIBC_DEFAULT_MMAP_MAX)]
