"""Train-step and inference throughput, jaxtl vs PyTorch, side by side in one process.

For each backbone and image size (batch 32 by default), three jobs:

* ``finetune``  - every layer trains (SGD momentum 0.9, cross-entropy);
* ``feature_extract`` - the backbone is frozen, only a new head trains;
* ``inference`` - forward only, eval mode.

jaxtl: the library's own jitted step (``make_train_step`` over a one-device
``shard_map``, the strategy's label tree and optimizer), exactly what
``python -m jaxtl.train`` runs. PyTorch eager, two ways:

* *guide*: as the transfer-learning tutorials write it - ``model.train()``
  everywhere, frozen parameters via ``requires_grad=False`` (so BatchNorm in the
  frozen backbone still runs on batch statistics and updates them), NCHW;
* *best*: the faster of NCHW and channels_last, frozen backbone in eval mode
  under ``no_grad`` (the correct and fast way), ``inference_mode`` for inference.

Rounds alternate jaxtl and PyTorch. Reported: images/s (median), the ratio
jaxtl / PyTorch-best and jaxtl / PyTorch-guide, jaxtl's compile time, the
compiled step's XLA memory (arguments + temporaries) and the process's peak
resident memory. ``fe/inf`` is jaxtl's feature-extraction step time divided
by its inference time: close to 1 means no backward pass through the frozen
backbone.

    python benchmarks/bench_throughput.py                     # the full table (20-40 min on 2 cores)
    python benchmarks/bench_throughput.py --models resnet18 --sizes 128 --quick
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np

import jaxtl
from jaxtl import runtime
from jaxtl.models import built_for_one_size
import jax
import jax.numpy as jnp

from common import (add_timing_args, alternate, log, machine, markdown_table, median, parse_timing_args,
                    peak_rss_mib, write_json)

MODELS = ("resnet18", "resnet50", "mobilenet_v2", "vit_tiny_patch16_224")
SIZES = (128, 224)
MODES = ("finetune", "feature_extract", "inference")
NUM_CLASSES = 10


# --------------------------------------------------------------------------- jaxtl


def jaxtl_job(name: str, size: int, mode: str, batch: int, dtype: str, on_compiled=None,
              compiler_options: dict | None = None, devices=None, mapping: str = "shard_map",
              model_kwargs: dict | None = None):
    """Returns (run-once callable, compile seconds, XLA memory bytes).

    ``on_compiled`` (optional) is called with the compiled executable
    (profile_step.py reads its optimised HLO); ``compiler_options`` are XLA
    debug options for this executable alone (same-process A/Bs of XLA options).
    ``devices`` (default: the first device) and ``mapping`` spread the train
    step's ``batch`` images over several devices (bench_scaling.py); inference
    always runs on one device. ``model_kwargs`` go to the trained model (e.g. ``grad_checkpointing``)."""
    from jaxtl.models import init_variables
    from jaxtl.optim import OptimConfig, make_optimizer, plateau_init
    from jaxtl.strategies import Strategy, all_labels, label_tree, split_variables, trainable_labels
    from jaxtl.training.parallel import AXIS, DataParallel
    from jaxtl.training.state import create_train_state
    from jaxtl.training.step import image_forward, make_train_step

    spec = jaxtl.get_spec(name)
    kw = {"img_size": size} if built_for_one_size(spec) else {}
    model = jaxtl.create_model(name, NUM_CLASSES, dtype=dtype, axis_name=AXIS, **kw, **(model_kwargs or {}))
    variables = init_variables(jaxtl.create_model(name, NUM_CLASSES, **kw), spec, 0)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, 3)), jnp.float32)
    dp = DataParallel(mapping, devices or jax.devices()[:1])
    dp.check_batch_size(batch, "batch")
    if mode == "inference":
        fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))
        t0 = time.perf_counter()
        compiled = fwd.lower(variables, x).compile(compiler_options=compiler_options)
        compile_s = time.perf_counter() - t0
        if on_compiled is not None:
            on_compiled(compiled)
        return (lambda: compiled(variables, x).block_until_ready()), compile_s, _xla_bytes(compiled)

    strategy = Strategy("finetune", backbone_lr_mult=1.0) if mode == "finetune" else Strategy(
        "lora" if mode == "lora" else "feature_extract")
    frozen = strategy.frozen_groups(spec)
    extra_keys, reparam = (), None
    if mode == "lora":  # rank-8 adapters on the default targets, as --strategy lora trains them
        from jaxtl.lora import LORA_KEY, apply_factors, init_factors, select_targets

        params = variables["params"]
        params[LORA_KEY] = init_factors(params, select_targets(params, spec.head_path, None), 8, 0)
        extra_keys = (LORA_KEY,)
        reparam = lambda v, key: {**v, "params": apply_factors(v["params"], 1.0)}  # noqa: E731
    labels = trainable_labels(label_tree(spec, variables["params"], frozen, extra_keys=extra_keys))
    trainable, constants = split_variables(spec, variables, frozen, extra_keys)
    cfg = OptimConfig(opt="sgd", lr=0.01, momentum=0.9, sched="constant")
    tx = make_optimizer(cfg, labels, strategy.lr_multipliers(spec), all_labels(spec), 100, 1)
    step = make_train_step(image_forward(model, frozen=frozen, prepare=lambda key, images: images, reparam=reparam),
                           tx, num_classes=NUM_CLASSES, axis_name=AXIS)
    remat = (model_kwargs or {}).get("grad_checkpointing")
    mapped = dp.train_step(step, donate=True,
                           compiler_options=runtime.remat_compiler_options(dp.devices[0].platform) if remat else None)
    batch_dict = dp.put_batch({"image": np.asarray(x), "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
                               "weight": np.ones(batch, np.float32)})
    holder = {"state": dp.replicate(create_train_state(trainable, tx, 0, plateau_init(cfg)))}
    constants = dp.replicate(constants)
    t0 = time.perf_counter()
    compiled = mapped.lower(holder["state"], constants, batch_dict).compile(compiler_options=compiler_options)
    compile_s = time.perf_counter() - t0
    if on_compiled is not None:
        on_compiled(compiled)

    def run():
        holder["state"], metrics = compiled(holder["state"], constants, batch_dict)
        metrics["loss_sum"].block_until_ready()

    return run, compile_s, _xla_bytes(compiled)


def _xla_bytes(compiled) -> int | None:
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                   - m.alias_size_in_bytes)
    except Exception:  # noqa: BLE001 - not every backend reports it
        return None


# --------------------------------------------------------------------------- PyTorch


def _module_at(model, dotted: str):
    mod = model
    for part in dotted.split("."):
        mod = mod[int(part)] if part.isdigit() else getattr(mod, part)
    return mod


def _set_module(model, dotted: str, new) -> None:
    parent, _, last = dotted.rpartition(".")
    owner = _module_at(model, parent) if parent else model
    if last.isdigit():
        owner[int(last)] = new
    else:
        setattr(owner, last, new)


def torch_jobs(name: str, size: int, mode: str, batch: int, dtype: str, device: str):
    """{variant: run-once callable} for the PyTorch side."""
    import torch

    from jaxtl.conversion import _ref
    from jaxtl.torch_ref import build_torch_model

    spec = jaxtl.get_spec(name)
    src = spec.source(None)
    kw = {}
    if built_for_one_size(spec):
        kw = {"img_size": size} if src.name == "timm" else {"image_size": size}
    head_path = _ref(src, ("params", *spec.head_path, "kernel"))[0].rsplit(".", 1)[0]
    rng = np.random.default_rng(0)
    x_cpu = torch.from_numpy(rng.standard_normal((batch, 3, size, size)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, NUM_CLASSES, batch)).to(device)
    amp = dtype == "bfloat16"
    loss_fn = torch.nn.CrossEntropyLoss()
    jobs = {}

    def autocast():
        return torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    for layout in ("nchw", "channels_last"):
        torch.manual_seed(0)
        model = build_torch_model(name, src.name, num_classes=NUM_CLASSES, **kw).to(device)
        x = x_cpu.to(device)
        if layout == "channels_last" and not built_for_one_size(spec):
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "channels_last":
            continue  # a ViT has no convolution layout to choose
        if mode == "inference":
            model.eval()

            def infer(model=model, x=x):
                with torch.inference_mode(), autocast():
                    model(x)
                sync()

            jobs[f"best_{layout}"] = infer
            if layout == "nchw":
                def infer_guide(model=model, x=x):
                    with torch.no_grad(), autocast():
                        model(x)
                    sync()

                jobs["guide"] = infer_guide
            continue
        if mode == "finetune":
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

            def step(model=model, x=x, opt=opt):
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                sync()

            jobs[f"best_{layout}"] = step
            if layout == "nchw":
                jobs["guide"] = step
            continue
        # feature extraction
        head = _module_at(model, head_path)
        if layout == "nchw":  # the guides: requires_grad=False, model.train() everywhere
            guide = build_torch_model(name, src.name, num_classes=NUM_CLASSES, **kw).to(device)
            for p in guide.parameters():
                p.requires_grad_(False)
            for p in _module_at(guide, head_path).parameters():
                p.requires_grad_(True)
            guide.train()
            gopt = torch.optim.SGD([p for p in guide.parameters() if p.requires_grad], lr=0.01, momentum=0.9)

            def guide_step(model=guide, x=x, opt=gopt):
                opt.zero_grad(set_to_none=True)
                with autocast():
                    loss = loss_fn(model(x), y)
                loss.backward()
                opt.step()
                sync()

            jobs["guide"] = guide_step
        _set_module(model, head_path, torch.nn.Identity())
        backbone = model.eval()
        head.train()
        opt = torch.optim.SGD(head.parameters(), lr=0.01, momentum=0.9)

        def fe_step(backbone=backbone, head=head, x=x, opt=opt):
            with torch.no_grad(), autocast():
                feats = backbone(x)
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(head(feats.float() if not amp else feats), y)
            loss.backward()
            opt.step()
            sync()

        jobs[f"best_{layout}"] = fe_step
    return jobs


# --------------------------------------------------------------------------- main


def main() -> None:
    runtime.configure(compile_cache=False)  # jaxtl's CPU settings, before JAX starts; compiles are timed
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sizes", default=",".join(map(str, SIZES)))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    add_timing_args(p, "throughput.json", rounds=3)
    args = parse_timing_args(p, "throughput.json")
    import torch

    device = "cuda" if torch.cuda.is_available() and jax.default_backend() == "gpu" else "cpu"
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    rows, results = [], []
    for name in args.models.split(","):
        for size in map(int, args.sizes.split(",")):
            for mode in args.modes.split(","):
                log(f"{name} {size}px {mode} ...")
                run_j, compile_s, xla_bytes = jaxtl_job(name, size, mode, args.batch, args.dtype)
                candidates = {"jaxtl": run_j, **{f"torch_{k}": v for k, v in
                                                 torch_jobs(name, size, mode, args.batch, args.dtype, device).items()}}
                for fn in candidates.values():  # warm-up (PyTorch's first calls allocate)
                    fn()
                times = alternate(candidates, args.rounds, args.repeats)
                ips = {k: args.batch / median(v) for k, v in times.items()}
                best = max(v for k, v in ips.items() if k.startswith("torch_best"))
                guide = ips.get("torch_guide", best)
                rec = {"model": name, "size": size, "mode": mode, "batch": args.batch, "dtype": args.dtype,
                       "images_per_s": ips, "jaxtl_over_best": ips["jaxtl"] / best,
                       "jaxtl_over_guide": ips["jaxtl"] / guide, "compile_s": compile_s,
                       "xla_mib": None if xla_bytes is None else xla_bytes / 2**20, "peak_rss_mib": peak_rss_mib(),
                       "median_s": {k: median(v) for k, v in times.items()}}
                results.append(rec)
                rows.append([name, size, mode, ips["jaxtl"], best, guide, rec["jaxtl_over_best"],
                             rec["jaxtl_over_guide"], compile_s, rec["xla_mib"] or float("nan")])
                log(f"  jaxtl {ips['jaxtl']:.1f} img/s, torch best {best:.1f}, guide {guide:.1f}")
                del candidates, run_j
                gc.collect()
    # feature-extraction step / inference time, per model and size (jaxtl)
    for rec in results:
        if rec["mode"] == "feature_extract":
            inf = next((r for r in results if r["model"] == rec["model"] and r["size"] == rec["size"]
                        and r["mode"] == "inference"), None)
            if inf:
                rec["fe_over_inference_time"] = rec["median_s"]["jaxtl"] / inf["median_s"]["jaxtl"]
    headers = ["model", "px", "job", "jaxtl img/s", "PyTorch best", "PyTorch guide", "jaxtl/best", "jaxtl/guide",
               "compile s", "XLA MiB"]
    table = markdown_table(headers, rows)
    fe_rows = [[r["model"], r["size"], r["fe_over_inference_time"]] for r in results if "fe_over_inference_time" in r]
    fe_table = markdown_table(["model", "px", "feature-extraction step / inference (jaxtl time)"], fe_rows) \
        if fe_rows else ""
    info = machine()
    info["torch_device"] = device
    path = write_json(args.out, {"machine": info, "args": vars(args), "results": results, "table": table,
                                 "fe_table": fe_table})
    print(f"Machine: {info.get('cpu', '?')}, {info.get('cpus')} cores; jax {info['versions'].get('jax')}, "
          f"torch {info['versions'].get('torch')}; batch {args.batch}, {args.dtype}, {device}\n")
    print(table)
    if fe_table:
        print("\n" + fe_table)
    print(f"\npeak resident memory of this process: {peak_rss_mib():.0f} MiB; JSON: {path}")


if __name__ == "__main__":
    main()
