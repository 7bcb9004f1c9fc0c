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

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")

# A jitted step whose temporaries (128 MiB: cumsum's intermediate) are far over
# glibc's 32 MiB mmap threshold, like a training step's.
CHILD = r"""
import json, resource
import jaxtl, jax, jax.numpy as jnp
step = jax.jit(lambda x: jnp.cumsum(jnp.sin(x), axis=0)[::64].sum())
x = jnp.ones((4096, 4096), jnp.float32)
expected = float(step(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
values = [float(step(x)) for _ in range(4)]
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4
print(json.dumps({"faults_per_call": faults, "async": bool(jax.config.read("jax_cpu_enable_async_dispatch")),
                  "same": values == [expected] * 4}))
"""
SCRUB = ("JAXTL_NO_MALLOC_TUNING", "JAX_CPU_ENABLE_ASYNC_DISPATCH", "GLIBC_TUNABLES", "MALLOC_MMAP_MAX_",
         "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")


def run_child(**env_extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_stops_per_step_page_faults():
    tuned = run_child()
    untuned = run_child(JAXTL_NO_MALLOC_TUNING="1")
    assert tuned["async"] is False and untuned["async"] is True
    assert tuned["same"] and untuned["same"]
    # 128 MiB of fresh pages is ~32,000 faults per call; a reused heap block needs none.
    assert untuned["faults_per_call"] > 10_000, untuned
    assert tuned["faults_per_call"] < 1_000, tuned


def test_user_malloc_or_dispatch_settings_are_respected():
    assert run_child(MALLOC_ARENA_MAX="2")["async"] is True
    assert run_child(JAX_CPU_ENABLE_ASYNC_DISPATCH="true")["async"] is True


def test_late_import_changes_nothing():
    """After JAX's backend exists the dispatch choice cannot apply, so neither setting is made."""
    code = ("import jax, jax.numpy as jnp; jnp.ones(2).block_until_ready()\n"
            "import jaxtl._host_memory as hm\n"
            "print(hm.keep_step_memory(), jax.config.read('jax_cpu_enable_async_dispatch'))")
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["False", "True"]
