#!/usr/bin/env python
"""Measure parity with torchvision/timm for every registered backbone and source.

For each (backbone, source): a random-init PyTorch model with randomised
normalisation statistics and affine parameters, converted to jaxtl, compared
on the same random batch in eval mode and in train mode (outputs and updated
BatchNorm statistics) - the harness of tests/parity.py. Prints a markdown
table (the README's model table) and writes benchmarks/results/parity.json.

    python tools/parity_report.py                  # all backbones (~20 min on 2 cores)
    python tools/parity_report.py --models 'resnet*' --size 64
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jaxtl  # noqa: E402
from common import machine, markdown_table, write_json  # noqa: E402
from parity import ParityResult, check_parity, randomize_zero_initialised  # noqa: E402
from jaxtl.models import abstract_variables  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="*", help="shell pattern(s), comma separated")
    p.add_argument("--size", type=int, default=64, help="input size for CNNs (ViTs use their own)")
    p.add_argument("--no-train", action="store_true", help="eval mode only")
    args = p.parse_args()
    patterns = args.models.split(",")
    names = [n for n in jaxtl.list_models() if any(fnmatch.fnmatch(n, pat) for pat in patterns)]
    rows, results = [], []
    for name in names:
        spec = jaxtl.get_spec(name)
        model = jaxtl.create_model(name)
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_variables(model, spec)["params"]))
        for source in sorted(spec.sources):
            size = spec.preprocessing.input_size if getattr(model, "img_size", None) else args.size
            # Dropout and stochastic depth off: train mode must be deterministic on both sides.
            kw = {k: 0.0 for k in ("drop_rate", "drop_path_rate") if k in _fields(spec)}
            t0 = time.perf_counter()
            try:
                if spec.sources[source].weights and not spec.sources[source].weights[0].num_classes:
                    # Checkpoints without a classifier (DINOv2/v3, CLIP, SigLIP): features and a random head
                    # against the source's reference features, at two patches a side, the 1e-5 bar.
                    from test_foundation_vit import TOLERANCE as FEATURE_TOLERANCE, _check

                    size = 2 * model.patch_size
                    errors = _check(name, {}, size, seed=3)
                    r = ParityResult(max(errors["logits_eval"], errors["features_eval"]),
                                     None if args.no_train else max(errors["logits_train"], errors["features_train"]))
                    assert r.worst <= FEATURE_TOLERANCE, f"differs: {errors}"
                else:
                    r = check_parity(name, source, size=size, batch=2, train=not args.no_train, jax_kwargs=kw,
                                     prepare=randomize_zero_initialised)
                    r.assert_ok()
                status = "ok"
            except AssertionError as e:
                status = f"FAIL: {str(e)[:200]}"
            except Exception as e:  # noqa: BLE001 - report and go on
                status = f"ERROR: {type(e).__name__}: {str(e)[:200]}"
                r = None
            seconds = time.perf_counter() - t0
            rec = {"model": name, "source": source, "params": n_params, "size": size, "status": status,
                   "seconds": seconds}
            if r is not None:
                rec.update(eval_err=r.eval_err, train_err=r.train_err, stats_err=r.stats_err,
                           torch_train_fp32_err=r.torch_train_fp32_err)
            results.append(rec)
            print(json.dumps(rec), file=sys.stderr, flush=True)
            rows.append([name, source, f"{n_params / 1e6:.1f} M", size,
                         f"{rec.get('eval_err', float('nan')):.1e}",
                         "-" if rec.get("train_err") is None else f"{rec['train_err']:.1e}",
                         "-" if rec.get("stats_err") is None else f"{rec['stats_err']:.1e}", status])
    table = markdown_table(["backbone", "source", "params", "px", "eval max|Δ|/max|logit|", "train", "BN stats",
                            "status"], rows)
    path = write_json("parity.json", {"machine": machine(), "results": results, "table": table})
    print(table)
    print(f"\nJSON: {path}")


def _fields(spec) -> set[str]:
    import dataclasses

    ctor = getattr(spec.constructor, "func", spec.constructor)
    try:
        return {f.name for f in dataclasses.fields(ctor)}
    except TypeError:
        return set()


if __name__ == "__main__":
    main()
