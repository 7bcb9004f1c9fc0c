"""jaxtl.runtime.configure(): the process-wide CPU settings, made by one call and never on import.

Each case runs in a fresh interpreter: the settings act only before JAX's CPU
backend exists, and glibc's malloc settings are per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxtl import runtime

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings are Linux-only")

# A jitted step whose temporaries (128 MiB: cumsum's intermediate) are far over
# glibc's 32 MiB mmap threshold, like a training step's.
CHILD = r"""
import json, os, resource, sys
import jaxtl, jax, jax.numpy as jnp
if "configure" in sys.argv:
    jaxtl.runtime.configure(compile_cache=False)
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
SCRUB = (runtime.NO_MALLOC_TUNING, "JAX_CPU_ENABLE_ASYNC_DISPATCH", "GLIBC_TUNABLES", *runtime.USER_MALLOC_VARIABLES)


def run_python(code: str, *args: str, stderr: list | None = None, **env_extra: str) -> str:
    """stdout of ``code`` in a fresh interpreter whose environment lacks SCRUB (plus env_extra)."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUB}
    env.update(env_extra)
    r = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    if stderr is not None:
        stderr.append(r.stderr)
    return r.stdout


def run_child(*args: str, **env_extra: str) -> dict:
    return json.loads(run_python(CHILD, *args, **env_extra).strip().splitlines()[-1])


IMPORT_CHILD = r"""
import json, os, sys
import jax
keys = sorted(jax.config.values)
before = {"XLA_FLAGS": os.environ.get("XLA_FLAGS"), "config": {k: repr(jax.config.values[k]) for k in keys}}
import jaxtl, jaxtl.train, jaxtl.predict, jaxtl.evaluate, jaxtl.convert, jaxtl.training.loop  # noqa: E401
after = {"XLA_FLAGS": os.environ.get("XLA_FLAGS"), "config": {k: repr(jax.config.values[k]) for k in keys}}
print(json.dumps({"same": before == after, "before": before["XLA_FLAGS"], "after": after["XLA_FLAGS"],
                  "changed": [k for k in keys if before["config"][k] != after["config"][k]]}))
"""


def test_import_changes_nothing_global():
    """Importing jaxtl (and its command-line modules) leaves XLA_FLAGS, JAX's config and the allocator alone."""
    seen = json.loads(run_python(IMPORT_CHILD, XLA_FLAGS="--xla_cpu_use_thunk_runtime=true").splitlines()[-1])
    assert seen["same"], seen
    # The allocator: with jaxtl imported but not configured, glibc still maps and faults each step's block afresh.
    untouched = run_child()
    assert untouched["async"] is True and untouched["median_faults_per_call"] > 25_000, untouched


def test_configure_cuts_per_step_page_faults():
    tuned = run_child("configure")
    untuned = run_child("configure", JAXTL_NO_MALLOC_TUNING="1")
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
jaxtl.runtime.configure(compile_cache=False)
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
    assert run_child("configure", MALLOC_ARENA_MAX="2")["async"] is True
    assert run_child("configure", JAX_CPU_ENABLE_ASYNC_DISPATCH="true")["async"] is True


def test_configure_after_jax_started_changes_nothing_and_says_so_once():
    """After JAX's backend exists the settings cannot apply: none is made, and one line says what to do."""
    code = ("import os, jax, jax.numpy as jnp; jnp.ones(2).block_until_ready()\n"
            "from jaxtl import runtime\n"
            "flags = os.environ.get('XLA_FLAGS')\n"
            "first, second = runtime.configure(compile_cache=False), runtime.configure(compile_cache=False)\n"
            "print(first.step_memory_kept, jax.config.read('jax_cpu_enable_async_dispatch'), "
            "os.environ.get('XLA_FLAGS') == flags)")
    err = []
    assert run_python(code, stderr=err).split() == ["False", "True", "True"]
    lines = [line for line in err[0].splitlines() if line.startswith("jaxtl:")]
    assert len(lines) == 1 and "too late" in lines[0] and "before the first JAX array" in lines[0], err[0]


def test_the_command_lines_make_the_settings(tmp_path):
    """``python -m jaxtl.models`` (any command line) configures the process before JAX starts: no late line."""
    code = ("import sys, jax\n"
            "from jaxtl.models.__main__ import main\n"
            "main(['resnet18'])\n"
            "print('ASYNC', jax.config.read('jax_cpu_enable_async_dispatch'))")
    err = []
    out = run_python(code, stderr=err, JAXTL_CACHE=str(tmp_path))
    assert out.split()[-2:] == ["ASYNC", "False"] and "too late" not in err[0], (out, err)


class _RefusingLibc:
    """A C library whose mallopt accepts M_MMAP_MAX but refuses M_TRIM_THRESHOLD."""

    def __init__(self):
        self.calls = []

        def mallopt(param, value):  # a plain function: keep_step_memory sets .argtypes on it
            self.calls.append((param, value))
            return 0 if param == runtime.M_TRIM_THRESHOLD else 1

        self.mallopt = mallopt


def test_half_applied_malloc_settings_are_undone(monkeypatch):
    """If glibc takes the first setting and refuses the second, the first is put back and nothing else changes."""
    for name in SCRUB:
        monkeypatch.delenv(name, raising=False)
    libc = _RefusingLibc()
    monkeypatch.setattr(runtime, "_glibc", lambda: libc)
    monkeypatch.setattr(runtime, "backend_already_started", lambda: False)
    assert runtime.keep_step_memory() is False
    assert libc.calls == [(runtime.M_MMAP_MAX, 0), (runtime.M_TRIM_THRESHOLD, runtime.NO_TRIM),
                          (runtime.M_MMAP_MAX, runtime.GLIBC_DEFAULT_MMAP_MAX)]


def test_compile_cache_respects_the_opt_out_and_the_users_own_setting(monkeypatch, tmp_path):
    import jax

    from jaxtl.paths import compile_cache_dir

    monkeypatch.setenv("JAXTL_CACHE", str(tmp_path))
    assert compile_cache_dir().parent == tmp_path / "xla"
    monkeypatch.setenv(runtime.NO_COMPILE_CACHE, "1")
    assert runtime.enable_compile_cache() is None
    monkeypatch.delenv(runtime.NO_COMPILE_CACHE)
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path / "mine"))
    try:
        assert runtime.enable_compile_cache() is None
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "mine")
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    assert not (tmp_path / "xla").exists()
