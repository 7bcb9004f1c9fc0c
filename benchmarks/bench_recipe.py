"""The training recipe's costs: what gradient checkpointing saves and what it costs.

* ``grad_checkpointing`` - the fine-tuning train step (SGD with momentum, random weights, 224 px)
  with and without ``--grad-checkpointing`` (each block's activations recomputed in the backward
  pass), for ResNet-50 and ViT-B/16: XLA's memory of the step (arguments + temporaries + outputs
  - aliased) and the step time, the two alternated in one run.

    python benchmarks/bench_recipe.py                  # ~10 min on 2 cores
    python benchmarks/bench_recipe.py --models resnet50 --batch 4 --quick
"""

from __future__ import annotations

import argparse

from jaxtl import runtime

from common import add_timing_args, alternate, log, machine, markdown_table, median, parse_timing_args, write_json


def grad_checkpointing_part(args) -> dict:
    from bench_throughput import jaxtl_job

    rows = {}
    for name in args.models.split(","):
        jobs, memory = {}, {}
        for label, kw in (("plain", {}), ("checkpointed", {"grad_checkpointing": True})):
            compiled = {}
            jobs[label] = jaxtl_job(name, 224, "finetune", args.batch, "float32", model_kwargs=kw,
                                    on_compiled=lambda c: compiled.setdefault("c", c))[0]
            memory[label] = compiled["c"].memory_analysis()
            log(f"{name} {label}: temporaries {memory[label].temp_size_in_bytes / 2**20:.0f} MiB")
        times = alternate(jobs, args.rounds, args.repeats)
        total = {k: m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 for k, m in memory.items()}
        rows[name] = {**{f"{k}_ms": median(v) * 1e3 for k, v in times.items()},
                      **{f"{k}_xla_bytes": int(v) for k, v in total.items()},
                      **{f"{k}_temp_bytes": int(m.temp_size_in_bytes) for k, m in memory.items()},
                      "time_ratio": median(times["checkpointed"]) / median(times["plain"]),
                      "memory_ratio": total["checkpointed"] / total["plain"]}
        log(f"{name}: {rows[name]}")
    return {"size": 224, "batch": args.batch, "models": rows}


def report(results: dict) -> str:
    g = results["grad_checkpointing"]
    return markdown_table(
        [f"fine-tune step, 224 px, batch {g['batch']}", "plain ms", "checkpointed ms", "time ratio", "plain MiB",
         "checkpointed MiB", "memory ratio"],
        [[k, v["plain_ms"], v["checkpointed_ms"], v["time_ratio"], v["plain_xla_bytes"] / 2**20,
          v["checkpointed_xla_bytes"] / 2**20, v["memory_ratio"]] for k, v in g["models"].items()])


def main() -> None:
    runtime.configure(compile_cache=False)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,vit_base_patch16_224")
    add_timing_args(p, "recipe.json", rounds=2, batch_help="images per step")
    args = parse_timing_args(p, "recipe.json")
    results = {"machine": machine(), "args": vars(args), "grad_checkpointing": grad_checkpointing_part(args)}
    path = write_json(args.out, results)
    print(report(results))
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
