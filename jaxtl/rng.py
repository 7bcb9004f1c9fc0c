"""Random keys jaxtl creates.

jaxtl's keys use XLA's RngBitGenerator ("rbg"): on CPU, programs that draw
random numbers (dropout, augmentation, initialisers) compile much faster than
with JAX's default threefry, whose hash XLA compiles as a long chain of integer
operations. Streams are deterministic for a seed on a given backend. Only keys
jaxtl makes are affected; JAX's global default is untouched.
"""

from __future__ import annotations

import jax

PRNG_IMPL = "rbg"


def make_key(seed: int) -> jax.Array:
    return jax.random.key(seed, impl=PRNG_IMPL)


def wrap_key_data(data: jax.Array) -> jax.Array:
    return jax.random.wrap_key_data(data, impl=PRNG_IMPL)
