"""Robust fine-tuning, measured: accuracy in and out of distribution, and what each strategy costs.

Parts:

* ``accuracy`` - torchvision's ImageNet MobileNetV2 (the offline file) trained on ``digits`` with
  feature_extract, finetune, lp_ft, lora and finetune + L2-SP; finetune + WiSE-FT 0.5 is the
  finetune run's export interpolated with its pretrained backbone (no training of its own). Every
  exported model is evaluated on the validation split of ``digits`` (in distribution) and of
  ``digits-shifted`` and ``digits-inverted`` (out of distribution), over ``--seeds``. The same
  options for every row: 32 px, batch 32, 8 epochs, SGD 0.01 with momentum 0.9, cosine, the
  backbone at 0.1 x the head's rate where it trains; lp_ft probes for 4 epochs; lora rank 8,
  alpha 8 on the 1x1 convolutions; L2-SP weight 0.1. Also the trainable parameters and the bytes
  of one checkpoint of each.
* ``cost`` - LoRA against full fine-tuning for a ViT-B/16 at 224 px with random weights: the train
  step's time (alternated in one run) and XLA memory, the trainable parameters and the train state's
  bytes (parameters + SGD momentum: what a checkpoint holds).

    python benchmarks/bench_robust.py                          # both parts (~20 min on 2 cores)
    python benchmarks/bench_robust.py --parts accuracy --seeds 0 --epochs 2 --quick
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxtl
from jaxtl import runtime

from common import add_timing_args, alternate, log, machine, markdown_table, median, parse_timing_args, write_json

PARTS = ("accuracy", "cost")
DOMAINS = ("digits", "digits-shifted", "digits-inverted")
ROWS = ("feature_extract", "finetune", "lp_ft", "finetune + WiSE-FT 0.5", "lora", "finetune + L2-SP")


def _checkpoint_bytes(out: Path) -> int:
    folder = max((p for p in (out / "checkpoints").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _count(tree) -> int:
    import jax

    return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tree))


def accuracy_part(args) -> dict:
    from jaxtl.data.sources import load_dataset
    from jaxtl.evaluate import make_evaluator
    from jaxtl.data.preprocessing import Preprocessing
    from jaxtl.training.config import TrainConfig
    from jaxtl.training.evaluation import metrics
    from jaxtl.training.start import pretrained_of_run
    from jaxtl.wise_ft import interpolate

    optim = jaxtl.OptimConfig(opt="sgd", lr=0.01, momentum=0.9)
    runs = {"feature_extract": dict(strategy="feature_extract"),
            "finetune": dict(strategy="finetune"),
            "lp_ft": dict(strategy=jaxtl.Strategy("lp_ft", lp_epochs=args.epochs // 2)),
            "lora": dict(strategy="lora"),
            "finetune + L2-SP": dict(strategy="finetune", l2sp=args.l2sp)}
    per_seed: dict = {row: [] for row in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            splits = {d: load_dataset(d, seed=seed).val for d in DOMAINS}
            for name, options in runs.items():
                out = Path(tmp) / f"{name.replace(' ', '_')}_{seed}"
                t0 = time.perf_counter()
                result = jaxtl.train(TrainConfig(data="digits", img_size=32, batch_size=32, epochs=args.epochs,
                                                 optim=optim, seed=seed, output=str(out), progress=False,
                                                 **options), log=lambda line: None)
                seconds = time.perf_counter() - t0
                model, variables, meta = jaxtl.load_model(out)
                evaluate = make_evaluator(model, Preprocessing.from_dict(meta["preprocessing"]), 10, 64, 2)
                tops = {d: metrics(evaluate(variables, splits[d])[0])["top1"] for d in DOMAINS}
                per_seed[name].append({"seed": seed, **tops, "trainable_params": _count(result.state.params),
                                       "checkpoint_bytes": _checkpoint_bytes(out), "seconds": seconds})
                log(f"seed {seed} {name}: {tops} ({seconds:.0f} s)")
                if name == "finetune":
                    mixed = interpolate(pretrained_of_run(out, meta), variables, 0.5,
                                        keep=jaxtl.get_spec(meta["backbone"]).head_path)
                    tops = {d: metrics(evaluate(mixed, splits[d])[0])["top1"] for d in DOMAINS}
                    per_seed["finetune + WiSE-FT 0.5"].append({"seed": seed, **tops})
                    log(f"seed {seed} finetune + WiSE-FT 0.5: {tops}")
    return {"seeds": list(args.seeds), "epochs": args.epochs, "l2sp": args.l2sp, "runs": per_seed,
            "summary": summarise(per_seed)}


def summarise(per_seed: dict) -> dict:
    """Per row and domain: the mean and the sample standard deviation over seeds; the costs of the first seed."""
    summary = {}
    for row, got in per_seed.items():
        summary[row] = {d: {"mean": float(np.mean([g[d] for g in got])),
                            "std": float(np.std([g[d] for g in got], ddof=1)) if len(got) > 1 else 0.0}
                        for d in DOMAINS}
        if "trainable_params" in got[0]:
            summary[row]["trainable_params"] = got[0]["trainable_params"]
            summary[row]["checkpoint_bytes"] = got[0]["checkpoint_bytes"]
    return summary


def cost_part(args) -> dict:
    from bench_throughput import _xla_bytes, jaxtl_job
    from jaxtl.lora import init_factors, select_targets
    from jaxtl.models import abstract_variables

    name = "vit_base_patch16_224"
    spec = jaxtl.get_spec(name)
    params = abstract_variables(jaxtl.create_model(name, 10), spec)["params"]
    head = _count(params[spec.head_path[0]])
    targets = select_targets(params, spec.head_path, None)
    factors = _count(init_factors(params, targets, 8, 0))
    trainable = {"finetune": _count(params), "lora": factors + head}
    jobs, memory = {}, {}
    for mode in ("finetune", "lora"):
        compiled = {}
        jobs[mode] = jaxtl_job(name, 224, mode, args.batch, "float32",
                               on_compiled=lambda c: compiled.setdefault("c", c))[0]
        memory[mode] = _xla_bytes(compiled["c"])
        log(f"{mode}: compiled, XLA memory {memory[mode] / 2**20:.0f} MiB")
    times = alternate(jobs, args.rounds, args.repeats)
    rows = {mode: {"step_ms": median(times[mode]) * 1e3, "xla_bytes": memory[mode],
                   "trainable_params": trainable[mode], "train_state_bytes": 2 * 4 * trainable[mode]}
            for mode in jobs}
    return {"model": name, "size": 224, "batch": args.batch, "lora_rank": 8, "targets": len(targets),
            "rows": rows, "step_ratio": rows["lora"]["step_ms"] / rows["finetune"]["step_ms"],
            "memory_ratio": rows["lora"]["xla_bytes"] / rows["finetune"]["xla_bytes"]}


def report(results: dict) -> str:
    lines = []
    if "accuracy" in results:
        a = results["accuracy"]
        rows = []
        for row, s in a["summary"].items():
            rows.append([row, *(f"{s[d]['mean']:.3f} ± {s[d]['std']:.3f}" for d in DOMAINS),
                         s.get("trainable_params", "(finetune's)"), s.get("checkpoint_bytes", "(finetune's)")])
        lines.append(markdown_table(["strategy", "digits (in distribution)", "digits-shifted", "digits-inverted",
                                     "trainable params", "checkpoint bytes"], rows))
        lines.append(f"(validation top-1, mean ± standard deviation over seeds {a['seeds']}, {a['epochs']} epochs)")
    if "cost" in results:
        c = results["cost"]
        lines.append(markdown_table(
            [f"{c['model']} {c['size']} px, batch {c['batch']}", "step ms", "XLA MiB", "trainable params",
             "train state MiB"],
            [[mode, r["step_ms"], r["xla_bytes"] / 2**20, r["trainable_params"], r["train_state_bytes"] / 2**20]
             for mode, r in c["rows"].items()]))
        lines.append(f"(LoRA / full fine-tuning: step {c['step_ratio']:.2f}x, memory {c['memory_ratio']:.2f}x)")
    return "\n\n".join(lines)


def main() -> None:
    runtime.configure()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--seeds", default="0,1,2", help="accuracy: seeds")
    p.add_argument("--epochs", type=int, default=8, help="accuracy: epochs of every run")
    p.add_argument("--l2sp", type=float, default=0.1, help="accuracy: L2-SP weight")
    add_timing_args(p, "robust_finetuning.json", rounds=2, batch_help="cost: images per step")
    args = parse_timing_args(p, "robust_finetuning.json")
    args.seeds = [int(s) for s in str(args.seeds).split(",") if s.strip()]
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    results = {"machine": machine(), "args": vars(args)}
    for part in parts:
        log(f"-- {part}")
        results[part] = {"accuracy": accuracy_part, "cost": cost_part}[part](args)
    path = write_json(args.out, results)
    print(report(results))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
