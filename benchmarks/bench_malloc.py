"""How much glibc's handling of large blocks costs jaxtl and PyTorch.

``jaxtl.runtime.configure()`` keeps XLA's step memory itself (jaxtl/runtime.py:
synchronous CPU dispatch plus ``mallopt``, process-wide, so PyTorch in the same
process runs under it too); ``--setting untuned`` (``JAXTL_NO_MALLOC_TUNING=1``)
measures both sides with glibc's defaults instead. The other settings, below,
were measured before that change; setting any glibc malloc variable makes jaxtl
leave malloc and dispatch alone.

glibc serves blocks over its mmap threshold (at most 32 MB) with fresh
``mmap``s and returns them on ``free``, so a program that allocates large
buffers every step can pay page faults every step. ``MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=4294967296`` in the environment makes the heap keep and
reuse them instead (``--setting heap_only``). That does not reach XLA's step
temporaries, which a worker thread allocates from a non-main arena that mmaps
large blocks regardless; ``--setting hugetlb`` (``GLIBC_TUNABLES=
glibc.malloc.hugetlb=1``) makes glibc ask for transparent huge pages for its
mmaps instead, so those fault in 2 MB pages.

glibc reads these variables once, at start, and a ``mallopt`` call at run time
also switches off its dynamic threshold for good, so the two settings cannot be
compared inside one process. This script runs ``bench_throughput.py``
(jaxtl and PyTorch alternating in each process) in child processes, with and
without the variables, alternating the settings; separate processes differ by
10-25 % on a small machine, so it reports the median over ``--pairs`` pairs of
each side's images/s and of the jaxtl / PyTorch-best ratio, which is measured
within each process.

    python benchmarks/bench_malloc.py                          # untuned; mobilenet_v2 128 px, fine-tune and inference, 2 pairs
    python benchmarks/bench_malloc.py --models resnet18 --modes finetune --pairs 3
    python benchmarks/bench_malloc.py --setting hugetlb --out malloc_hugetlb.json
    python benchmarks/bench_malloc.py --setting untuned --models resnet18,mobilenet_v2,vit_tiny_patch16_224 \
        --modes finetune,inference --out malloc_untuned.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import log, machine, markdown_table, median, out_name, results_path, write_json

HEAP_ONLY = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
# glibc madvises its mmaps for transparent huge pages (THP mode "madvise"): XLA's
# per-step temporaries, which worker-thread arenas mmap whatever MALLOC_MMAP_MAX_
# says, then fault in 2 MB pages instead of 4 KB ones.
HUGETLB = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
UNTUNED = {"JAXTL_NO_MALLOC_TUNING": "1"}
SETTINGS = {"heap_only": HEAP_ONLY, "hugetlb": HUGETLB, "untuned": UNTUNED}
THROUGHPUT = Path(__file__).resolve().parent / "bench_throughput.py"


def run_child(args, with_setting: bool, out: Path) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if not any(k in setting for setting in SETTINGS.values())}
    if with_setting:
        env.update(SETTINGS[args.setting])
    cmd = [sys.executable, str(THROUGHPUT), "--models", args.models, "--sizes", args.sizes, "--modes", args.modes,
           "--batch", str(args.batch), "--rounds", str(args.rounds), "--repeats", str(args.repeats), "--out", str(out)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"bench_throughput.py failed ({args.setting if with_setting else 'default'}): {tail}")
    return json.loads(out.read_text())["results"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="mobilenet_v2")
    p.add_argument("--sizes", default="128")
    p.add_argument("--modes", default="finetune,inference")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--setting", choices=sorted(SETTINGS), default="untuned",
                   help="heap_only: MALLOC_MMAP_MAX_=0 + a 4 GB trim threshold; hugetlb: GLIBC_TUNABLES=glibc.malloc.hugetlb=1; "
                        "untuned: JAXTL_NO_MALLOC_TUNING=1 (glibc defaults and async dispatch for both sides)")
    p.add_argument("--pairs", type=int, default=2, help="child processes per setting, the settings alternating")
    p.add_argument("--quick", action="store_true", help="one pair, one round of one repeat (a smoke run)")
    p.add_argument("--out", default="malloc.json",
                   help="JSON file: a bare name goes into benchmarks/results/, a path is used as given")
    args = p.parse_args()
    if args.quick:
        args.pairs, args.rounds, args.repeats = 1, 1, 1
    args.out = out_name(args.out, "malloc.json", args.quick)
    results_path(args.out)
    runs: dict[bool, list[list[dict]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            for with_setting in ((False, True) if i % 2 == 0 else (True, False)):
                log(f"pair {i + 1}/{args.pairs}: {args.setting if with_setting else 'default'} ...")
                runs[with_setting].append(run_child(args, with_setting, Path(tmp) / f"{i}_{int(with_setting)}.json"))
    rows, results = [], []
    for j, rec in enumerate(runs[False][0]):
        key = {k: rec[k] for k in ("model", "size", "mode")}
        side = {}
        for with_setting, label in ((False, "default"), (True, "setting")):
            recs = [run[j] for run in runs[with_setting]]
            best = [max(v for k, v in r["images_per_s"].items() if k.startswith("torch_best")) for r in recs]
            side[label] = {"jaxtl": median([r["images_per_s"]["jaxtl"] for r in recs]), "torch_best": median(best),
                           "jaxtl_over_best": median([r["jaxtl_over_best"] for r in recs])}
        results.append({**key, **side})
        rows.append([key["model"], key["size"], key["mode"], side["default"]["jaxtl"], side["setting"]["jaxtl"],
                     side["default"]["torch_best"], side["setting"]["torch_best"],
                     side["default"]["jaxtl_over_best"], side["setting"]["jaxtl_over_best"]])
    name = args.setting.replace("_", " ")
    table = markdown_table(["model", "px", "job", "jaxtl default", f"jaxtl {name}", "PyTorch best default",
                            f"PyTorch best {name}", "jaxtl/best default", f"jaxtl/best {name}"], rows)
    path = write_json(args.out, {"machine": machine(), "args": vars(args), "setting_env": SETTINGS[args.setting],
                                 "results": results, "table": table})
    print(table)
    print(f"\nimages/s are medians over {args.pairs} process(es) per setting; JSON: {path}")


if __name__ == "__main__":
    main()
