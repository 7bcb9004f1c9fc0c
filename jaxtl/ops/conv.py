"""2-D convolution (``nn.Conv2d``'s math on NHWC input): the reference and its fast paths."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxtl.ops.config import fast_paths_enabled


def pad_same_symmetric(kernel_size: int, dilation: int = 1) -> int:
    """PyTorch's usual ``padding=(k - 1) // 2 * dilation``."""
    return (kernel_size - 1) // 2 * dilation


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a conv or pool along one axis (PyTorch's formula, floor mode)."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def pad_hw(x, padding: int, value=0):
    """``padding`` pixels of ``value`` on each side of the spatial axes of NHWC ``x``."""
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=value) if padding else x


def tap_window(x, top, left, out_h: int, out_w: int, stride: int):
    """Padded input pixels ``[top + k*stride, left + l*stride]`` for all output
    (k, l): the pixels that one kernel tap sees.

    Python-int offsets (the forward) give one strided ``lax.slice``, whose
    transpose is a single pad; traced offsets (the kernel-gradient loop) need a
    ``dynamic_slice``, whose transpose would write a full-size zero buffer per
    tap, which makes an input gradient through it slow."""
    n, c = x.shape[0], x.shape[-1]
    span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
    if isinstance(top, int) and isinstance(left, int):
        return lax.slice(x, (0, top, left, 0), (n, top + span_h, left + span_w, c), (1, stride, stride, 1))
    window = lax.dynamic_slice(x, (0, top, left, 0), (n, span_h, span_w, c))
    return window[:, ::stride, ::stride, :] if stride > 1 else window


# XLA's CPU convolutions (Eigen and YNNPACK alike, jaxlib 0.10) collapse on
# feature maps of a few pixels, which ResNets reach in their last stage for
# inputs <= 64 px. On outputs of at most this many pixels a conv is one matrix
# product over its taps instead (conv_by_taps).
TINY_MAP_PIXELS = 4


def materialized(x, kernel):
    """``x``, computed once into its own buffer before a spatial convolution.

    XLA's CPU backend (jaxlib 0.10) computes a convolution's kernel gradient
    from a transposed copy of its input and fuses that transpose with whatever
    produced the input, so ResNet's block outputs (BatchNorm, residual add, ReLU,
    two blocks deep) are recomputed, strided, inside the transpose, many times
    slower than a plain copy.
    ``lax.optimization_barrier`` is removed before fusion on CPU, and a
    ``lax.cond`` whose branches are equal is inlined; a cond that XLA cannot
    decide is a fusion boundary. Its predicate ``k == k or k != k`` is true for
    every float, NaN included, so the zeros branch never runs.

    Opt-in per convolution (``conv(..., materialize_input=True)``), because the
    cond also stops XLA running neighbours concurrently: it pays where the input
    is costly to recompute (ResNet's and VGG's 3x3 convolutions), not where it is
    one BatchNorm + ReLU (DenseNet) or the image batch (a stem).

    CPU only (``lax.platform_dependent``, resolved when the step is compiled):
    GPU and TPU convolutions have no such transposes, and a conditional there
    may wait for its predicate on the host.
    """
    k = kernel.reshape(-1)[0]

    def on_cpu(v):
        return lax.cond((k == k) | (k != k), lambda u: u, jnp.zeros_like, v)

    return lax.platform_dependent(x, cpu=on_cpu, default=lambda v: v)


def conv_by_taps(x, kernel, stride: int, padding: int, dilation: int):
    """``lax.conv_general_dilated`` (NHWC, HWIO, symmetric padding) on a tiny map
    as one matrix product: the kernel's taps side by side along the channels
    (im2col, cheap on <= TINY_MAP_PIXELS pixels) times the kernel as a
    (taps x C_in, C_out) matrix.

    One product rather than one per tap summed: a dot per tap made tracing and
    compiling slower, and the step too.
    """
    n, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    x = pad_hw(x, padding)
    out_h = output_size(h, kh, stride, padding, dilation)
    out_w = output_size(w, kw, stride, padding, dilation)
    windows = [lax.slice(x, (0, i * dilation, j * dilation, 0),
                         (n, i * dilation + (out_h - 1) * stride + 1, j * dilation + (out_w - 1) * stride + 1, cin),
                         (1, stride, stride, 1))
               for i in range(kh) for j in range(kw)]
    # HWIO flattened is tap-major, input channel minor: the order of the windows above.
    y = lax.dot_general(lax.concatenate(windows, 3), kernel.reshape(kh * kw * cin, cout), (((3,), (0,)), ((), ())),
                        preferred_element_type=jnp.promote_types(x.dtype, jnp.float32))
    return y.astype(x.dtype)


def pointwise_conv(x, kernel, stride: int):
    """A 1x1 conv as one (pixels, Cin) @ (Cin, Cout) matmul (stride: subsample first).

    Same result as the conv. XLA's CPU convolution computes the backward of
    1x1 convs much slower than a matmul of the same shapes does."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    n, h, w, cin = x.shape
    acc = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.dot(x.reshape(n * h * w, cin), kernel.reshape(cin, -1), preferred_element_type=acc)
    return y.reshape(n, h, w, -1).astype(x.dtype)


def conv_by_patches(x, kernel):
    """A conv whose kernel equals its stride, without padding (ViT's patch
    embedding): non-overlapping patches, so one matmul of the flattened patches.
    Same result as the conv; one dot instead of k*k taps on small maps (256 taps
    for a 16x16 kernel are slow to compile), and faster than XLA's CPU
    convolution on large maps too."""
    n, h, w, cin = x.shape
    k, _, _, cout = kernel.shape
    patches = x.reshape(n, h // k, k, w // k, k, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // k, w // k, -1)
    return pointwise_conv(patches, kernel.reshape(1, 1, k * k * cin, cout), 1)


def conv2d_reference(x, kernel, stride: int, padding: int, dilation: int = 1, groups: int = 1):
    """``nn.Conv2d(..., padding=padding)`` on NHWC ``x`` with an HWIO ``kernel``: XLA's convolution."""
    p = padding
    return lax.conv_general_dilated(x, kernel, (stride, stride), ((p, p), (p, p)), rhs_dilation=(dilation, dilation),
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def conv2d(x, kernel, stride: int, padding: int, dilation: int = 1, groups: int = 1, *,
           materialize_input: bool = False):
    """:func:`conv2d_reference`'s result, by the fastest form that fits the shapes.

    ``materialize_input`` computes ``x`` into a buffer of its own first (:func:`materialized`).
    """
    k = kernel.shape[0]
    if not fast_paths_enabled():
        return conv2d_reference(x, kernel, stride, padding, dilation, groups)
    out_h = output_size(x.shape[1], k, stride, padding, dilation)
    out_w = output_size(x.shape[2], k, stride, padding, dilation)
    if (groups == 1 and k > 1 and k == stride and padding == 0 and dilation == 1
            and x.shape[1] % k == 0 and x.shape[2] % k == 0):
        return conv_by_patches(x, kernel)
    if groups == 1 and k == 1 and padding == 0:
        return pointwise_conv(x, kernel, stride)
    if groups == 1 and 1 < k <= 3 and out_h * out_w <= TINY_MAP_PIXELS:
        return conv_by_taps(x, kernel, stride, padding, dilation)
    if materialize_input:
        x = materialized(x, kernel)
    return conv2d_reference(x, kernel, stride, padding, dilation, groups)
