"""What jaxtl's native CPU kernels buy: the same jaxtl step with and without them, in one process.

The native kernels (``jaxtl/ops/native``, built on first use with the system's C++
compiler) compute the depthwise convolution's kernel gradient in one pass over
the layer (MobileNetV2, EfficientNet-B0, ConvNeXt-Tiny) and a ViT's multi-head
attention forward and backward per (image, head); without them
(``JAXTL_NATIVE=0`` when the step is traced) XLA runs its kh*kw tap reductions
and its batched matmuls + softmax. Both steps are compiled in this process and timed in
alternating rounds, so the ratio is not at the mercy of process-to-process
noise (10-25 % on a 2-core machine). Reported per model and size: median step
time of each, native / XLA time, and the spread of that ratio over the rounds.

    python benchmarks/bench_native.py                      # MobileNetV2, EfficientNet-B0, ConvNeXt-Tiny, ViT-Tiny, fine-tune
    python benchmarks/bench_native.py --models mobilenet_v2 --sizes 224 --rounds 6
"""

from __future__ import annotations

import argparse
import gc
import os

from jaxtl import runtime
import jaxtl.ops.native as native

from bench_throughput import jaxtl_job
from common import add_timing_args, alternate, log, machine, markdown_table, median, parse_timing_args, write_json

MODELS = ("mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_tiny_patch16_224")
SIZES = (128, 224)


def step_pair(name: str, size: int, mode: str, batch: int) -> dict:
    """{"xla": run-once, "native": run-once} plus compile seconds and XLA memory of each."""
    out = {}
    previous = os.environ.get(native.OPT_OUT)
    try:
        for label, setting in (("xla", "0"), ("native", None)):
            if setting is None:
                os.environ.pop(native.OPT_OUT, None)
            else:
                os.environ[native.OPT_OUT] = setting
            out[label] = jaxtl_job(name, size, mode, batch, "float32")  # traced now: the setting is read here
    finally:
        if previous is None:
            os.environ.pop(native.OPT_OUT, None)
        else:
            os.environ[native.OPT_OUT] = previous
    return out


def main() -> None:
    runtime.configure(compile_cache=False)  # jaxtl's CPU settings, before JAX starts; compiles are timed
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--mode", choices=["finetune", "feature_extract", "inference"], default="finetune")
    add_timing_args(p, "native.json", rounds=4)
    args = parse_timing_args(p, "native.json")
    if not native.available():
        raise SystemExit("bench_native: the native kernels could not be built (see the line above); "
                         "install a C++ compiler (g++) or set CXX")
    rows, results = [], []
    for name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            log(f"{name} {size}px {args.mode} ...")
            pair = step_pair(name, size, args.mode, args.batch)
            runs = {label: job[0] for label, job in pair.items()}
            for fn in runs.values():
                fn()
            times = alternate(runs, args.rounds, args.repeats)
            per_round = [median(times["native"][i:i + args.repeats]) / median(times["xla"][i:i + args.repeats])
                         for i in range(0, len(times["xla"]), args.repeats)]
            med = {k: median(v) for k, v in times.items()}
            rec = {"model": name, "size": size, "mode": args.mode, "batch": args.batch, "median_s": med,
                   "native_over_xla_time": med["native"] / med["xla"], "per_round_ratio": per_round,
                   "compile_s": {k: job[1] for k, job in pair.items()},
                   "xla_mib": {k: (job[2] or 0) / 2**20 for k, job in pair.items()}}
            results.append(rec)
            rows.append([name, size, args.mode, med["xla"] * 1e3, med["native"] * 1e3, rec["native_over_xla_time"],
                         f"{min(per_round):.2f}-{max(per_round):.2f}"])
            log(f"  XLA {med['xla'] * 1e3:.0f} ms, native {med['native'] * 1e3:.0f} ms")
            del pair, runs
            gc.collect()
    table = markdown_table(["model", "px", "job", "XLA ms", "native ms", "native / XLA time",
                            "per round"], rows)
    info = machine()
    path = write_json(args.out, {"machine": info, "args": vars(args), "results": results, "table": table})
    print(f"Machine: {info.get('cpu', '?')}, {info.get('cpus')} cores; jax {info['versions'].get('jax')}; "
          f"batch {args.batch}, float32, step time per call\n")
    print(table)
    print(f"\nJSON: {path}")


if __name__ == "__main__":
    main()
