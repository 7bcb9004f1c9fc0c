"""Shared by the benchmark scripts: timing, alternation, memory, machine, tables.

Benchmarks are not tests: they measure and report, never assert. jaxtl and
PyTorch run in the same process, alternating round by round so that noise on
the machine (other processes, frequency changes) hits both alike; the report
gives medians and the jaxtl / PyTorch ratio.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    """Seconds per call of ``fn`` (which must block until its work is done)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def alternate(candidates: dict[str, Callable[[], object]], rounds: int, repeats: int,
              settle: int = 1) -> dict[str, list[float]]:
    """Run each candidate ``repeats`` times per round, rounds interleaved.

    Each turn starts with ``settle`` untimed calls: the first step after the
    other side ran pays for the heap that side left behind (measured: a jaxtl
    MobileNetV2 step at 224 px right after PyTorch steps 3.8 s and 330,000 page
    faults, the next ones 1.2-1.3 s and ~0), which a user running one framework
    never sees, and which put up to a third of the timed calls into a tail.
    """
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            for _ in range(settle):
                fn()
            times[name] += timed(fn, repeats)
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def machine() -> dict:
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = Path("/proc/cpuinfo").read_text()
        info["avx512"] = "avx512f" in flags
        info["memory_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except OSError:
        pass
    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "timm"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    info["versions"] = versions
    try:
        import jax

        info["jax_devices"] = [str(d) for d in jax.devices()]
    except Exception:  # noqa: BLE001
        pass
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    # jaxtl.runtime.configure(): synchronous CPU dispatch + glibc heap keeps step memory
    # (process-wide, so PyTorch in the same process runs under it too).
    runtime = sys.modules.get("jaxtl.runtime")
    if runtime is not None:
        info["jaxtl_keeps_step_memory"] = runtime.settings().step_memory_kept
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                     cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        pass
    return info


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def fmt(x):
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def results_path(name: str) -> Path:
    """Where ``--out NAME`` goes: a bare file name into ``benchmarks/results/``,
    anything with a folder in it (``out/x.json``, ``/tmp/x.json``) as given.

    Called before a benchmark starts so that a bad path fails in its first
    second, not after an hour of measuring."""
    path = Path(name).expanduser()
    if path.parent == Path("."):
        path = RESULTS / path
    if path.suffix != ".json":
        raise SystemExit(f"--out {name}: give a .json file name (e.g. throughput_mine.json)")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"--out {name}: cannot create folder {path.parent} ({e.strerror}); "
                         "give a writable path") from None
    if not os.access(path.parent, os.W_OK):
        raise SystemExit(f"--out {name}: folder {path.parent} is not writable; give a writable path")
    return path


def out_name(given: str, default: str, quick: bool) -> str:
    """``--out`` for a run: a ``--quick`` smoke run that kept the default name writes
    ``<name>_quick.json``, so it never replaces the last full results."""
    return default.replace(".json", "_quick.json") if quick and given == default else given


def add_timing_args(parser, default_out: str, rounds: int, batch_help: str = "images per step") -> None:
    """--batch, --rounds, --repeats, --quick and --out, as every step benchmark takes them."""
    parser.add_argument("--batch", type=int, default=32, help=batch_help)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one round of one repeat (a smoke run)")
    parser.add_argument("--out", default=default_out,
                        help="JSON file: a bare name goes into benchmarks/results/, a path is used as given")


def parse_timing_args(parser, default_out: str, argv=None):
    """Parse; ``--quick`` means one round of one repeat and its own output name; a bad
    ``--out`` fails here, before any measuring."""
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats = 1, 1
    args.out = out_name(args.out, default_out, args.quick)
    results_path(args.out)
    return args


def write_json(name: str, payload: dict) -> Path:
    """Write atomically (a temporary file, then rename): an interrupted write
    never leaves a half-written JSON in place of the last good one."""
    path = results_path(name)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
