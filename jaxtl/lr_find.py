"""``python -m jaxtl.lr_find``: a learning-rate range test (Smith; fastai's ``lr_find``) before training.

It trains for a few steps from the strategy's starting state (its first stage: feature_extract trains the
head, finetune everything), with the learning rate growing exponentially from --start-lr to --end-lr, and
records each step's loss; it stops early when the smoothed loss passes 4x its best or is not finite. It
takes every option of ``python -m jaxtl.train`` (the same optimizer, momentum, weight decay, per-group
multipliers, augmentation), prints a suggested --lr and plots the loss against the rate. Nothing is written
to a run folder: only the plot.

    python -m jaxtl.lr_find --backbone resnet50 --strategy finetune --data photos/ --opt sgd --plot lr.png
    python -m jaxtl.lr_find --start-lr 1e-6 --end-lr 1 --num-it 200 ...

How the rate is suggested (fastai's suggestion functions, on the smoothed loss: an exponential moving
average with beta 0.98, debiased, without the first num_it/10 and the last 5 points, as fastai does):

* ``valley`` (the suggestion, fastai's default): the longest descent of the smoothed loss (the longest
  decreasing subsequence, as fastai computes it), and the point floor(L/3) + floor(L/6) steps into its
  span of L steps - down the slope, before the bottom where the loss starts to blow up;
* ``minimum``: the rate at the lowest smoothed loss, divided by 10;
* ``steep``: the rate where the smoothed loss falls fastest against log(rate).

The rate swept is the head's, what --lr sets; groups with a multiplier (--backbone-lr-mult, --layer-decay,
--lr-spread, --lr-mults) get it times theirs; the sweep replaces --lr, --sched and --warmup-epochs. With
--accum-steps N a step of the sweep is an optimizer step (N batches, their mean loss). --output is ignored
(with a note): the run folder the training code needs is a temporary one, removed at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from jaxtl.cli import run_cli
from jaxtl.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from jaxtl.training.config import TrainConfig

BETA = 0.98                 # fastai's AvgSmoothLoss
DIVERGED = 4.0              # fastai's stop_div: stop when the smoothed loss passes this x its best
SKIP_END = 5                # fastai leaves the last points out of its suggestions (and its plot)
MIN_IT = 5
DEFAULT_PLOT = "lr_find.png"


@dataclass
class LRFindResult:
    lrs: list[float]                  # the rate of each step, geometric from start_lr
    losses: list[float]               # each step's mean training loss, as measured
    smoothed: list[float]             # debiased exponential moving average of ``losses`` (beta 0.98)
    suggestion: float                 # fastai's valley
    minimum: float                    # the rate at the lowest smoothed loss / 10
    steep: float                      # the rate of the steepest descent of the smoothed loss in log(rate)
    stopped_early: bool               # the smoothed loss diverged (or was not finite) before num_it steps
    how: str = ""                     # how the suggestion was chosen, in words
    points: dict = field(default_factory=dict)   # indices in lrs of the valley, minimum and steep points

    def summary(self) -> str:
        return (f"suggested --lr {self.suggestion:.1e} ({self.how}); minimum/10 {self.minimum:.1e}; "
                f"steepest {self.steep:.1e}")


def check_sweep(start_lr: float, end_lr: float, num_it: int) -> None:
    """One-line errors for a sweep that cannot run."""
    for name, value in (("--start-lr", start_lr), ("--end-lr", end_lr)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ConfigError(f"{name} must be a positive number, got {value}")
    if start_lr >= end_lr:
        raise ConfigError(f"--start-lr {start_lr:g} must be below --end-lr {end_lr:g}: the rate grows during the "
                          "sweep")
    if isinstance(num_it, bool) or not isinstance(num_it, (int, np.integer)) or num_it < MIN_IT:
        raise ConfigError(f"--num-it must be a whole number >= {MIN_IT}, got {num_it}")


def sweep_rates(start_lr: float, end_lr: float, num_it: int) -> np.ndarray:
    """Step i's rate: start * (end / start) ** (i / (num_it - 1)), the ends exact."""
    return np.geomspace(start_lr, end_lr, num_it)


def smooth(losses: Sequence[float], beta: float = BETA) -> np.ndarray:
    """fastai's AvgSmoothLoss: an exponential moving average from 0, divided by 1 - beta^n."""
    out, avg = [], 0.0
    for n, loss in enumerate(losses, 1):
        avg = beta * avg + (1 - beta) * float(loss)
        out.append(avg / (1 - beta ** n))
    return np.asarray(out, np.float64)


def valley(losses: np.ndarray) -> tuple[int, int, int]:
    """fastai's ``valley`` on ``losses``: (suggested index, the valley's first index, its last index)."""
    n = len(losses)
    lds = np.ones(n, np.int64)  # the longest decreasing subsequence ending at each point
    for i in range(1, n):
        before = lds[:i][losses[:i] > losses[i]]
        if before.size:
            lds[i] = before.max() + 1
    end = int(np.argmax(lds))  # the first longest one, as fastai's loop finds it
    start = end - int(lds[end])
    sections = (end - start) / 3
    # fastai's index falls one before the window when nothing descends; the window's first point then.
    return max(start + int(sections) + int(sections / 2), 0), max(start, 0), end


def suggest(lrs: Sequence[float], smoothed: Sequence[float], num_it: int) -> dict:
    """fastai's valley, minimum and steep on the recorded sweep; the indices refer to ``lrs``."""
    lrs, smoothed = np.asarray(lrs, np.float64), np.asarray(smoothed, np.float64)
    bad = np.flatnonzero(~np.isfinite(smoothed))
    usable = int(bad[0]) if bad.size else len(smoothed)  # fastai drops everything from the first NaN on
    if usable == 0:
        raise TrainingError("the loss was not finite at the first step of the sweep; check the data and the "
                            "model (a lower --start-lr does not help here)")
    lo, hi = num_it // 10, min(len(smoothed) - SKIP_END, usable)
    trimmed = hi - lo >= 2
    if not trimmed:  # too short a sweep for fastai's trimming: every finite point
        lo, hi = 0, usable
    window = smoothed[lo:hi]
    v, v_start, v_end = valley(window)
    low = int(np.argmin(window))
    steep = int(np.argmin(np.diff(window) / np.diff(np.log(lrs[lo:hi])))) if len(window) > 1 else 0
    how = (f"valley: the longest descent of the smoothed loss, {lrs[lo + v_start]:.1e} to {lrs[lo + v_end]:.1e}, "
           f"taken about half way down")
    if not trimmed:
        how += "; the sweep was too short to leave out its first and last points as fastai does"
    return {"suggestion": float(lrs[lo + v]), "minimum": float(lrs[lo + low] / 10), "steep": float(lrs[lo + steep]),
            "how": how, "points": {"valley": lo + v, "minimum": lo + low, "steep": lo + steep}}


def lr_find(config: TrainConfig, start_lr: float = 1e-7, end_lr: float = 10.0, num_it: int = 100,
            log: Callable[[str], None] = print) -> LRFindResult:
    """Sweep the learning rate exponentially from ``start_lr`` to ``end_lr`` over ``num_it`` steps of
    ``config``'s strategy (its first stage), from its starting state; returns the losses and fastai's
    suggestions. Nothing is written: the Trainer's run folder is a temporary one, removed at the end.

        result = jaxtl.lr_find.lr_find(TrainConfig(backbone="resnet50", strategy="finetune", data="photos/"))
    """
    check_sweep(start_lr, end_lr, num_it)
    if config.resume:
        raise ConfigError("lr_find starts from the strategy's starting state; --resume continues a run, drop it")
    from jaxtl import runtime

    runtime.configure()
    with tempfile.TemporaryDirectory(prefix="jaxtl-lr-find-") as folder:
        # The sweep's rate is the plateau scale of each step: the schedule is a constant 1.
        optim = dataclasses.replace(config.optim, lr=1.0, sched="constant", warmup_epochs=0.0)
        cfg = dataclasses.replace(config, optim=optim, output=str(Path(folder) / "run"), resume=False,
                                  early_stop=None, model_ema=False, export="last")
        return _sweep(cfg, sweep_rates(start_lr, end_lr, num_it), num_it, log)


def _sweep(cfg, rates: np.ndarray, num_it: int, log) -> LRFindResult:
    import jax.numpy as jnp

    from jaxtl.training.loop import Trainer, _progress

    trainer = Trainer(cfg, log)
    try:
        stage = trainer.stages[0]
        steps = trainer.compiled(stage)
        state = trainer.initial_state(stage)
        accum = cfg.optim.accum_steps
        log(f"lr_find: {num_it} steps from {rates[0]:.1e} to {rates[-1]:.1e} ({cfg.optim.opt}); stage 0 of "
            f"{cfg.strategy_name} trains {', '.join(stage.trainable)}"
            + (f"; a step is {accum} batches (--accum-steps)" if accum > 1 else ""))
        lrs, losses, smoothed = [], [], []
        best, avg = math.inf, 0.0
        batches = _batches(trainer)
        bar = _progress(cfg.progress and trainer.primary, total=num_it, desc="lr_find")
        try:
            for i, rate in enumerate(rates):
                scale = trainer.dp.replicate(jnp.asarray(rate, jnp.float32))
                state = state.replace(plateau=state.plateau._replace(scale=scale))
                loss_sum, count, finite = 0.0, 0.0, True
                for _ in range(accum):
                    state, packed = steps.train_step(state, steps.frozen, next(batches))
                    m = {k: float(np.ravel(v)[0]) for k, v in trainer._read_metrics(packed).items()}
                    loss_sum, count = loss_sum + m["loss_sum"], count + m["count"]
                    finite = finite and bool(m["finite"])
                loss = loss_sum / max(count, 1.0) if finite else math.nan
                avg = BETA * avg + (1 - BETA) * loss
                lrs.append(float(rate))
                losses.append(loss)
                smoothed.append(avg / (1 - BETA ** (i + 1)))
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(lr=f"{rate:.1e}", loss=f"{smoothed[-1]:.4f}", refresh=False)
                if not math.isfinite(smoothed[-1]) or smoothed[-1] > DIVERGED * best:
                    break
                best = min(best, smoothed[-1])
        finally:
            batches.close()
            if bar is not None:
                bar.close()
    finally:
        trainer.ckpts.close()
        if trainer.lock is not None:
            trainer.lock.release()
    stopped = len(lrs) < num_it
    if stopped:
        why = "was not finite" if not math.isfinite(smoothed[-1]) else f"passed {DIVERGED:g}x its best ({best:.4f})"
        log(f"stopped after {len(lrs)} of {num_it} steps: at lr {lrs[-1]:.1e} the smoothed loss {why}")
    picked = suggest(lrs, smoothed, num_it)
    return LRFindResult(lrs, losses, smoothed, picked["suggestion"], picked["minimum"], picked["steep"], stopped,
                        picked["how"], picked["points"])


def _batches(trainer) -> Iterator:
    """The strategy's training batches, epoch after epoch, one step's worth at a time."""
    epoch = 0
    while True:
        if trainer.cfg.cache_features:  # the compiled step takes stacked batches: stacks of one
            host = trainer.train_loader.stacked(epoch)
            for b in range(len(host["label"])):
                yield trainer.dp.put_batches({k: v[b:b + 1] for k, v in host.items()})
        else:
            yield from trainer.objective.batches(trainer, epoch, 0)  # closing this closes the loader's thread
        epoch += 1


def plot(result: LRFindResult, path: str | Path, title: str = "") -> Path:
    """The smoothed loss against the rate (log axis), the raw losses faint, the suggestions marked."""
    from jaxtl.training.report import _pyplot

    plt = _pyplot()
    path = Path(path)
    lrs, smoothed = np.asarray(result.lrs), np.asarray(result.smoothed)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(lrs, result.losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(lrs, smoothed, color="C0", label="smoothed loss")
    marks = (("suggestion", "valley", "C3", "o"), ("minimum", "minimum", "C2", "s"), ("steep", "steep", "C1", "^"))
    for name, key, color, marker in marks:
        i = result.points.get(key)
        if i is not None:
            note = " (the rate at the point / 10)" if key == "minimum" else ""
            ax.plot(lrs[i], smoothed[i], marker, color=color, markersize=8,
                    label=f"{name} {getattr(result, name):.1e}{note}")
    ax.axvline(result.suggestion, color="C3", linewidth=0.8, linestyle="--")
    # The smoothed curve before the last points sets the scale (fastai leaves them out of its plot); the
    # divergence and raw spikes go off the top.
    shown = smoothed[:-SKIP_END] if len(smoothed) > 2 * SKIP_END else smoothed
    finite = shown[np.isfinite(shown)]
    raw = np.asarray(result.losses[:len(shown)])
    low = np.concatenate([finite, raw[np.isfinite(raw)]])
    if finite.size:
        span = max(float(finite.max() - low.min()), 1e-6)
        ax.set_ylim(float(low.min()) - 0.05 * span, float(finite.max()) + 0.1 * span)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (--lr)")
    ax.set_ylabel("training loss")
    ax.set_title(title or "learning-rate range test")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- the command line --------------------------------------------------------------------------

SWEEP_FLAGS = ("start_lr", "end_lr", "num_it", "plot")


def build_parser() -> argparse.ArgumentParser:
    from jaxtl.train import build_parser as train_parser

    p = train_parser()
    p.prog = "python -m jaxtl.lr_find"
    p.description = "\n\n".join(__doc__.split("\n\n")[:3])
    g = p.add_argument_group("learning-rate finder")
    g.add_argument("--start-lr", type=float, default=1e-7, help="first rate of the sweep (default 1e-7)")
    g.add_argument("--end-lr", type=float, default=10.0, help="last rate of the sweep (default 10)")
    g.add_argument("--num-it", type=int, default=100, help=f"steps of the sweep, >= {MIN_IT} (default 100)")
    g.add_argument("--plot", default=DEFAULT_PLOT, help=f"where the PNG plot goes (default {DEFAULT_PLOT})")
    return p


def run(args: argparse.Namespace) -> int:
    from jaxtl.train import PROCESS_FLAGS, config_from_args

    sweep = {k: getattr(args, k) for k in SWEEP_FLAGS}
    check_sweep(sweep["start_lr"], sweep["end_lr"], sweep["num_it"])
    if any(getattr(args, k, None) is not None for k in PROCESS_FLAGS):
        raise ConfigError("lr_find runs in one process; drop --coordinator, --num-processes and --process-id")
    if getattr(args, "resume", False):
        raise ConfigError("lr_find starts from the strategy's starting state; --resume continues a run, drop it")
    if getattr(args, "output", None):
        print(f"lr_find writes no run folder: --output {args.output} is ignored (the plot goes to --plot)")
    train_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in (*SWEEP_FLAGS, "output")})
    cfg = config_from_args(train_args)
    result = lr_find(cfg, sweep["start_lr"], sweep["end_lr"], sweep["num_it"])
    path = plot(result, sweep["plot"], f"lr_find · {cfg.backbone} · {cfg.strategy_name} · {cfg.optim.opt}")
    print(result.summary())
    print(f"plot: {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
