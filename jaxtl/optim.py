"""Optimizers and schedules built from a strategy's label tree.

The optimizer is::

    chain(clip_by_global_norm?,                       # over trainable gradients only
          partition({label: per_label(label)}, labels),
          scale_by_learning_rate(schedule))            # one global step count
    wrapped in MultiSteps when gradients are accumulated

``labels`` labels the trainable parameters (``strategies.trainable_labels``):
frozen parameters are not in the train state, so the optimizer never sees
them. ``per_label`` is the optimizer's direction (momentum trace, Adam moments),
weight decay where the label allows it, and ``scale(multiplier)`` of the
label's group; the ``"frozen"`` label, which only a whole-model tree carries
(checkpoints of older runs), is ``set_to_zero()`` (no update, no state).
Because the schedule sits outside the partition and counts global steps, a
group unfrozen in the middle of training joins the schedule where it is,
instead of starting its own warm-up from step 0.

Reduce-on-plateau is not a per-step schedule: ``optax.contrib.reduce_on_plateau``
is fed the validation loss once per epoch (:func:`plateau_update`) and the
train step multiplies the updates by its ``scale``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from jaxtl.errors import ConfigError
from jaxtl.strategies import FROZEN, all_labels, label_group

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "step", "multistep", "cosine", "sgdr", "plateau", "onecycle")
# fastai's fit_one_cycle: start at lr / 25, peak after 25 % of the steps, end at lr / 1e5.
ONECYCLE_DIV, ONECYCLE_PCT_START, ONECYCLE_DIV_FINAL = 25.0, 0.25, 1e5


@dataclass(frozen=True)
class OptimConfig:
    opt: str = "adam"                   # jaxtl.train's default: Adam 1e-3, cosine (the head of a new task)
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    sched: str = "cosine"
    warmup_epochs: float = 0.0
    warmup_lr_ratio: float = 0.0        # warm-up starts at lr x this
    min_lr_ratio: float = 0.0           # cosine/sgdr end at lr x this
    step_epochs: int = 30               # "step": multiply by gamma every step_epochs
    milestones: tuple[int, ...] = ()    # "multistep": epochs at which to multiply by gamma
    gamma: float = 0.1
    sgdr_period: int = 10               # "sgdr": first period in epochs
    sgdr_mult: int = 1                  # each period is sgdr_mult x longer
    plateau_factor: float = 0.1
    plateau_patience: int = 2           # epochs without improvement
    plateau_cooldown: int = 0
    plateau_min_scale: float = 1e-3
    clip_grad_norm: float | None = None
    accum_steps: int = 1

    def __post_init__(self):
        if self.opt not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.opt!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.sched not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.sched!r}; choose one of {', '.join(SCHEDULES)}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight decay must be >= 0, got {self.weight_decay}")
        if self.accum_steps < 1:
            raise ConfigError(f"gradient accumulation steps must be >= 1, got {self.accum_steps}")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise ConfigError(f"gradient clipping norm must be > 0, got {self.clip_grad_norm}")
        if self.warmup_epochs < 0:
            raise ConfigError(f"warm-up epochs must be >= 0, got {self.warmup_epochs}")
        if self.sched == "plateau" and not 0 < self.plateau_factor < 1:
            raise ConfigError(f"plateau factor must be in (0, 1), got {self.plateau_factor}")


def make_schedule(cfg: OptimConfig, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """Learning rate as a function of the (optimizer) step."""
    spe = max(int(steps_per_epoch), 1)
    total = max(spe * num_epochs, 1)
    warmup = int(round(cfg.warmup_epochs * spe))
    lr, end = cfg.lr, cfg.lr * cfg.min_lr_ratio
    if cfg.sched in ("constant", "plateau"):
        main = optax.constant_schedule(lr)
    elif cfg.sched in ("step", "multistep"):
        if cfg.sched == "step":
            milestones = range(max(cfg.step_epochs, 1), max(num_epochs, 1), max(cfg.step_epochs, 1))
        elif cfg.milestones:
            milestones = cfg.milestones
        else:
            raise ConfigError("the multistep schedule needs milestones (epochs at which to decay)")
        # Boundaries count steps of the main schedule, which starts after the warm-up.
        main = optax.piecewise_constant_schedule(lr, {max(int(m * spe) - warmup, 1): cfg.gamma for m in milestones})
    elif cfg.sched == "cosine":
        main = optax.cosine_decay_schedule(lr, max(total - warmup, 1), alpha=cfg.min_lr_ratio)
    elif cfg.sched == "onecycle":  # cosine up, cosine down (Smith 2018; fastai's defaults); momentum not cycled
        main = optax.cosine_onecycle_schedule(max(total - warmup, 1), lr, pct_start=ONECYCLE_PCT_START,
                                              div_factor=ONECYCLE_DIV,
                                              final_div_factor=ONECYCLE_DIV_FINAL / ONECYCLE_DIV)
    elif cfg.sched == "sgdr":
        periods, length, covered = [], max(cfg.sgdr_period, 1) * spe, 0
        while covered < total - warmup:
            periods.append(dict(init_value=lr, peak_value=lr, decay_steps=length, warmup_steps=0, end_value=end))
            covered += length
            length *= max(cfg.sgdr_mult, 1)
        main = optax.sgdr_schedule(periods)
    else:  # pragma: no cover - validated in OptimConfig
        raise ConfigError(cfg.sched)
    if warmup <= 0:
        return main
    ramp = optax.linear_schedule(lr * cfg.warmup_lr_ratio, lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def _direction(cfg: OptimConfig, decay: bool, mult: float) -> optax.GradientTransformation:
    """The per-label part: weight decay, the optimizer's direction, the group multiplier."""
    wd = cfg.weight_decay if decay else 0.0
    parts = []
    if cfg.opt == "sgd":
        if wd:
            parts.append(optax.add_decayed_weights(wd))          # L2 into the gradient, as torch.optim.SGD
        if cfg.momentum:
            parts.append(optax.trace(decay=cfg.momentum, nesterov=cfg.nesterov))
    elif cfg.opt == "adam":
        if wd:
            parts.append(optax.add_decayed_weights(wd))          # torch.optim.Adam's coupled L2
        parts.append(optax.scale_by_adam(b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps))
    else:  # adamw: decoupled decay, after the Adam direction
        parts.append(optax.scale_by_adam(b1=cfg.betas[0], b2=cfg.betas[1], eps=cfg.eps))
        if wd:
            parts.append(optax.add_decayed_weights(wd))
    if mult != 1.0:
        parts.append(optax.scale(mult))
    return optax.chain(*parts) if parts else optax.identity()


def make_optimizer(cfg: OptimConfig, labels: Any, lr_mults: Mapping[str, float], spec_labels: tuple[str, ...],
                   steps_per_epoch: int, num_epochs: int) -> optax.GradientTransformation:
    """The whole optimizer for one label tree (one strategy stage).

    ``spec_labels`` is every label the backbone can have (``strategies.all_labels``):
    the partition always holds all of them, so the optimizer object's structure
    is the same in every stage and only the label tree changes.
    """
    transforms = {}
    for label in spec_labels:
        if label == FROZEN:
            transforms[label] = optax.set_to_zero()
        else:
            group = label_group(label)
            transforms[label] = _direction(cfg, decay=(label == group), mult=float(lr_mults.get(group, 1.0)))
    parts = []
    if cfg.clip_grad_norm:
        parts.append(optax.clip_by_global_norm(cfg.clip_grad_norm))
    parts.append(optax.partition(transforms, labels))
    # Optimizer steps: with accumulation, one step per accum_steps batches.
    schedule = make_schedule(cfg, max(steps_per_epoch // cfg.accum_steps, 1), num_epochs)
    parts.append(optax.scale_by_learning_rate(schedule))
    tx = optax.chain(*parts)
    if cfg.accum_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.accum_steps)
    return tx


def schedule_of(cfg: OptimConfig, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    return make_schedule(cfg, max(steps_per_epoch // cfg.accum_steps, 1), num_epochs)


# ---------------------------------------------------------------------------
# Carrying optimizer state across strategy stages


def _label_sets(labels: Any) -> dict[str, frozenset]:
    out: dict[str, set] = {}
    for path, label in traverse_util.flatten_dict(labels).items():
        out.setdefault(label, set()).add(path)
    return {k: frozenset(v) for k, v in out.items()}


def carry_over(old_state: Any, new_state: Any, old_labels: Any, new_labels: Any) -> Any:
    """Optimizer state for a new stage: what stays valid is kept, the rest is fresh.

    ``new_state`` is ``tx_new.init(trainable params)``; the new stage trains more
    parameters, so its trees are larger. In every partition, a label whose set of
    parameters is unchanged keeps its old state (momentum, Adam moments, counts:
    the same arrays, placed in the new tree); a label that gained parameters (a
    group just unfrozen) starts from the fresh state. Everything outside the
    partition (the global step count of the schedule, MultiSteps' counters and
    accumulated gradients of parameters already training) is carried over.
    """
    old_sets, new_sets = _label_sets(old_labels), _label_sets(new_labels)

    def same_arrays(old, new) -> bool:
        a, b = jax.tree.leaves(old), jax.tree.leaves(new)
        return len(a) == len(b) and all(jnp.shape(x) == jnp.shape(y) for x, y in zip(a, b))

    def merge(old, new):
        if isinstance(new, optax.PartitionState):
            inner = {}
            for label, fresh in new.inner_states.items():
                kept = old.inner_states.get(label)
                same = old_sets.get(label, frozenset()) == new_sets.get(label, frozenset())
                if same and kept is not None and same_arrays(kept, fresh):  # same arrays, in the larger tree
                    inner[label] = jax.tree.unflatten(jax.tree.structure(fresh), jax.tree.leaves(kept))
                else:
                    inner[label] = fresh
            return optax.PartitionState(inner)
        if isinstance(new, tuple) and hasattr(new, "_fields"):
            return type(new)(*(merge(o, n) for o, n in zip(old, new)))
        if isinstance(new, (tuple, list)):
            return type(new)(merge(o, n) for o, n in zip(old, new))
        if isinstance(new, dict):  # a tree over the parameters: new keys are new parameters
            return {k: merge(old[k], v) if isinstance(old, dict) and k in old else v for k, v in new.items()}
        if jax.tree.structure(old) == jax.tree.structure(new) and same_arrays(old, new):
            return old
        return new

    return merge(old_state, new_state)


# ---------------------------------------------------------------------------
# Reduce on plateau, fed once per epoch


def make_plateau(cfg: OptimConfig):
    return optax.contrib.reduce_on_plateau(factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                                           cooldown=cfg.plateau_cooldown, min_scale=cfg.plateau_min_scale)


def plateau_init(cfg: OptimConfig) -> Any:
    return make_plateau(cfg).init({})


def plateau_update(cfg: OptimConfig, state: Any, val_loss: float) -> Any:
    """Feed one epoch's validation loss; returns the new state (``state.scale``)."""
    _, new_state = make_plateau(cfg).update({}, state, value=jnp.asarray(val_loss, jnp.float32))
    return new_state


def count_state_bytes(opt_state: Any) -> tuple[int, int]:
    """(number of array leaves, total bytes) of an optimizer state."""
    leaves = [x for x in jax.tree.leaves(opt_state) if hasattr(x, "shape")]
    return len(leaves), int(sum(x.size * x.dtype.itemsize for x in leaves))


__all__ = ["OptimConfig", "make_optimizer", "make_schedule", "carry_over", "plateau_init", "plateau_update",
           "count_state_bytes", "all_labels"]
