"""One pytree holds everything a run needs to continue: the train state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from jaxtl.rng import make_key, wrap_key_data


@struct.dataclass
class TrainState:
    """Params, BatchNorm statistics, optimizer state, step, RNG and the plateau state.

    ``rng`` is the root key's raw data (uint32), so checkpoints store it like
    any array; each step derives its own key by folding in ``step`` (and the
    device index), which makes a resumed run draw exactly the same numbers.
    """

    step: jax.Array          # int32: batches trained on so far
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array           # uint32 key data of the run's root key
    plateau: Any             # optax.contrib reduce_on_plateau state; plateau.scale multiplies the updates

    @property
    def key(self) -> jax.Array:
        return wrap_key_data(self.rng)

    @property
    def lr_scale(self) -> jax.Array:
        return self.plateau.scale


def create_train_state(variables: dict, tx, seed: int, plateau_state: Any) -> TrainState:
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        rng=jax.random.key_data(make_key(seed)),
        plateau=plateau_state,
    )
