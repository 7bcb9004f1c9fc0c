#!/usr/bin/env python
"""Run every benchmark in turn (``make bench``); each prints its markdown table
and writes its JSON under benchmarks/results/.

    python benchmarks/run_all.py           # the full set (1-2 hours on 2 CPU cores)
    python benchmarks/run_all.py --quick   # smoke runs of each script (a few minutes)
    python benchmarks/run_all.py --only throughput,loader

The parity table of the README's model section comes from tools/parity_report.py
(``--with-parity`` runs it too).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "loader": HERE / "bench_loader.py",
    "throughput": HERE / "bench_throughput.py",
    "end_to_end": HERE / "bench_end_to_end.py",
    "malloc": HERE / "bench_malloc.py",
    "native": HERE / "bench_native.py",
    "scaling": HERE / "bench_scaling.py",
    "frozen": HERE / "bench_frozen.py",
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every script")
    p.add_argument("--only", default=",".join(SCRIPTS), help=f"comma-separated subset of {', '.join(SCRIPTS)}")
    p.add_argument("--with-parity", action="store_true", help="also run tools/parity_report.py")
    args = p.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCRIPTS]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(SCRIPTS)}")
    jobs = [[sys.executable, str(SCRIPTS[s])] + (["--quick"] if args.quick else []) for s in chosen]
    if args.with_parity:
        jobs.append([sys.executable, str(HERE.parent / "tools" / "parity_report.py")])
    failed = []
    for cmd in jobs:
        name = Path(cmd[1]).stem
        print(f"\n## {name}\n", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd)
        print(f"\n({name}: exit {rc}, {time.perf_counter() - t0:.0f} s)", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"run_all: {', '.join(failed)} failed (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
