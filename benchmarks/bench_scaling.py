"""Scaling of the data-parallel train step over this process's devices.

The step is the one ``python -m jaxtl.train`` runs (``make_train_step`` under
``DataParallel``, the strategy's optimizer), compiled once per device count
and timed in alternating rounds, so that the machine's noise hits every count
alike. Two ways to scale:

* ``weak`` (default): each device keeps ``--batch`` images, so the
  global batch grows with the devices - how data parallelism is used to train
  faster per epoch;
* ``strong``: the global batch ``--global-batch`` stays fixed and is split.

Reported per device count: images/s (median), speed-up over one device, and
scaling efficiency = images/s on n devices / (n x images/s on one device)
(1.0 is perfect scaling), the compile time and the step's XLA memory per device.

    python benchmarks/bench_scaling.py                                  # every local device (GPUs, TPU cores)
    python benchmarks/bench_scaling.py --model resnet50 --size 224 --dtype bfloat16
    python benchmarks/bench_scaling.py --host-devices 4 --quick         # on a CPU: 4 XLA host devices

On a CPU, ``--host-devices N`` splits the one processor into N XLA devices
(``--xla_force_host_platform_device_count``): that tests the data-parallel
code, but the devices share the same cores, so it measures overhead, not a
speed-up (benchmarks/README.md: host devices are for testing, not speed).
"""

from __future__ import annotations

import argparse
import os
import sys


def _parse_args(argv=None):
    from common import add_timing_args, parse_timing_args  # no JAX import: --host-devices still applies

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--mode", choices=["finetune", "feature_extract"], default="finetune")
    p.add_argument("--mapping", choices=["shard_map", "pmap"], default="shard_map")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--scaling", choices=["weak", "strong"], default="weak")
    p.add_argument("--global-batch", type=int, default=None,
                   help="images per step over all devices (strong scaling; default --batch x most devices)")
    p.add_argument("--devices", default=None,
                   help="comma-separated device counts to compare (default 1, 2, 4, ... and the number of devices)")
    p.add_argument("--host-devices", type=int, default=None,
                   help="CPU only: split the processor into this many XLA devices (must be set before JAX starts)")
    add_timing_args(p, "scaling.json", rounds=3, batch_help="images per device (weak scaling)")
    args = parse_timing_args(p, "scaling.json", argv)
    if args.host_devices is not None and args.host_devices < 1:
        p.error(f"--host-devices {args.host_devices}: give a count of at least 1")
    if args.batch < 1:
        p.error(f"--batch {args.batch}: give at least 1")
    if args.global_batch is not None and args.scaling != "strong":
        p.error("--global-batch fixes the batch for --scaling strong; with weak scaling give --batch (per device)")
    if args.global_batch is not None and args.global_batch < 1:
        p.error(f"--global-batch {args.global_batch}: give at least 1")
    return args


def default_counts(available: int) -> list[int]:
    """1, 2, 4, ... up to ``available``, and ``available`` itself."""
    counts, n = [], 1
    while n <= available:
        counts.append(n)
        n *= 2
    if counts[-1] != available:
        counts.append(available)
    return counts


def parse_counts(text: str | None, available: int) -> list[int]:
    if text is None:
        return default_counts(available)
    try:
        counts = sorted({int(c) for c in text.split(",") if c.strip()})
    except ValueError:
        raise SystemExit(f"--devices {text}: give comma-separated device counts, e.g. 1,2,4") from None
    bad = [c for c in counts if not 1 <= c <= available]
    if not counts or bad:
        raise SystemExit(f"--devices {text}: this process has {available} device(s); give counts from 1 to "
                         f"{available}" + (" (on a CPU, --host-devices N makes N devices)" if available == 1 else ""))
    return counts


def efficiency(images_per_s: dict[int, float]) -> dict[int, float]:
    """images/s on n devices over n times images/s on the smallest count, scaled to one device."""
    base_n = min(images_per_s)
    per_device = images_per_s[base_n] / base_n
    return {n: ips / (n * per_device) for n, ips in images_per_s.items()}


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.host_devices is not None:
        if "jax" in sys.modules:
            raise SystemExit("--host-devices must be set before JAX starts; run the script as its own process")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" in flags:
            raise SystemExit("--host-devices and XLA_FLAGS=--xla_force_host_platform_device_count both given; "
                             "use one")
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={args.host_devices}".strip()

    from common import alternate, log, machine, markdown_table, median, peak_rss_mib, write_json

    import jaxtl
    from jaxtl import runtime

    runtime.configure(compile_cache=False)  # jaxtl's CPU settings, before JAX starts; compiles are timed
    import jax

    from bench_throughput import jaxtl_job

    try:
        jaxtl.get_spec(args.model)
    except Exception as e:  # noqa: BLE001 - the registry's own one-line message
        raise SystemExit(f"--model {args.model}: {e}") from None
    devices = jax.local_devices()
    counts = parse_counts(args.devices, len(devices))
    if args.scaling == "weak":
        batches = {n: args.batch * n for n in counts}
    else:
        global_batch = args.global_batch or args.batch * max(counts)
        bad = [n for n in counts if global_batch % n]
        if bad:
            raise SystemExit(f"--global-batch {global_batch} is not divisible by {bad[0]} devices; "
                             f"use a multiple of {max(counts)}")
        batches = {n: global_batch for n in counts}

    runs, compile_s, xla_mib = {}, {}, {}
    for n in counts:
        log(f"{args.model} {args.size}px {args.mode}: {n} device(s), batch {batches[n]} ...")
        run, compile_s[n], xla = jaxtl_job(args.model, args.size, args.mode, batches[n], args.dtype,
                                           devices=devices[:n], mapping=args.mapping)
        xla_mib[n] = None if xla is None else xla / 2**20
        run()  # warm-up
        runs[n] = run
    times = alternate({str(n): runs[n] for n in counts}, args.rounds, args.repeats)
    ips = {n: batches[n] / median(times[str(n)]) for n in counts}
    eff = efficiency(ips)
    base = ips[min(counts)]
    rows, results = [], []
    for n in counts:
        rec = {"devices": n, "batch": batches[n], "images_per_s": ips[n], "speedup": ips[n] / base,
               "efficiency": eff[n], "median_s": median(times[str(n)]), "compile_s": compile_s[n],
               "xla_mib": xla_mib[n]}
        results.append(rec)
        rows.append([n, batches[n], ips[n], rec["speedup"], eff[n], compile_s[n],
                     float("nan") if xla_mib[n] is None else xla_mib[n]])
    table = markdown_table(["devices", "global batch", "img/s", "speed-up", "efficiency", "compile s",
                            "XLA MiB per device"], rows)
    info = machine()
    info["backend"] = jax.default_backend()
    path = write_json(args.out, {"machine": info, "args": vars(args), "results": results, "table": table})
    print(f"Machine: {info.get('cpu', '?')}, {info.get('cpus')} cores, backend {info['backend']}, "
          f"{len(devices)} local device(s) ({devices[0].device_kind}); jax {info['versions'].get('jax')}\n"
          f"{args.model} {args.size} px {args.mode}, {args.dtype}, {args.mapping}, {args.scaling} scaling\n")
    print(table)
    print(f"\npeak resident memory of this process: {peak_rss_mib():.0f} MiB; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
