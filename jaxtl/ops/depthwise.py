"""Depthwise 2-D convolution (``nn.Conv2d(C, C, k, groups=C)``'s math on NHWC input): the reference (a
grouped convolution) and shifted multiply-adds with a fast kernel gradient."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jaxtl.ops.config import fast_paths_enabled
from jaxtl.errors import ConfigError
import jaxtl.ops.native as native
from jaxtl.ops.conv import output_size, pad_hw, tap_window

# XLA's CPU backend runs ``feature_group_count=C`` convolutions many times slower
# than PyTorch (both its YNNPACK and Eigen paths). Written as kh*kw shifted
# multiply-adds the same layer is elementwise work that XLA fuses, and plain
# autodiff gives gradients that are fast too. Accelerators have good grouped
# convolution kernels, so they keep the grouped form.

DEPTHWISE_IMPLS = ("grouped", "shift_add")


def depthwise_impl(requested: str | None = None) -> str:
    """Which implementation :func:`depthwise_conv2d` uses.

    An explicit ``requested`` (a model's ``depthwise_impl``) wins; then 'grouped'
    inside :func:`jaxtl.ops.reference_implementations`; then the backend's
    default: 'shift_add' on CPU, 'grouped' elsewhere.
    """
    if requested is None:
        if not fast_paths_enabled():
            return "grouped"
        return "shift_add" if jax.default_backend() == "cpu" else "grouped"
    choice = requested.strip().lower()
    if choice not in DEPTHWISE_IMPLS:
        raise ConfigError(f"unknown depthwise implementation {choice!r}; use one of {', '.join(DEPTHWISE_IMPLS)}")
    return choice


def depthwise_conv2d_reference(x, kernel, stride: int = 1, padding: int = 0, dilation: int = 1):
    """The grouped convolution ``nn.Conv2d(C, C, k, stride, padding, dilation, groups=C)`` computes."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1])


def depthwise_conv2d(x, kernel, stride: int = 1, padding: int = 0, dilation: int = 1, impl: str | None = None):
    """Depthwise 2-D convolution of NHWC ``x`` with a ``(kh, kw, 1, C)`` kernel.

    Symmetric zero padding of ``padding`` on each spatial side, like
    ``nn.Conv2d(C, C, k, stride, padding, dilation, groups=C)``.
    """
    impl = depthwise_impl(impl)
    kh, kw, one, channels = kernel.shape
    if one != 1 or channels != x.shape[-1]:
        raise ValueError(f"depthwise kernel {kernel.shape} does not fit input with {x.shape[-1]} channels")
    if impl == "grouped":
        return depthwise_conv2d_reference(x, kernel, stride, padding, dilation)
    return _depthwise_shift_add(x, kernel, stride, padding, dilation)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_shift_add(x, kernel, stride: int, padding: int, dilation: int):
    return _depthwise_shift_add_forward(x, kernel, stride, padding, dilation)


def _depthwise_shift_add_fwd(x, kernel, stride, padding, dilation):
    # The residual is the padded input, which the forward writes anyway: the
    # kernel gradient reads its windows from it, so the backward need not pad
    # again, and XLA need not keep the unpadded activation as well.
    padded = pad_hw(x, padding)
    out = _depthwise_taps(padded, kernel, x.shape[1:3], stride, padding, dilation)
    return out, (padded, kernel)


# Bytes of input window + output gradient the kernel gradient works on at a time.
# The kh*kw tap reductions each read the whole layer; a slice of the batch that
# fits in cache is read from memory once instead of kh*kw times. The size was
# tuned by measurement (docs/performance.md): larger slices and one-image
# slices were both slower.
KERNEL_GRAD_SLICE_BYTES = 8 << 20


def _depthwise_shift_add_bwd(stride, padding, dilation, residuals, grad):
    """Input gradient as the shift-add's linear transpose (fast: shifted adds again).

    Kernel gradient one tap at a time in a loop: plain autodiff emits the kh*kw
    per-channel reductions sum(window * grad) as one multi-output fusion that
    XLA's CPU backend runs much slower than the same reductions in sequence.
    The taps loop over a few images at a time (:data:`KERNEL_GRAD_SLICE_BYTES`)
    so that the kh*kw passes hit cache.
    """
    padded, kernel = residuals
    in_hw = (padded.shape[1] - 2 * padding, padded.shape[2] - 2 * padding)
    # The forward is linear in x: its transpose needs only shapes, not values.
    (dx,) = jax.linear_transpose(lambda x_: _depthwise_shift_add_forward(x_, kernel, stride, padding, dilation),
                                 jax.ShapeDtypeStruct((padded.shape[0], *in_hw, padded.shape[3]), padded.dtype))(grad)
    return dx, _depthwise_kernel_grad(padded, grad, kernel.shape, stride, dilation).astype(kernel.dtype)


def _depthwise_kernel_grad(padded, grad, kernel_shape, stride: int, dilation: int):
    """``d sum(depthwise_conv(x, k) * grad) / dk`` as a (kh, kw, 1, C) array (float32 or
    wider), from the zero-padded input ``padded``.

    On CPU a hand-written kernel (:mod:`jaxtl.ops.native`, one pass over the layer
    instead of kh*kw) when it could be built; XLA's tap loop otherwise and on
    other platforms (``lax.platform_dependent``, resolved when compiled)."""
    kh, kw, _, c = kernel_shape
    wide = jnp.promote_types(padded.dtype, jnp.float32)
    if wide == jnp.float32 and native.usable():
        def on_cpu(p, g):
            return native.depthwise_kernel_grad(p, g, (kh, kw), stride, dilation).reshape(kh, kw, 1, c)

        return lax.platform_dependent(padded, grad, cpu=on_cpu,
                                      default=partial(_depthwise_kernel_grad_taps, kernel_shape=kernel_shape,
                                                      stride=stride, dilation=dilation))
    return _depthwise_kernel_grad_taps(padded, grad, kernel_shape, stride, dilation)


def _depthwise_kernel_grad_taps(padded, grad, kernel_shape, stride: int, dilation: int):
    """The kernel gradient as XLA operations: the kh*kw tap reductions in a loop."""
    kh, kw, _, c = kernel_shape
    n, padded_h, padded_w, _ = padded.shape
    out_h, out_w = grad.shape[1:3]
    acc_dtype = jnp.promote_types(padded.dtype, jnp.float32)

    def add_taps(x_part, grad_part, dk):
        x_part = x_part.astype(acc_dtype)
        g = grad_part.astype(acc_dtype)

        def tap(t, dk):
            window = tap_window(x_part, (t // kw) * dilation, (t % kw) * dilation, out_h, out_w, stride)
            return dk.at[t].add(jnp.sum(window * g, axis=(0, 1, 2)))

        return lax.fori_loop(0, kh * kw, tap, dk)

    per_image = (padded_h * padded_w + out_h * out_w) * c * jnp.dtype(acc_dtype).itemsize
    size = max(1, min(n, KERNEL_GRAD_SLICE_BYTES // per_image))
    whole = n // size
    dk = jnp.zeros((kh * kw, c), acc_dtype)
    if whole == 1:
        dk = add_taps(padded[:size], grad[:size], dk)
    else:
        dk = lax.fori_loop(0, whole, lambda i, dk: add_taps(lax.dynamic_slice_in_dim(padded, i * size, size),
                                                            lax.dynamic_slice_in_dim(grad, i * size, size), dk), dk)
    if n % size:
        dk = add_taps(padded[whole * size:], grad[whole * size:], dk)
    return dk.reshape(kh, kw, 1, c)


_depthwise_shift_add.defvjp(_depthwise_shift_add_fwd, _depthwise_shift_add_bwd)


def _depthwise_shift_add_forward(x, kernel, stride: int, padding: int, dilation: int):
    return _depthwise_taps(pad_hw(x, padding), kernel, x.shape[1:3], stride, padding, dilation)


def _depthwise_taps(x, kernel, in_hw: tuple[int, int], stride: int, padding: int, dilation: int):
    """The depthwise conv of the already padded ``x`` (unpadded spatial size ``in_hw``)."""
    h, w = in_hw
    kh, kw = kernel.shape[:2]
    out_h = output_size(h, kh, stride, padding, dilation)
    out_w = output_size(w, kw, stride, padding, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(f"depthwise conv: input {h}x{w} is too small for a {kh}x{kw} kernel "
                         f"(padding {padding}, dilation {dilation})")
    # Low-precision inputs accumulate in float32 (a conv accumulates wide too).
    acc_dtype = jnp.promote_types(x.dtype, jnp.float32)
    out = None
    for i in range(kh):
        for j in range(kw):
            # The pixels that tap (i, j) of the kernel sees for every output pixel.
            window = tap_window(x, i * dilation, j * dilation, out_h, out_w, stride)
            term = window.astype(acc_dtype) * kernel[i, j, 0, :].astype(acc_dtype)
            out = term if out is None else out + term
    return out.astype(x.dtype)
