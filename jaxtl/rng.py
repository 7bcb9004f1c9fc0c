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


def independent_keys(keys: jax.Array) -> jax.Array:
    """``keys`` as keys whose draws under ``jax.vmap`` each depend on their own key alone.

    XLA's RngBitGenerator has no batched form: JAX vmaps an "rbg" draw by drawing the whole
    batch from its first key, so an example's numbers would depend on the other examples'
    keys and on the batch size. An "rbg" key is two threefry half-keys (equal ones for every key
    derived from a seed, so ``make_key(s)`` becomes ``jax.random.key(s)``); its first half as a
    threefry key draws with a counter-based hash that vmaps element by element. Keys of other
    implementations are returned as they are.
    """
    if str(jax.random.key_impl(keys)) in ("rbg", "unsafe_rbg"):
        return jax.random.wrap_key_data(jax.random.key_data(keys)[..., :2], impl="threefry2x32")
    return keys
