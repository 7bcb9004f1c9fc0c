"""What a frozen backbone costs: each figure beside a reference measured in the same run.

Targets (issue "Frozen is free"):

* ``head_step`` - a train step of the head on cached features (the default job's
  step: Dense 1280 -> 10, Adam, batch 32), as the trainer runs it (an epoch of
  44 steps in one call), against a plain jitted optax step of the same head,
  called once per step. Target: at most 2x.
* ``default_job`` - ``python -m jaxtl.train`` (MobileNetV2 feature extraction on
  cached digits features) with ``--epochs 15`` and ``--epochs 1``, alternated;
  the difference is what 14 more epochs cost (training, evaluation, checkpoint,
  log), and so is the time between the first and the last epoch line of the
  15-epoch run (steadier: it leaves out start-up and feature caching, which
  vary from run to run by more than the target). Target: at most 3 s. Also the bytes of one epoch's checkpoint against
  the head's parameters and optimizer state. ``--baseline-src DIR`` runs the same
  command lines on another checkout (e.g. a worktree of the previous commit),
  alternated with this one: the before/after table.
* ``feature_extract_step`` - without the cache: the frozen-backbone train step
  against inference plus the head step. Target: at most 1.1x.
* ``memory`` - XLA's memory of the frozen-backbone train step (arguments,
  temporaries and outputs, less what is aliased) against inference's plus the
  head's (ResNet-50 and ViT-B/16 at 224 px). Target: at most that.
* ``host`` - host work per step of the trainer's loop on a trivial model: the
  step call alone, then with the per-step metric read, the batch transfer and
  the progress bar.

    python benchmarks/bench_frozen.py                    # everything (~10 min on 2 cores)
    python benchmarks/bench_frozen.py --parts head_step,host --quick
    python benchmarks/bench_frozen.py --parts default_job --baseline-src /tmp/previous-jaxtl
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxtl
from jaxtl import runtime
from jaxtl.models import built_for_one_size
import jax
import jax.numpy as jnp
import optax

from common import add_timing_args, alternate, log, machine, markdown_table, median, parse_timing_args, write_json

PARTS = ("head_step", "default_job", "feature_extract_step", "memory", "host")
ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- head step on cached features


def head_step_part(args) -> dict:
    from jaxtl.optim import OptimConfig, make_optimizer
    from jaxtl.registry import get_spec
    from jaxtl.strategies import Strategy, all_labels
    from jaxtl.training.parallel import AXIS, DataParallel
    from jaxtl.training.state import create_train_state
    from jaxtl.optim import plateau_init
    from jaxtl.training.step import head_forward, make_train_step, scan_steps

    spec = get_spec("mobilenet_v2")
    features, classes, batch, steps = 1280, 10, args.batch, 44
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps * batch, features)).astype(np.float32)
    y = rng.integers(0, classes, steps * batch).astype(np.int32)
    head = {"kernel": jnp.asarray(rng.standard_normal((features, classes)) * 0.01, jnp.float32),
            "bias": jnp.zeros(classes, jnp.float32)}
    head_path = spec.head_path
    params = {head_path[0]: head} if len(head_path) == 1 else None
    assert params is not None, head_path
    labels = jax.tree.map(lambda _: "head", params)
    labels[head_path[0]]["bias"] = "head/no_decay"
    cfg = OptimConfig(opt="adam", lr=1e-3, sched="cosine")
    tx = make_optimizer(cfg, labels, Strategy("feature_extract").lr_multipliers(spec), all_labels(spec), steps, 15)
    dp = DataParallel("shard_map", jax.devices()[:1])
    step = make_train_step(head_forward(head_path), tx, num_classes=classes, axis_name=AXIS)
    epoch = dp.train_step(scan_steps(step), stacked=True)
    frozen = dp.replicate({"params": {}, "batch_stats": {}})
    batches = [{"image": x[i * batch:(i + 1) * batch], "label": y[i * batch:(i + 1) * batch],
                "weight": np.ones(batch, np.float32)} for i in range(steps)]
    trainable = {"params": jax.tree.map(jnp.copy, params), "batch_stats": {}}  # copies: the state is donated
    holder = {"state": dp.replicate(create_train_state(trainable, tx, 0, plateau_init(cfg)))}

    stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    def jaxtl_epoch():  # what the trainer does per epoch: place the batches, one call, read the metrics
        holder["state"], metrics = epoch(holder["state"], frozen, dp.put_batches(stacked))
        jax.device_get(metrics)

    plain_tx = optax.adam(1e-3)

    @jax.jit
    def plain_step(p, opt_state, xb, yb):
        def loss_fn(p):
            logits = xb @ p["kernel"] + p["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

        loss, g = jax.value_and_grad(loss_fn)(p)
        updates, opt_state = plain_tx.update(g, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    plain = {"p": jax.tree.map(jnp.copy, head), "s": plain_tx.init(head)}
    xs, ys = [jnp.asarray(b["image"]) for b in batches], [jnp.asarray(b["label"]) for b in batches]

    def plain_epoch():  # the same 44 steps, one jitted optax call each (inputs already on the device)
        for xb, yb in zip(xs, ys):
            plain["p"], plain["s"], loss = plain_step(plain["p"], plain["s"], xb, yb)
        loss.block_until_ready()

    times = alternate({"jaxtl": jaxtl_epoch, "plain_optax": plain_epoch}, args.rounds, args.repeats)
    per_step = {k: median(v) / steps for k, v in times.items()}
    return {"steps_per_epoch": steps, "batch": batch, "jaxtl_ms": per_step["jaxtl"] * 1e3,
            "plain_optax_ms": per_step["plain_optax"] * 1e3,
            "ratio": per_step["jaxtl"] / per_step["plain_optax"], "target": 2.0}


# --------------------------------------------------------------------------- the default job, end to end


def _run_default(src: Path, epochs: int, out: Path, cache_env: dict) -> tuple[float, float]:
    """(the whole process's seconds, seconds from its first epoch line to its last), from the output
    lines as they arrive: the second leaves out start-up and feature caching, which vary run to run."""
    env = {**os.environ, **cache_env, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jaxtl.train", "--epochs", str(epochs), "--output", str(out),
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=src)
    epoch_lines = [time.perf_counter() for line in proc.stdout if line.startswith("epoch ")]
    err = proc.stderr.read()
    if proc.wait() != 0:
        raise SystemExit(f"default job failed in {src}:\n{err[-2000:]}")
    return time.perf_counter() - t0, epoch_lines[-1] - epoch_lines[0]


def _checkpoint_bytes(out: Path) -> tuple[int, int]:
    """(bytes of the last checkpoint folder, of which arrays) of a finished run."""
    folder = max((p for p in (out / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    files = [p for p in folder.rglob("*") if p.is_file()]
    arrays = [p for p in files if "/d/" in str(p)]
    return sum(p.stat().st_size for p in files), sum(p.stat().st_size for p in arrays)


def default_job_part(args) -> dict:
    sources = {"this": ROOT}
    if args.baseline_src:
        sources["baseline"] = Path(args.baseline_src).resolve()
    rounds = 1 if args.quick else args.job_rounds
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, src in sources.items():  # warm each checkout's weight cache and compile cache (per schedule)
            cache = {"JAXTL_CACHE": str(tmp / f"cache_{name}")}
            for e in (1, 15):
                _run_default(src, e, tmp / f"warm_{name}_{e}", cache)
        times = {f"{name}_{e}": [] for name in sources for e in (1, 15)}
        between = {name: [] for name in sources}
        for r in range(rounds):
            for name, src in sources.items():
                cache = {"JAXTL_CACHE": str(tmp / f"cache_{name}")}
                for e in (1, 15):
                    run_dir = tmp / f"{name}_{e}_{r}"
                    total, epochs_span = _run_default(src, e, run_dir, cache)
                    times[f"{name}_{e}"].append(total)
                    if e == 15:
                        between[name].append(epochs_span)
                    log(f"default job {name} --epochs {e}: {total:.1f} s")
        for name in sources:
            total, arrays = _checkpoint_bytes(tmp / f"{name}_15_0")
            out[name] = {"epochs_1_s": median(times[f"{name}_1"]), "epochs_15_s": median(times[f"{name}_15"]),
                         "extra_14_epochs_s": median(times[f"{name}_15"]) - median(times[f"{name}_1"]),
                         "epoch_1_to_15_lines_s": median(between[name]), "runs": times,
                         "checkpoint_bytes": total, "checkpoint_array_bytes": arrays}
    head = (1280 * 10 + 10) * 4
    out["head_bytes"], out["head_and_adam_bytes"] = head, 3 * head
    out["target_extra_14_epochs_s"] = 3.0
    return out


# --------------------------------------------------------------------------- frozen backbone without the cache


def feature_extract_part(args) -> dict:
    from bench_throughput import jaxtl_job

    rows = {}
    for name in args.models.split(","):
        jobs = {mode: jaxtl_job(name, args.size, mode, args.batch, "float32")[0]
                for mode in ("feature_extract", "inference")}
        head = _plain_head_job(_num_features(name, args.size), args.batch)
        times = alternate({**jobs, "head": head}, args.rounds, args.repeats)
        t = {k: median(v) for k, v in times.items()}
        rows[name] = {"feature_extract_ms": t["feature_extract"] * 1e3, "inference_ms": t["inference"] * 1e3,
                      "head_ms": t["head"] * 1e3,
                      "ratio": t["feature_extract"] / (t["inference"] + t["head"]), "target": 1.1}
        log(f"{name}: {rows[name]}")
    return {"size": args.size, "batch": args.batch, "models": rows}


def _num_features(name: str, size: int) -> int:
    from jaxtl.models import abstract_variables

    spec = jaxtl.get_spec(name)
    kw = {"img_size": size} if built_for_one_size(spec) else {}
    model = jaxtl.create_model(name, 10, **kw)
    variables = abstract_variables(model, spec)
    return int(jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, size, size, 3)), features_only=True),
                              variables).shape[-1])


def _plain_head_job(features: int, batch: int):
    """The head alone: a jitted SGD-momentum step of Dense(features -> 10) on pooled features."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, features)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    tx = optax.sgd(0.01, momentum=0.9)
    state = {"p": {"kernel": jnp.zeros((features, 10)), "bias": jnp.zeros(10)}}
    state["s"] = tx.init(state["p"])

    @jax.jit
    def step(p, s):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(x @ p["kernel"] + p["bias"],
                                                                              y).mean())(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    def run():
        state["p"], state["s"] = step(state["p"], state["s"])
        jax.block_until_ready(state["p"])

    return run


# --------------------------------------------------------------------------- XLA memory


def memory_part(args) -> dict:
    from bench_throughput import _xla_bytes, jaxtl_job

    rows = {}
    for name in args.memory_models.split(","):
        got = {}
        for mode in ("feature_extract", "inference"):
            compiled = {}
            jaxtl_job(name, 224, mode, args.batch, "float32", on_compiled=lambda c: compiled.setdefault("c", c))
            m = compiled["c"].memory_analysis()
            got[mode] = {"total": _xla_bytes(compiled["c"]), "arguments": m.argument_size_in_bytes,
                         "temporaries": m.temp_size_in_bytes, "outputs": m.output_size_in_bytes,
                         "aliased": m.alias_size_in_bytes}
        features = _num_features(name, 224)
        head = (features * 10 + 10) * 4
        # the head's share: its parameters in and out, a gradient and a momentum, the logits
        allowed = got["inference"]["total"] + 4 * head + args.batch * 10 * 4
        rows[name] = {**{f"{k}_{m}": v for m, d in got.items() for k, v in d.items()}, "head_bytes": head,
                      "inference_plus_head": allowed,
                      "ratio": got["feature_extract"]["total"] / allowed, "target": 1.0}
        log(f"{name}: {rows[name]}")
    return {"size": 224, "batch": args.batch, "models": rows}


# --------------------------------------------------------------------------- host work per step


def host_part(args) -> dict:
    """The trainer's per-step host work on a model whose device work is negligible."""
    from tqdm import tqdm

    from jaxtl.training.parallel import AXIS, DataParallel
    from jaxtl.training.state import TrainState, create_train_state
    from jaxtl.training.step import TRAIN_METRICS, apply_gradients, cross_entropy, pack_metrics, unpack_metrics
    from jaxtl.optim import plateau_init, OptimConfig

    tx = optax.sgd(0.01, momentum=0.9)

    def step(state: TrainState, frozen, batch):
        def loss_fn(p):
            logits = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) @ p["w"]
            return jnp.sum(cross_entropy(logits, batch["label"], 10) * batch["weight"]), logits

        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new, loss, grad_norm, finite = apply_gradients(state, grads, loss, {}, tx, AXIS)
        return new, {"loss_sum": loss, "correct": jnp.sum(jnp.argmax(logits, -1) == batch["label"]),
                     "count": jnp.sum(batch["weight"]), "grad_norm": grad_norm, "finite": finite}

    dp = DataParallel("shard_map", jax.devices()[:1])
    mapped_dict = dp.train_step(step)
    mapped = dp.train_step(pack_metrics(step, TRAIN_METRICS))  # what the trainer runs
    frozen = dp.replicate({"params": {}, "batch_stats": {}})
    rng = np.random.default_rng(0)
    host_batch = {"image": rng.integers(0, 255, (args.batch, 4, 4, 3), dtype=np.uint8),
                  "label": rng.integers(0, 10, args.batch).astype(np.int32),
                  "weight": np.ones(args.batch, np.float32)}
    device_batch = dp.put_batch(host_batch)
    holder = {"s": dp.replicate(create_train_state({"params": {"w": jnp.zeros((48, 10))}, "batch_stats": {}}, tx, 0,
                                                   plateau_init(OptimConfig())))}
    n = 200

    def call_only():
        for _ in range(n):
            holder["s"], m = mapped(holder["s"], frozen, device_batch)
        jax.block_until_ready(m)

    def with_dict_read():  # the metrics as a dict of scalars, one transfer each
        for _ in range(n):
            holder["s"], m = mapped_dict(holder["s"], frozen, device_batch)
            jax.device_get(m)

    def with_metric_read():  # packed into one vector, as the trainer reads them
        for _ in range(n):
            holder["s"], m = mapped(holder["s"], frozen, device_batch)
            unpack_metrics(np.asarray(jax.device_get(m)), TRAIN_METRICS)

    def with_transfer():  # the trainer's loader does this in its background thread
        for _ in range(n):
            holder["s"], m = mapped(holder["s"], frozen, dp.put_batch(host_batch))
            unpack_metrics(np.asarray(jax.device_get(m)), TRAIN_METRICS)

    def with_bar():
        with open(os.devnull, "w") as sink:
            bar = tqdm(total=n, file=sink, mininterval=0.5)
            for _ in range(n):
                holder["s"], m = mapped(holder["s"], frozen, dp.put_batch(host_batch))
                m = unpack_metrics(np.asarray(jax.device_get(m)), TRAIN_METRICS)
                bar.set_postfix(loss=f"{float(m['loss_sum']):.4f}", refresh=False)
                bar.update(1)
            bar.close()

    candidates = {"step call": call_only, "+ metric read as a dict of scalars": with_dict_read,
                  "+ metric read as one vector (the trainer)": with_metric_read,
                  "+ batch transfer (off the main thread in the trainer)": with_transfer,
                  "+ progress bar": with_bar}
    times = alternate(candidates, args.rounds, args.repeats)
    return {"batch": args.batch, "us_per_step": {k: median(v) / n * 1e6 for k, v in times.items()}}


def main() -> None:
    runtime.configure(compile_cache=False)  # jaxtl's CPU settings, before JAX starts; compiles are timed
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--models", default="mobilenet_v2,resnet50", help="feature_extract_step: backbones")
    p.add_argument("--memory-models", default="resnet50,vit_base_patch16_224", help="memory: backbones at 224 px")
    p.add_argument("--size", type=int, default=128, help="feature_extract_step: image size")
    p.add_argument("--job-rounds", type=int, default=3, help="default_job: alternated runs of each command line")
    p.add_argument("--baseline-src", help="default_job: another jaxtl checkout to run side by side")
    add_timing_args(p, "frozen.json", rounds=5)
    args = parse_timing_args(p, "frozen.json")
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    run = {"head_step": head_step_part, "default_job": default_job_part, "feature_extract_step": feature_extract_part,
           "memory": memory_part, "host": host_part}
    results = {"machine": machine(), "args": vars(args)}
    for part in parts:
        log(f"-- {part}")
        results[part] = run[part](args)
    path = write_json(args.out, results)
    print(report(results))
    log(f"wrote {path}")


def report(results: dict) -> str:
    lines = []
    if "head_step" in results:
        h = results["head_step"]
        lines.append(markdown_table(["head step on cached features", "jaxtl ms", "plain optax ms", "ratio", "target"],
                                    [["Dense 1280->10, Adam, batch %d" % h["batch"], h["jaxtl_ms"],
                                      h["plain_optax_ms"], h["ratio"], "<= 2"]]))
    if "default_job" in results:
        d = results["default_job"]
        rows = [[name, v["epochs_1_s"], v["epochs_15_s"], v["extra_14_epochs_s"], v["epoch_1_to_15_lines_s"],
                 v["checkpoint_bytes"], v["checkpoint_array_bytes"]] for name, v in d.items() if isinstance(v, dict)]
        lines.append(markdown_table(["default job", "--epochs 1 s", "--epochs 15 s", "difference s",
                                     "epoch 1 to 15 lines s", "checkpoint bytes", "of which arrays"], rows))
        lines.append(f"(head: {d['head_bytes']} bytes; head + Adam moments: {d['head_and_adam_bytes']})")
    if "feature_extract_step" in results:
        f = results["feature_extract_step"]
        lines.append(markdown_table(
            [f"frozen backbone, {f['size']} px", "step ms", "inference ms", "head ms", "step / (inf + head)"],
            [[k, v["feature_extract_ms"], v["inference_ms"], v["head_ms"], v["ratio"]]
             for k, v in f["models"].items()]))
    if "memory" in results:
        m = results["memory"]
        lines.append(markdown_table(
            ["XLA memory at 224 px", "frozen-backbone step MiB", "inference MiB", "inference + head MiB", "ratio"],
            [[k, v["total_feature_extract"] / 2**20, v["total_inference"] / 2**20, v["inference_plus_head"] / 2**20,
              v["ratio"]] for k, v in m["models"].items()]))
    if "host" in results:
        lines.append(markdown_table(["host work per step (trivial model)", "us"],
                                    [[k, v] for k, v in results["host"]["us_per_step"].items()]))
    return "\n\n".join(lines)


if __name__ == "__main__":
    main()
