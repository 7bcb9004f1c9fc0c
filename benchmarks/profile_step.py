"""Where a jaxtl step spends its time: XLA's per-operation profile, joined to the HLO.

Runs the same step as ``bench_throughput.py`` (the library's jitted train step
or inference), traces a few executions with ``jax.profiler``, and joins every
traced operation (a fusion, a dot, a convolution...) with the optimised HLO of
the compiled step: its result shape and the ``op_name`` metadata JAX attached,
which names the Flax module it came from (``stage2_0/expand_bn``) and whether
it is forward or backward (``transpose(jvp(...))``). Prints

* the step time (median, outside the profiler) and the summed time of traced
  operations per step;
* the operations that took longest, with shape and origin;
* time per layer kind and direction (``dw_conv`` backward, ``expand_bn``
  forward, ...) and per XLA operation kind (``ynn_fusion``, ``transpose_copy_fusion``...).

Read the numbers with two caveats. XLA's CPU runtime runs independent
operations concurrently, so two traced operations can overlap and the sum can
exceed the step time; and Eigen convolutions hand their work to a thread pool,
so their events cover little of their cost (the difference between the step
time and the traced sum is mostly convolutions). Copies XLA inserts itself
(transposes of a convolution's operands) carry no ``op_name``; they are
charged to the operation that uses them, as "<layer> (operand copy)".

    python benchmarks/profile_step.py --model mobilenet_v2 --size 128
    python benchmarks/profile_step.py --model resnet18 --mode inference --top 40
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import shutil
import tempfile
import time

import jaxtl
from jaxtl import runtime
import jax
from jaxtl.errors import UnknownModelError

from bench_throughput import MODES, jaxtl_job
from common import log, machine, markdown_table, median, results_path, write_json

# `%name = shape opcode(...)`, and the op_name JAX put in the metadata when there is one.
HLO_LINE = re.compile(r"\s*%(\S+) = (\S+) ([\w-]+)\(")
OP_NAME = re.compile(r'op_name="([^"]*)"')
# Runtime events that are not operations of the step.
NOT_OPS = ("$", "ThunkExecutor", "PjitFunction", "SlinkyThreadPool", "CommonPjRt", "ParseArguments", "end: ")


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
    """``{instruction name: (result shape, op_name)}`` for every HLO instruction.

    Instructions XLA added itself (layout copies, transposes of a convolution's
    operands) carry no op_name; they get the op_name of the first instruction
    that uses them, prefixed with ``for:`` (a transpose feeding a kernel-gradient
    convolution is charged to that convolution)."""
    index, users, opcode = {}, collections.defaultdict(list), {}
    for line in hlo_text.splitlines():
        m = HLO_LINE.match(line)
        if m:
            op = OP_NAME.search(line)
            index[m.group(1)] = (m.group(2), op.group(1) if op else "")
            opcode[m.group(1)] = m.group(3)
            operands = line[m.end():].split("),", 1)[0]
            for operand in re.findall(r"%([\w.-]+)", operands):
                users[operand].append(m.group(1))

    def named_user(name: str, depth: int) -> str:
        # XLA's canonicalised kernel-gradient convolution has no op_name either:
        # follow users a few levels until one carries JAX's metadata.
        for user in users.get(name, ()):
            op_name = index[user][1] if user in index else ""
            found = op_name or (named_user(user, depth - 1) if depth > 0 else "")
            if found:
                return found
        return ""

    unnamed = [name for name, (_, op_name) in index.items() if not op_name]
    resolved = {name: named_user(name, 3) for name in unnamed}
    for name, op_name in resolved.items():
        if op_name and opcode[name] != "convolution":   # the rewritten convolution itself is that conv's work
            op_name = "for:" + op_name
        index[name] = (index[name][0], op_name)
    return index


def origin(op_name: str) -> tuple[str, str]:
    """(layer kind, 'fwd' or 'bwd') from JAX's op_name metadata.

    ``jit(train_step)/transpose(jvp(MobileNet))/stage2_0/expand_bn/reduce_sum``
    -> ('expand_bn', 'bwd'). The layer kind is the innermost Flax module with
    its block index removed, so the 17 depthwise convs of MobileNetV2 add up.
    """
    if not op_name:
        return "(no metadata)", ""
    if op_name.startswith("for:"):
        layer, direction = origin(op_name[4:])
        return f"{layer} (operand copy)", direction
    direction = "bwd" if "transpose(" in op_name else "fwd"
    parts = [p for p in op_name.split("/") if not re.match(r"^(jit|jvp|transpose|vmap|pjit)\(", p)]
    modules = [p for p in parts[:-1] if p not in ("while", "body", "cond", "closed_call", "checkpoint")]
    if not modules:
        return f"({parts[-1] if parts else op_name})", direction
    return re.sub(r"_?\d+$", "", modules[-1]) or modules[-1], direction


def trace_events(trace_dir: str) -> list[dict]:
    files = glob.glob(f"{trace_dir}/plugins/profile/*/perfetto_trace.json.gz")
    if not files:
        raise SystemExit(f"jax.profiler wrote no perfetto trace under {trace_dir}; is this jaxlib built with the "
                         "profiler? (nothing to report)")
    with gzip.open(files[0]) as fh:
        data = json.load(fh)
    return data["traceEvents"] if isinstance(data, dict) else data


def default_out(model: str, size: int, mode: str) -> str:
    """profile_vit_tiny_128.json for vit_tiny_patch16_224 at 128 px (fine-tuning)."""
    short = re.sub(r"_patch\d+_\d+$", "", model)
    return f"profile_{short}_{size}" + ("" if mode == "finetune" else f"_{mode}") + ".json"


def main() -> None:
    runtime.configure(compile_cache=False)  # jaxtl's CPU settings, before JAX starts; compiles are timed
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mobilenet_v2")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--mode", choices=MODES, default="finetune")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="steps traced (and 3x as many timed)")
    p.add_argument("--top", type=int, default=25, help="how many of the longest operations to list")
    p.add_argument("--out", default=None,
                   help="JSON file: a bare name goes into benchmarks/results/, a path is used as given "
                        "(default: profile_<model>_<size>[_<mode>].json, so profiles of different models "
                        "do not overwrite each other)")
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be at least 1")
    try:
        jaxtl.get_spec(args.model)
    except UnknownModelError as e:
        p.error(f"--model: {e}")
    if args.out is None:
        args.out = default_out(args.model, args.size, args.mode)
    results_path(args.out)  # a bad --out fails now, not after the measurements

    log(f"{args.model} {args.size}px {args.mode}, batch {args.batch}: compiling ...")
    compiled_hlo = {}
    run, compile_s, _ = jaxtl_job(args.model, args.size, args.mode, args.batch, "float32",
                                  on_compiled=lambda c: compiled_hlo.setdefault("text", c.as_text()))
    index = hlo_index(compiled_hlo["text"])
    for _ in range(2):
        run()
    times = []
    for _ in range(3 * args.steps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    step_ms = median(times) * 1000

    trace_dir = tempfile.mkdtemp(prefix="jaxtl_profile_")
    try:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(args.steps):
            run()
        jax.profiler.stop_trace()
        events = trace_events(trace_dir)
    finally:
        shutil.rmtree(trace_dir, ignore_errors=True)

    per_op = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(NOT_OPS):
            per_op[e["name"]] += e.get("dur", 0) / 1000 / args.steps   # ms per step
    by_layer, by_kind = collections.Counter(), collections.Counter()
    top = []
    for name, ms in per_op.most_common():
        shape, op_name = index.get(name, ("", ""))
        layer, direction = origin(op_name)
        by_layer[(layer, direction)] += ms
        by_kind[re.sub(r"\.\d+$", "", name)] += ms
        if len(top) < args.top:
            top.append({"op": name, "ms": ms, "shape": shape, "layer": layer, "dir": direction,
                        "op_name": op_name.replace("jit(train_step)/", "")})
    traced_ms = sum(per_op.values())

    print(f"\n{args.model} {args.size}px {args.mode}, batch {args.batch}: step {step_ms:.0f} ms (median of "
          f"{len(times)}), traced operations {traced_ms:.0f} ms per step, compile {compile_s:.1f} s\n")
    top_table = markdown_table(["ms/step", "operation", "shape", "layer", "dir"],
                               [[t["ms"], t["op"], t["shape"], t["layer"], t["dir"]] for t in top])
    layer_table = markdown_table(["layer kind", "dir", "ms/step", "share of traced"],
                                 [[k[0], k[1], v, f"{v / traced_ms:.0%}"] for k, v in by_layer.most_common()
                                  if v >= 0.5])
    kind_table = markdown_table(["XLA operation kind", "ms/step"], [[k, v] for k, v in by_kind.most_common(15)])
    print(top_table, "", layer_table, "", kind_table, sep="\n")
    write_json(args.out, {
        "model": args.model, "size": args.size, "mode": args.mode, "batch": args.batch,
        "step_ms": step_ms, "traced_ms_per_step": traced_ms, "compile_s": compile_s,
        "top": top, "by_layer": [{"layer": k[0], "dir": k[1], "ms": v} for k, v in by_layer.most_common()],
        "by_kind": dict(by_kind.most_common()), "tables": {"top": top_table, "layer": layer_table, "kind": kind_table},
        "machine": machine()})


if __name__ == "__main__":
    main()
