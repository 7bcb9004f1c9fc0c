"""Multi-head scaled dot-product attention (PyTorch's ``scaled_dot_product_attention``): the reference and a
fused CPU kernel."""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxtl.ops.config import fast_paths_enabled
import jaxtl.ops.native as native


def multi_head_attention_reference(q, k, v, dropout: Callable | None = None):
    """``softmax(q k^T / sqrt(head_dim)) v`` as batched matmuls; (batch, tokens, heads, head_dim) in and out."""
    return _attention_xla(q, k, v, q.shape[-1] ** -0.5, dropout)


def multi_head_attention(q, k, v, dropout: Callable | None = None):
    """``softmax(q k^T / sqrt(head_dim)) v`` per image and head, PyTorch's
    ``scaled_dot_product_attention``.

    ``q``, ``k``, ``v``: (batch, tokens, heads, head_dim), the projections'
    layout; returns the same layout. ``dropout`` (applied to the attention
    probabilities) is for training with attention dropout; it needs the
    probabilities, so it takes the XLA path.

    On CPU, in float32 with head_dim a multiple of 16, as many queries as keys
    and no dropout, a fused kernel (:mod:`jaxtl.ops.native`) computes the
    forward and the backward per (image, head) without materialising the
    heads-first transposes that XLA's batched matmuls need. Elsewhere: XLA's
    batched matmuls and softmax (float32 softmax for any input dtype).
    """
    scale = q.shape[-1] ** -0.5
    if (fast_paths_enabled() and dropout is None and q.dtype == k.dtype == v.dtype == jnp.float32
            and q.shape[1] == k.shape[1] and q.shape[-1] % native.ATTENTION_LANES == 0 and native.usable()):
        return _fused_attention(q, k, v, scale)
    return _attention_xla(q, k, v, scale, dropout)


def _attention_logits(q, k, scale: float):
    # Heads-first: plain batched matmuls, whose backward XLA's CPU backend runs
    # faster than the equivalent "bqhd,bkhd" einsums. (batch, heads, T, T), float32.
    qh, kh = q.swapaxes(1, 2), k.swapaxes(1, 2)
    return ((qh * jnp.asarray(scale, q.dtype)) @ kh.swapaxes(-1, -2)).astype(jnp.float32)


def _attention_xla(q, k, v, scale: float, dropout: Callable | None = None):
    attn = jax.nn.softmax(_attention_logits(q, k, scale), axis=-1).astype(q.dtype)
    if dropout is not None:
        attn = dropout(attn)
    return (attn @ v.swapaxes(1, 2)).swapaxes(1, 2)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _fused_attention(q, k, v, scale: float):
    return _fused_attention_fwd(q, k, v, scale)[0]


def _fused_attention_fwd(q, k, v, scale):
    # lax.platform_dependent: the native kernel where this compiles for the CPU,
    # XLA's formula (with the same residuals) if it is compiled for another device.
    y, lse = lax.platform_dependent(q, k, v, cpu=partial(native.attention_forward, scale=scale),
                                    default=partial(_attention_and_lse, scale=scale))
    return y, (q, k, v, y, lse)


def _fused_attention_bwd(scale, residuals, dy):
    q, k, v, y, lse = residuals

    def on_cpu(q, k, v, y, lse, dy):
        return native.attention_backward(q, k, v, y, lse, dy, scale)

    def elsewhere(q, k, v, y, lse, dy):
        return jax.vjp(partial(_attention_xla, scale=scale), q, k, v)[1](dy)

    return tuple(lax.platform_dependent(q, k, v, y, lse, dy, cpu=on_cpu, default=elsewhere))


def _attention_and_lse(q, k, v, scale):
    """XLA's forward with the native kernel's residual: the scores once, softmax = exp(logits - lse)."""
    logits = _attention_logits(q, k, scale)
    lse = jax.nn.logsumexp(logits, axis=-1)
    attn = jnp.exp(logits - lse[..., None]).astype(q.dtype)
    return (attn @ v.swapaxes(1, 2)).swapaxes(1, 2), lse


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


