"""The train state: what changes during a run, and nothing else.

A run's variables are split in two (:func:`jaxtl.strategies.split_variables`):

* the **train state** holds the parameters that train, the BatchNorm statistics
  that change (those of trainable groups), the optimizer state over the
  trainable parameters, the step, the RNG and the plateau state. It is donated
  to the train step, checkpointed every epoch and guarded against non-finite
  updates;
* the **frozen variables** (parameters and statistics of frozen groups) are
  constants of the step: passed in, never differentiated, updated, donated or
  copied, and restored from the weights the run started from.

:func:`merge` puts the two back together for the model.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import struct

from jaxtl.rng import make_key, wrap_key_data


@struct.dataclass
class TrainState:
    """Trainable params, changing BatchNorm statistics, optimizer state, step, RNG and the plateau state.

    ``rng`` is the root key's raw data (uint32), so checkpoints store it like
    any array; each step derives its own key by folding in ``step`` (and each
    example's draws fold in its position in the global batch), which makes a
    resumed run draw exactly the same numbers, on any number of devices.
    """

    step: jax.Array          # int32: batches trained on so far
    params: Any              # the trainable parameters only
    batch_stats: Any         # the running statistics of trainable groups only
    opt_state: Any           # over ``params``
    rng: jax.Array           # uint32 key data of the run's root key
    plateau: Any             # optax.contrib reduce_on_plateau state; plateau.scale multiplies the updates
    ema: Any = None          # --model-ema: {"params", "batch_stats"} averaged over steps; None: no EMA

    @property
    def key(self) -> jax.Array:
        return wrap_key_data(self.rng)

    @property
    def lr_scale(self) -> jax.Array:
        return self.plateau.scale

    @property
    def variables(self) -> dict:
        """The trainable part as a variable dict (what :func:`merge` takes)."""
        return {"params": self.params, "batch_stats": self.batch_stats}


def create_train_state(trainable: dict, tx, seed: int, plateau_state: Any, ema: bool = False) -> TrainState:
    """The first state of a run from its trainable variables (``split_variables(...)[0]``); with
    ``ema``, the average starts at them."""
    params = trainable["params"]
    batch_stats = trainable.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.key_data(make_key(seed)),
        plateau=plateau_state,
        ema=jax.tree.map(jnp.array, {"params": params, "batch_stats": batch_stats}) if ema else None,
    )


@struct.dataclass
class EmaConfig:
    """An exponential moving average of the weights, as timm's ``--model-ema``: ``ema = d * ema + (1 - d) *
    weights`` after every step, over the parameters and BatchNorm statistics that train. With ``warmup``,
    ``d = min(decay, (1 + t) / (10 + t))`` at the t-th update (TensorFlow's ``num_updates`` warm-up, which
    timm's ``ModelEmaV2`` era recipes used), so that the average forgets its random start quickly."""

    decay: float = struct.field(pytree_node=False, default=0.9998)
    warmup: bool = struct.field(pytree_node=False, default=True)

    def update(self, ema: Any, new: Any, step: jax.Array) -> Any:
        decay = jnp.asarray(self.decay, jnp.float32)
        if self.warmup:
            t = step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        return jax.tree.map(lambda e, w: (decay * e + (1.0 - decay) * w).astype(e.dtype), ema, new)


def merge(*trees: Mapping) -> dict:
    """Nested dicts merged key by key; a later tree's leaf wins (frozen + trainable -> the model's variables)."""
    out: dict = {}
    for tree in trees:
        for k, v in tree.items():
            if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
                out[k] = merge(out[k], v)
            else:
                out[k] = dict(v) if isinstance(v, Mapping) else v
    return out


def select_like(tree: Mapping, like: Mapping) -> dict:
    """The leaves of ``tree`` at the paths ``like`` has (the model's updated statistics -> those the state keeps)."""
    return {k: select_like(tree[k], v) if isinstance(v, Mapping) else tree[k] for k, v in like.items()}
