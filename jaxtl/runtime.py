"""Process-wide settings that make jaxtl fast on CPU, made by one explicit call.

``import jaxtl`` changes nothing outside jaxtl. The command lines, ``jaxtl.train()``
and the benchmarks call :func:`configure` first; a program that wants the same
speed calls it before its first JAX computation::

    import jaxtl
    jaxtl.runtime.configure()

What it sets, each left alone when the user already chose or opted out:

* **XLA's CPU convolutions on Eigen** (``XLA_FLAGS`` gains
  ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``): jaxlib's
  default YNNPACK path runs convolutions on one core. Only when the installed
  jaxlib knows the flag, since XLA aborts on an unknown one. Opt out:
  ``JAXTL_NO_XLA_FLAGS=1``.
* **Step memory kept between steps** (``jax_cpu_enable_async_dispatch=False``
  and glibc's ``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, -1)``): XLA
  allocates a step's temporaries as one block, which glibc would otherwise map
  afresh and fault in on every step. The price: the process keeps its peak heap.
  Opt out: ``JAXTL_NO_MALLOC_TUNING=1``; a user's ``MALLOC_*_``,
  ``GLIBC_TUNABLES=glibc.malloc.*`` or ``JAX_CPU_ENABLE_ASYNC_DISPATCH`` also
  leaves it alone.
* **JAX's persistent compilation cache** under ``<jaxtl cache>/xla/``: reruns,
  resumes and the stages of progressive unfreezing load their compiled steps.
  Left alone when ``jax_compilation_cache_dir`` is set; opt out:
  ``JAXTL_NO_COMPILE_CACHE=1``.

Several processes (one per host, or per GPU) join through JAX's distributed runtime
with :func:`start_processes`, also before the first JAX computation;
:func:`processes_from` reads where this process stands from the command line, the
``JAX_*`` environment or a cluster launcher.

The first two act only before JAX creates its CPU backend (the first array or
computation); called later, :func:`configure` says so in one line on stderr.
docs/performance.md has the measurements behind each setting.
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from jaxtl.paths import compile_cache_dir

NO_XLA_FLAGS = "JAXTL_NO_XLA_FLAGS"
NO_MALLOC_TUNING = "JAXTL_NO_MALLOC_TUNING"
NO_COMPILE_CACHE = "JAXTL_NO_COMPILE_CACHE"

YNN_FLAG_NAME = "xla_cpu_experimental_ynn_fusion_type"
CPU_CONV_FLAG = f"--{YNN_FLAG_NAME}=-individual_convolution"

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
NO_TRIM = -1                      # mallopt(3): -1 disables trimming (a positive value tops out at 2 GiB)
GLIBC_DEFAULT_MMAP_MAX = 65536    # glibc's DEFAULT_MMAP_MAX (malloc.c)
USER_MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")

COMPILE_CACHE_MAX_BYTES = 4 << 30     # least recently used entries beyond this are evicted (needs filelock)
COMPILE_CACHE_MIN_SECONDS = 0.5       # smaller programs recompile faster than they load


@dataclass(frozen=True)
class Settings:
    """What :func:`configure` found or made."""
    cpu_conv_flag: bool          # XLA_FLAGS holds jaxtl's CPU convolution flag
    step_memory_kept: bool       # synchronous CPU dispatch and the glibc heap settings are in force
    compile_cache: Path | None   # the persistent compilation cache jaxtl pointed JAX at, if any


_applied: dict = {}   # what this process's configure() calls made; process settings are made once


def backend_already_started() -> bool:
    """True when JAX has created its backends (too late for XLA_FLAGS and the dispatch setting)."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    return bool(getattr(bridge, "_backends", None))


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


def _cpu_conv_flag_wanted() -> bool:
    """Not opted out of, not chosen by the user, and known to the installed jaxlib."""
    if os.environ.get(NO_XLA_FLAGS) or YNN_FLAG_NAME in os.environ.get("XLA_FLAGS", ""):
        return False
    return _jaxlib_knows_flag(YNN_FLAG_NAME)


def add_cpu_conv_flag() -> bool:
    """Add the CPU convolution flag to XLA_FLAGS if it is safe and useful; True if it was added."""
    if backend_already_started() or not _cpu_conv_flag_wanted():
        return False
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + CPU_CONV_FLAG).strip()
    return True


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


def _step_memory_wanted() -> bool:
    """Not opted out of, and neither the dispatch nor glibc's malloc chosen by the user."""
    return not (os.environ.get(NO_MALLOC_TUNING) or "JAX_CPU_ENABLE_ASYNC_DISPATCH" in os.environ
                or _user_chose_malloc_settings())


def keep_step_memory() -> bool:
    """Synchronous CPU dispatch plus a glibc heap that keeps large blocks; True when both were applied."""
    if not _step_memory_wanted():
        return False
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


def enable_compile_cache() -> Path | None:
    """Point JAX's persistent compilation cache into jaxtl's cache; returns the folder, or None if left alone."""
    if os.environ.get(NO_COMPILE_CACHE):
        return None
    import jax

    if jax.config.jax_compilation_cache_dir:  # the user's own choice (JAX_COMPILATION_CACHE_DIR or jax.config)
        return None
    path = compile_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a read-only home: run without the cache, say so once
        print(f"jaxtl: compilation cache off ({path}: {e.strerror}); set JAXTL_CACHE to a writable folder",
              file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", COMPILE_CACHE_MIN_SECONDS)
    if importlib.util.find_spec("filelock") is not None:
        jax.config.update("jax_compilation_cache_max_size", COMPILE_CACHE_MAX_BYTES)
    return path


def _missed_cpu_settings() -> list[str]:
    """The CPU settings JAX's already running CPU backend lacks (and the user did not opt out of)."""
    if not backend_already_started():
        return []
    import jax

    if jax.default_backend() != "cpu":
        return []
    missed = []
    if _cpu_conv_flag_wanted():
        missed.append("the CPU convolution flag")
    if _step_memory_wanted() and jax.config.read("jax_cpu_enable_async_dispatch"):
        missed.append("the step-memory settings")
    return missed


# XLA's CPU pipeline deletes optimization barriers (OptimizationBarrierExpander, the pass named
# "cse_barrier_expander") before its CSE passes, which then merge jax.checkpoint's recomputation back
# into the forward pass: without this option a rematerialised step keeps every activation on CPU.
REMAT_CPU_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "cse_barrier_expander"}


def remat_compiler_options(platform: str) -> dict | None:
    """Per-executable XLA options under which gradient checkpointing saves memory on ``platform``."""
    return dict(REMAT_CPU_COMPILER_OPTIONS) if platform == "cpu" else None


def configure(*, compile_cache: bool = True) -> Settings:
    """Make the process-wide settings (see the module's docstring); safe to call more than once."""
    if "cpu" not in _applied:
        missed = _missed_cpu_settings()
        if missed:
            print(f"jaxtl: JAX already started, too late for {' and '.join(missed)} of jaxtl.runtime.configure() "
                  "(training runs slower on CPU); call it before the first JAX array or computation", file=sys.stderr)
            _applied["cpu"] = (False, False)
        else:
            _applied["cpu"] = (add_cpu_conv_flag(), keep_step_memory())
    if compile_cache and "compile_cache" not in _applied:
        _applied["compile_cache"] = enable_compile_cache()
    return settings()


def settings() -> Settings:
    """The settings in force now (made by :func:`configure` or by the user); changes nothing."""
    _, memory = _applied.get("cpu", (False, False))
    return Settings(cpu_conv_flag=CPU_CONV_FLAG in os.environ.get("XLA_FLAGS", ""), step_memory_kept=memory,
                    compile_cache=_applied.get("compile_cache"))


# -- several processes -------------------------------------------------------------------------

# A peer that stops sending heartbeats for this long is taken as dead, and JAX ends the processes
# left (its default, 100 s, is longer than a user waits for a stopped run to say so).
HEARTBEAT_TIMEOUT_S = 30
INITIALIZATION_TIMEOUT_S = 120   # how long a process waits for all the others to join
AUTO = "auto"


@dataclass(frozen=True)
class Processes:
    """Where this process stands in a run of several: JAX's distributed runtime, started or not."""
    coordinator: str | None   # HOST:PORT of process 0's coordination service; "auto": JAX detects the cluster
    num_processes: int | None
    process_id: int | None

    @property
    def wanted(self) -> bool:
        return self.coordinator is not None


def processes_from(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
                   environ=os.environ) -> Processes:
    """The run's processes from the command line's ``--coordinator/--num-processes/--process-id``, else
    from ``JAX_COORDINATOR_ADDRESS``/``JAX_NUM_PROCESSES``/``JAX_PROCESS_ID``, else from a cluster
    launcher that started several tasks (SLURM's ``srun``, Open MPI's ``mpirun``): JAX detects those.
    A missing or malformed part is a :class:`~jaxtl.errors.ConfigError` naming it."""
    from jaxtl.errors import ConfigError

    if coordinator is None and num_processes is None and process_id is None:
        coordinator = environ.get("JAX_COORDINATOR_ADDRESS") or None
        num_processes, process_id = environ.get("JAX_NUM_PROCESSES"), environ.get("JAX_PROCESS_ID")
        flags = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
        if coordinator is None and num_processes is None and process_id is None:
            if _launcher_started_several(environ):
                return Processes(AUTO, None, None)
            return Processes(None, None, None)
    else:
        flags = ("--coordinator", "--num-processes", "--process-id")
    if coordinator == AUTO:
        if num_processes is not None or process_id is not None:
            raise ConfigError(f"{flags[0]} auto lets JAX detect the cluster; leave out {flags[1]} and {flags[2]}")
        return Processes(AUTO, None, None)
    given = dict(zip(flags, (coordinator, num_processes, process_id)))
    missing = [k for k, v in given.items() if v is None]
    if missing:
        raise ConfigError(f"several processes need {', '.join(flags)} together; missing {', '.join(missing)} "
                          f"(or {flags[0]} auto on a cluster JAX detects)")
    host, sep, port = str(coordinator).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{flags[0]} {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234 (process 0's "
                          "address and a free port)")
    try:
        n, i = int(num_processes), int(process_id)
    except (TypeError, ValueError):
        raise ConfigError(f"{flags[1]} and {flags[2]} must be whole numbers, got {num_processes!r} and "
                          f"{process_id!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ConfigError(f"{flags[2]} {i} with {flags[1]} {n}: the process id must be 0 to {n - 1}")
    return Processes(str(coordinator), n, i)


def _launcher_started_several(environ) -> bool:
    """SLURM (``srun``) or Open MPI (``mpirun``) started more than one task of this program."""
    for count in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        value = environ.get(count, "")
        if value.isdigit() and int(value) > 1:
            return True
    return False


def start_processes(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None) -> tuple[int, int]:
    """Join the run's other processes through JAX's distributed runtime, before JAX's first array;
    returns ``(process index, process count)``. Where this process stands comes from the arguments,
    the ``JAX_*`` environment or a cluster launcher (:func:`processes_from`). Collectives between
    processes on CPUs go over gloo. Does nothing for a single process, and nothing a second time::

        jaxtl.runtime.start_processes("10.0.0.1:1234", num_processes=2, process_id=0)
        jaxtl.train(data="photos/", output="/shared/runs/pets", ...)
    """
    import jax

    from jaxtl.errors import ConfigError

    processes = processes_from(coordinator, num_processes, process_id)
    if not processes.wanted or jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    if backend_already_started():
        raise ConfigError("several processes: JAX already started in this process; call "
                          "jaxtl.runtime.start_processes() before the first JAX array or computation")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kw = {} if processes.coordinator == AUTO else dict(coordinator_address=processes.coordinator,
                                                       num_processes=processes.num_processes,
                                                       process_id=processes.process_id)
    try:
        jax.distributed.initialize(**kw, heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S,
                                   initialization_timeout=INITIALIZATION_TIMEOUT_S)
    except (ValueError, RuntimeError) as e:  # JAX found no cluster, or the coordinator did not answer
        where = processes.coordinator if processes.coordinator != AUTO else "the cluster JAX detects"
        raise ConfigError(f"several processes: cannot join {where} ({str(e).splitlines()[0][:160]}); start every "
                          "process with the same --coordinator and --num-processes and its own --process-id") \
            from None
    return jax.process_index(), jax.process_count()
