"""LayerNorm over the last axis (``nn.LayerNorm``'s math): the reference and a closed-form backward."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxtl.ops.config import fast_paths_enabled


def layer_norm_reference(x, scale, bias, epsilon: float):
    """PyTorch's layer_norm in float32: two-pass statistics, differentiated by autodiff."""
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def layer_norm(x, scale, bias, epsilon: float):
    """:func:`layer_norm_reference`'s forward, with a hand-written backward (:func:`layer_norm_closed_form`)."""
    if not fast_paths_enabled():
        return layer_norm_reference(x, scale, bias, epsilon)
    return layer_norm_closed_form(x, scale, bias, epsilon)


def _layer_norm_forward(x, scale, bias, epsilon: float):
    # Two-pass variance like PyTorch's layer_norm (E[x^2] - E[x]^2 loses digits
    # on a residual stream whose mean is far from 0); the same operations, in the
    # same order, as flax.linen.LayerNorm(use_fast_variance=False).
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + epsilon)
    return centred * (rstd * scale) + bias, (x, mean, rstd, scale)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm_closed_form(x, scale, bias, epsilon: float):
    """LayerNorm over the last axis of float32 ``x`` with a hand-written backward.

    Why not autodiff: differentiating the two-pass statistics gives a chain of
    reductions that XLA's CPU backend fuses across a ViT's residual stream, so
    an early block's LayerNorm backward recomputes the later blocks' values.
    The closed form (per row, with xhat = (x - mean) * rstd and
    g = dy * scale: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))) is two
    row reductions and one elementwise pass; the step runs and compiles faster.
    """
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_bwd(epsilon, residuals, grad):
    del epsilon  # already inside rstd
    x, mean, rstd, scale = residuals
    xhat = (x - mean) * rstd
    leading = tuple(range(x.ndim - 1))
    g = grad * scale
    dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True) - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
    return dx, jnp.sum(grad * xhat, axis=leading), jnp.sum(grad, axis=leading)


layer_norm_closed_form.defvjp(_layer_norm_forward, _layer_norm_bwd)


