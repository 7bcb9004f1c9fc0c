"""Max pooling (``nn.MaxPool2d``'s math on NHWC input): the reference and a faster form with its own backward."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxtl.ops.config import fast_paths_enabled
from jaxtl.ops.conv import output_size, pad_hw, tap_window


def max_pool2d_reference(x, kernel_size: int, stride: int, padding: int):
    """``nn.MaxPool2d(k, s, p)``: XLA's reduce_window over -inf padding, differentiated by autodiff."""
    return lax.reduce_window(pad_hw(x, padding, -jnp.inf), -jnp.inf, lax.max, (1, kernel_size, kernel_size, 1),
                             (1, stride, stride, 1), "VALID")


def max_pool2d(x, kernel_size: int, stride: int, padding: int):
    """:func:`max_pool2d_reference`'s result by :func:`max_pool_by_taps`."""
    if not fast_paths_enabled():
        return max_pool2d_reference(x, kernel_size, stride, padding)
    return max_pool_by_taps(x, kernel_size, stride, padding)


def max_pool_by_taps(x, kernel_size: int, stride: int, padding: int):
    """``nn.MaxPool2d(k, s, p)`` on NHWC input: pads with -inf.

    Computed as a running maximum over the k*k strided windows rather than
    ``lax.reduce_window``: XLA's CPU backend differentiates reduce_window into
    a select_and_scatter that is very slow. ``where(window > best)`` keeps the
    first maximum in row-major tap order, so on ties the gradient goes to the
    same element as PyTorch's (one element, not split); NaN propagates as in
    PyTorch.

    The backward is written by hand (``custom_vjp``): the forward keeps which
    tap won each output (int8), and the gradient is that tap's share of the
    output gradient put back at its strided positions. Autodiff through the
    running ``where`` recomputes the comparison chain for every tap inside one
    fusion, which is slow behind a ReLU (as in the ResNet stem). Like
    ``layer_norm``, ``jax.jvp`` through it raises.
    """
    return _max_pool(x, kernel_size, stride, padding, x.shape[1:3])


def _max_pool_forward(x, kernel_size: int, stride: int, padding: int):
    """The pooled maximum and, per output, the row-major index of the winning tap."""
    out_h = output_size(x.shape[1], kernel_size, stride, padding)
    out_w = output_size(x.shape[2], kernel_size, stride, padding)
    x = pad_hw(x, padding, -jnp.inf)
    taps = kernel_size * kernel_size
    index_dtype = jnp.int8 if taps <= 127 else jnp.int32
    best = winner = None
    for tap in range(taps):
        window = tap_window(x, tap // kernel_size, tap % kernel_size, out_h, out_w, stride)
        if best is None:
            best, winner = window, jnp.zeros(window.shape, index_dtype)
        else:
            take = (window > best) | jnp.isnan(window)
            best = jnp.where(take, window, best)
            winner = jnp.where(take, jnp.asarray(tap, index_dtype), winner)
    return best, winner


# ``in_hw``, the input's spatial size, is passed for the backward: it cannot be
# recovered from the output's when the stride does not divide it.
@partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, kernel_size: int, stride: int, padding: int, in_hw: tuple[int, int]):
    return _max_pool_forward(x, kernel_size, stride, padding)[0]


def _max_pool_fwd(x, kernel_size, stride, padding, in_hw):
    return _max_pool_forward(x, kernel_size, stride, padding)  # (output, residual: the winning taps)


def _max_pool_bwd(kernel_size, stride, padding, in_hw, winner, grad):
    h, w = in_hw
    out_h, out_w = grad.shape[1:3]
    span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
    zero = jnp.zeros((), grad.dtype)
    total = None
    # Last tap first: an input pixel's shares then add up in the row-major order of
    # the outputs they come from, the order PyTorch accumulates them in (same sums
    # bit for bit where windows overlap).
    for tap in reversed(range(kernel_size * kernel_size)):
        top, left = tap // kernel_size, tap % kernel_size
        share = jnp.where(winner == tap, grad, zero)
        # The transpose of this tap's strided window: interior padding puts each
        # output's share back on the input pixel it came from.
        placed = lax.pad(share, zero, ((0, 0, 0),
                                       (top, h + 2 * padding - top - span_h, stride - 1),
                                       (left, w + 2 * padding - left - span_w, stride - 1),
                                       (0, 0, 0)))
        total = placed if total is None else total + placed
    return (total[:, padding:padding + h, padding:padding + w, :],)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


