"""Building blocks shared by the model families.

Everything here reproduces PyTorch's math exactly, because converted weights
must give torchvision's/timm's logits to float32 rounding:

* :class:`BatchNorm` updates ``running_var`` with the *unbiased* batch variance
  as PyTorch does (Flax's own BatchNorm uses the biased one), normalises with
  the biased one, and can synchronise statistics across devices (``axis_name``).
* :func:`conv` pads explicitly and symmetrically like ``nn.Conv2d(padding=p)``;
  ``'SAME'`` pads asymmetrically on strided layers and would diverge.
"""

from __future__ import annotations

from functools import partial
import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import errors as flax_errors
from jax import lax

from jaxtl import native
from jaxtl.errors import ConfigError

Dtype = Any

# torchvision/timm conv init: kaiming normal, fan_out (used for fresh layers only;
# converted weights replace them).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def param(module: nn.Module, name: str, init: Callable, shape: tuple, dtype: Any = jnp.float32):
    """``module.param(name, init, shape, dtype)``, checking an existing parameter's
    shape against ``shape`` directly.

    Why: in ``apply`` Flax's ``Scope.param`` checks each existing parameter's shape
    by tracing its initialiser under ``jax.eval_shape``, on every call, and a run
    traces the model 3-5 times (init, train step, eval step, feature width). The
    shape is known here, so comparing it costs nothing; a mismatch raises Flax's
    own error. A new parameter goes through Flax's path unchanged. Measured (2-core
    Xeon, CPU seconds per trace at 32 px, batch 16, median of 6 alternated):
    forward + backward MobileNetV2 1.06 -> 0.91, ViT-Tiny 0.81 -> 0.53, ResNet-50
    1.01 -> 0.97; eval forward 0.28 -> 0.19, 0.31 -> 0.19, 0.28 -> 0.15.
    """
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if tuple(jnp.shape(value)) != tuple(shape):
            raise flax_errors.ScopeParamShapeError(name, module.scope.path_text, tuple(jnp.shape(value)), tuple(shape))
        return value
    return module.param(name, init, shape, dtype)


class BatchNorm(nn.Module):
    """BatchNorm over the last axis with PyTorch's semantics.

    ``momentum`` follows Flax's convention (running = momentum * running +
    (1 - momentum) * batch), so PyTorch's momentum 0.1 is 0.9 here.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype | None = None
    axis_name: str | None = None
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        features = x.shape[-1]
        scale = param(self, "scale", self.scale_init, (features,), jnp.float32)
        bias = param(self, "bias", self.bias_init, (features,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
        dtype = self.dtype or x.dtype

        if use_running_average:
            mean, var = ra_mean.value, ra_var.value
        else:
            xf = x.astype(jnp.float32)
            axes = tuple(range(x.ndim - 1))
            count = 1
            for a in axes:
                count *= x.shape[a]
            # Two passes (mean, then mean squared deviation) as PyTorch does;
            # E[x^2] - E[x]^2 loses digits when |mean| >> std.
            mean = jnp.mean(xf, axes)
            if self.axis_name is not None:
                mean = lax.pmean(mean, self.axis_name)
            # d var / d mean = -2 * mean(x - mean) is zero, but autodiff would
            # compute it: one more reduction over the whole activation per
            # layer. Stopping the gradient there drops exactly that zero term
            # (MobileNetV2 fine-tune step time 0.94x, same-process A/B).
            var = jnp.mean(jnp.square(xf - lax.stop_gradient(mean)), axes)
            if self.axis_name is not None:
                var = lax.pmean(var, self.axis_name)
                count = count * lax.psum(1, self.axis_name)
            if not self.is_initializing():
                m = self.momentum
                unbiased = var * (count / jnp.maximum(count - 1, 1))
                ra_mean.value = m * ra_mean.value + (1.0 - m) * lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1.0 - m) * lax.stop_gradient(unbiased)

        # Fold into one multiply-add: XLA fuses it into the producing conv.
        mul = scale * lax.rsqrt(var + self.epsilon)
        add = bias - mean * mul
        return (x * mul.astype(dtype) + add.astype(dtype)).astype(dtype)


def pad_same_symmetric(kernel_size: int, dilation: int = 1) -> int:
    """PyTorch's usual ``padding=(k - 1) // 2 * dilation``."""
    return (kernel_size - 1) // 2 * dilation


def output_size(size: int, kernel_size: int, stride: int, padding: int, dilation: int = 1) -> int:
    """Output length of a conv or pool along one axis (PyTorch's formula, floor mode)."""
    return (size + 2 * padding - dilation * (kernel_size - 1) - 1) // stride + 1


def _pad_hw(x, padding: int, value=0):
    """``padding`` pixels of ``value`` on each side of the spatial axes of NHWC ``x``."""
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=value) if padding else x


# XLA's CPU convolutions (Eigen and YNNPACK alike, jaxlib 0.10) collapse on
# tiny feature maps: a 3x3 conv over a 2x2 map with 512 channels ran at
# 0.7 GFLOP/s (900 ms for a batch of 32, against 16 ms on a 3x3 map), over a
# 1x1 map at 6.6 GFLOP/s. ResNets reach such maps in their last stage for
# inputs <= 64 px. There a conv is computed as a sum over kernel taps of
# (pixels x C_in) @ (C_in x C_out) matrix products instead.
TINY_MAP_PIXELS = 4


def _materialized(x, kernel):
    """``x``, computed once into its own buffer before a spatial convolution.

    XLA's CPU backend (jaxlib 0.10) computes a convolution's kernel gradient
    from a transposed copy of its input and fuses that transpose with whatever
    produced the input: ResNet's block outputs (BatchNorm, residual add, ReLU,
    two blocks deep) were recomputed, strided, inside the transposes (21 ms for
    one 8 MB copy in ResNet-18's step at 128 px; a plain transpose takes ~1 ms).
    ``lax.optimization_barrier`` is removed before fusion on CPU, and a
    ``lax.cond`` whose branches are equal is inlined; a cond that XLA cannot
    decide is a fusion boundary. Its predicate ``k == k or k != k`` is true for
    every float, NaN included, so the zeros branch never runs.

    Opt-in per convolution (``conv(..., materialize_input=True)``), because the
    cond also stops XLA running neighbours concurrently. Same-process A/B, 2-core
    EPYC, fine-tune step time with / without: ResNet-18 0.93-0.95 (128 and 224
    px), ResNet-50 0.97 (Bottleneck's 3x3 only), VGG-11-BN 0.98, but DenseNet-121
    1.03 (its 3x3 input is one BatchNorm + ReLU, cheap to recompute) and
    MobileNetV2's stem, on the image batch, 1.02; inference unchanged.

    CPU only (``lax.platform_dependent``, resolved when the step is compiled):
    GPU and TPU convolutions have no such transposes, and a conditional there
    may wait for its predicate on the host.
    """
    k = kernel.reshape(-1)[0]

    def on_cpu(v):
        return lax.cond((k == k) | (k != k), lambda u: u, jnp.zeros_like, v)

    return lax.platform_dependent(x, cpu=on_cpu, default=lambda v: v)


def _conv_by_taps(x, kernel, stride: int, padding: int, dilation: int):
    """``lax.conv_general_dilated`` (NHWC, HWIO, symmetric padding) on a tiny map
    as one matrix product: the kernel's taps side by side along the channels
    (im2col, cheap on <= TINY_MAP_PIXELS pixels) times the kernel as a
    (taps x C_in, C_out) matrix.

    One product rather than one per tap summed: ResNet-18's fine-tune step at 32 px
    (batch 32) 100-109 -> 93-103 ms and its lowering + compile 8.4-8.5 -> 6.8-7.4 s
    (same-process A/B, 2-core Xeon; jnp.einsum per tap was most of the tracing).
    """
    n, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    x = _pad_hw(x, padding)
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


def _pointwise_conv(x, kernel, stride: int):
    """A 1x1 conv as one (pixels, Cin) @ (Cin, Cout) matmul (stride: subsample first).

    Same result as the conv. XLA's CPU convolution computes the backward of
    1x1 convs up to 2x slower than a matmul does (MobileNetV2's 144 -> 24
    projection at 32x32, batch 32: forward + backward 11.7 ms as a conv, 5.5 ms
    as a matmul, PyTorch 5.3 ms)."""
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    n, h, w, cin = x.shape
    acc = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.dot(x.reshape(n * h * w, cin), kernel.reshape(cin, -1), preferred_element_type=acc)
    return y.reshape(n, h, w, -1).astype(x.dtype)


def _conv_by_patches(x, kernel):
    """A conv whose kernel equals its stride, without padding (ViT's patch
    embedding): non-overlapping patches, so one matmul of the flattened patches.
    Same result as the conv; one dot instead of k*k taps on small maps (a 16x16
    kernel on a 2x2 output took 7 s to compile as taps) and faster than XLA's
    CPU convolution at 224 px."""
    n, h, w, cin = x.shape
    k, _, _, cout = kernel.shape
    patches = x.reshape(n, h // k, k, w // k, k, cin).transpose(0, 1, 3, 2, 4, 5).reshape(n, h // k, w // k, -1)
    return _pointwise_conv(patches, kernel.reshape(1, 1, k * k * cin, cout), 1)


class Conv2d(nn.Module):
    """``nn.Conv2d`` on NHWC input: explicit symmetric padding, ``kernel`` in HWIO
    (and optional ``bias``), the same parameters as ``flax.linen.Conv``."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_init
    bias_init: Callable = nn.initializers.zeros
    # Compute the input into a buffer of its own first (``_materialized``).
    materialize_input: bool = False

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        if cin % self.groups:
            raise ValueError(f"{cin} input channels are not divisible by groups={self.groups}")
        kernel = param(self, "kernel", self.kernel_init, (k, k, cin // self.groups, self.features), jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        out_h = output_size(x.shape[1], k, self.stride, self.padding, self.dilation)
        out_w = output_size(x.shape[2], k, self.stride, self.padding, self.dilation)
        patchify = (self.groups == 1 and k > 1 and k == self.stride and self.padding == 0 and self.dilation == 1
                    and x.shape[1] % k == 0 and x.shape[2] % k == 0)
        if patchify:
            y = _conv_by_patches(x, kernel)
        elif self.groups == 1 and k == 1 and self.padding == 0:
            y = _pointwise_conv(x, kernel, self.stride)
        elif self.groups == 1 and 1 < k <= 3 and out_h * out_w <= TINY_MAP_PIXELS:
            y = _conv_by_taps(x, kernel, self.stride, self.padding, self.dilation)
        else:
            p = self.padding
            if self.materialize_input:
                x = _materialized(x, kernel)
            y = lax.conv_general_dilated(x, kernel, (self.stride, self.stride), ((p, p), (p, p)),
                                         rhs_dilation=(self.dilation, self.dilation),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         feature_group_count=self.groups)
        if self.use_bias:
            y = y + param(self, "bias", self.bias_init, (self.features,), jnp.float32).astype(self.dtype)
        return y


def conv(features: int, kernel_size: int, stride: int = 1, padding: int | None = None, *,
         groups: int = 1, use_bias: bool = False, dilation: int = 1, dtype: Dtype = jnp.float32,
         name: str | None = None, kernel_init: Callable = conv_init, materialize_input: bool = False) -> Conv2d:
    """``nn.Conv2d(..., padding=p)`` in Flax: NHWC, explicit symmetric padding."""
    if padding is None:
        padding = pad_same_symmetric(kernel_size, dilation)
    return Conv2d(features, kernel_size, stride, padding, dilation, groups, use_bias, dtype, kernel_init,
                  materialize_input=materialize_input, name=name)


class Linear(nn.Module):
    """``nn.Linear`` over the last axis: the same parameters (``kernel`` (in, out),
    ``bias``), initialisers and result as ``flax.linen.Dense``.

    Why not ``nn.Dense``: on input with more than one leading axis (ViT tokens,
    (batch, tokens, width)) XLA's CPU backend compiles the backward dots of a
    3-D dot_general slowly; flattening the leading axes first makes every dot a
    plain 2-D matmul. Measured on 2 cores, ViT-Tiny MLP at 128 px, batch 32:
    forward + backward 41 ms as a 3-D dot, 23 ms flattened (PyTorch 19-21 ms).
    """

    features: int
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    kernel_init: Callable = dense_init
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        kernel = param(self, "kernel", self.kernel_init, (x.shape[-1], self.features), jnp.float32)
        bias = param(self, "bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
        lead = x.shape[:-1]
        y = jnp.dot(x.reshape(-1, x.shape[-1]).astype(self.dtype), kernel.astype(self.dtype))
        if bias is not None:
            y = y + bias.astype(self.dtype)
        return y.reshape(*lead, self.features)


def dense(features: int, *, dtype: Dtype = jnp.float32, name: str | None = None, use_bias: bool = True,
          kernel_init: Callable = dense_init) -> Linear:
    return Linear(features, use_bias=use_bias, dtype=dtype, kernel_init=kernel_init, name=name)


def _layer_norm_forward(x, scale, bias, epsilon: float):
    # Two-pass variance like PyTorch's layer_norm (E[x^2] - E[x]^2 loses digits
    # on a residual stream whose mean is far from 0); the same operations, in the
    # same order, as flax.linen.LayerNorm(use_fast_variance=False).
    mean = jnp.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + epsilon)
    return centred * (rstd * scale) + bias, (x, mean, rstd, scale)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon: float):
    """LayerNorm over the last axis of float32 ``x`` with a hand-written backward.

    Why not autodiff: differentiating the two-pass statistics gives a chain of
    reductions that XLA's CPU backend fuses across a ViT's residual stream
    (block 0's LayerNorm-backward fusions took 171 parameters, re-computing the
    later blocks'). The closed form (per row, with xhat = (x - mean) * rstd and
    g = dy * scale: dx = rstd * (g - mean(g) - xhat * mean(g * xhat))) is two
    row reductions and one elementwise pass. Measured on 2 cores, ViT-Tiny
    fine-tune step at 128 px, batch 32, same-process paired runs: 0.87-0.89x
    the time of autodiff's, compile time 9 -> 5 s (at 224 px: the same time).
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


layer_norm.defvjp(_layer_norm_forward, _layer_norm_bwd)


class LayerNorm(nn.Module):
    """``nn.LayerNorm(width, eps)`` over the last axis: the parameters (``scale``,
    ``bias``), initialisers and float32 statistics of
    ``flax.linen.LayerNorm(use_fast_variance=False)``, computed by
    :func:`layer_norm` (a hand-written backward). The output is cast to
    ``dtype``.

    Differentiable in reverse mode (``jax.grad``/``jax.vjp``) only, like every
    ``jax.custom_vjp`` function: ``jax.jvp`` through it raises.
    """

    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        width = x.shape[-1]
        scale = param(self, "scale", nn.initializers.ones, (width,), jnp.float32)
        bias = param(self, "bias", nn.initializers.zeros, (width,), jnp.float32)
        return layer_norm(x.astype(jnp.float32), scale, bias, float(self.epsilon)).astype(self.dtype)


def max_pool(x, kernel_size: int, stride: int, padding: int):
    """``nn.MaxPool2d(k, s, p)`` on NHWC input: pads with -inf.

    Computed as a running maximum over the k*k strided windows rather than
    ``lax.reduce_window``: XLA's CPU backend differentiates reduce_window into
    a select_and_scatter that is very slow (ResNet's 3x3/2 pool on a
    32x64x64x64 batch: forward + backward 188 ms, as windows 43-47 ms, PyTorch
    channels_last 26 ms). ``where(window > best)`` keeps the first maximum in
    row-major tap order, so on ties the gradient goes to the same element as
    PyTorch's (one element, not split); NaN propagates as in PyTorch.

    The backward is written by hand (``custom_vjp``): the forward keeps which
    tap won each output (int8), and the gradient is that tap's share of the
    output gradient put back at its strided positions. Autodiff through the
    running ``where`` recomputed the comparison chain for every tap inside one
    fusion: behind a ReLU, as in the ResNet stem, forward + backward took
    128 ms on the batch above, 19 ms this way (2-core EPYC; in ResNet-18's
    fine-tune step 41 -> 13 ms, the step 0.97-0.98x). Like ``layer_norm``,
    ``jax.jvp`` through it raises.
    """
    return _max_pool(x, kernel_size, stride, padding, x.shape[1:3])


def _max_pool_forward(x, kernel_size: int, stride: int, padding: int):
    """The pooled maximum and, per output, the row-major index of the winning tap."""
    out_h = output_size(x.shape[1], kernel_size, stride, padding)
    out_w = output_size(x.shape[2], kernel_size, stride, padding)
    x = _pad_hw(x, padding, -jnp.inf)
    taps = kernel_size * kernel_size
    index_dtype = jnp.int8 if taps <= 127 else jnp.int32
    best = winner = None
    for tap in range(taps):
        window = _tap_window(x, tap // kernel_size, tap % kernel_size, out_h, out_w, stride)
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


def global_avg_pool(x):
    """``AdaptiveAvgPool2d(1)`` + flatten, accumulated in float32."""
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def check_rates(module: nn.Module, family: str, attrs: Sequence[str] = ("drop_rate", "drop_path_rate")) -> None:
    """Dropout and stochastic-depth rates are probabilities (a typo such as 20 for
    0.2 would otherwise drop everything silently)."""
    for attr in attrs:
        value = getattr(module, attr)
        if isinstance(value, (bool, str)) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
            raise ConfigError(f"{family} {attr} must be in [0, 1], got {value!r}")


def running_stats_for(train: bool, group: str, frozen: Sequence[str]) -> bool:
    """BatchNorm uses running statistics in eval mode and in frozen groups.

    This is the Keras semantics: a frozen layer is in inference mode, so its
    statistics neither normalise with the batch nor drift.
    """
    return (not train) or (group in frozen)


def relu6(x):
    return jnp.minimum(jax.nn.relu(x), 6.0).astype(x.dtype)


def hard_sigmoid(x):
    """PyTorch ``nn.Hardsigmoid``: relu6(x + 3) / 6."""
    return (jnp.clip(x + 3.0, 0.0, 6.0) / 6.0).astype(x.dtype)


def hard_swish(x):
    """PyTorch ``nn.Hardswish``: x * relu6(x + 3) / 6."""
    return (x * hard_sigmoid(x)).astype(x.dtype)


def gelu_exact(x):
    """``nn.GELU()``: ``x / 2 * (1 + erf(x / sqrt(2)))``, PyTorch's own formula.

    flax's ``nn.gelu`` defaults to the tanh approximation (off by > 1e-2 on
    ViT-B). ``jax.nn.gelu(approximate=False)`` is exact too but goes through
    ``erfc``, which XLA's CPU backend computes 3x slower than ``erf``
    (2.9 vs 1.0 ms forward on a 2080 x 768 activation, 2 cores).
    """
    return x * 0.5 * (1.0 + lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


# ---------------------------------------------------------------------------
# Multi-head attention.


def multi_head_attention(q, k, v, dropout: Callable | None = None):
    """``softmax(q k^T / sqrt(head_dim)) v`` per image and head, PyTorch's
    ``scaled_dot_product_attention``.

    ``q``, ``k``, ``v``: (batch, tokens, heads, head_dim), the projections'
    layout; returns the same layout. ``dropout`` (applied to the attention
    probabilities) is for training with attention dropout; it needs the
    probabilities, so it takes the XLA path.

    On CPU, in float32 with head_dim a multiple of 16 and no dropout, a fused
    kernel (:mod:`jaxtl.native`) computes the forward and the backward per
    (image, head) without materialising the heads-first transposes: ViT-Tiny's
    attention forward + backward at 224 px, batch 32, took 22-28 ms per block
    against XLA's 30-36 on 2 cores (PyTorch's fused kernel 22-24). Elsewhere:
    XLA's batched matmuls and softmax (float32 softmax for any input dtype).
    """
    scale = q.shape[-1] ** -0.5
    if (dropout is None and q.dtype == k.dtype == v.dtype == jnp.float32
            and q.shape[-1] % native.ATTENTION_LANES == 0 and native.usable()):
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


# ---------------------------------------------------------------------------
# Depthwise convolution.
#
# XLA's CPU backend runs ``feature_group_count=C`` convolutions 10-28x slower
# than PyTorch (both its YNNPACK and Eigen paths). Written as kh*kw shifted
# multiply-adds the same layer is elementwise work that XLA fuses, and plain
# autodiff gives gradients that are fast too. Accelerators have good grouped
# convolution kernels, so they keep the grouped form.

DEPTHWISE_IMPLS = ("grouped", "shift_add")
DEPTHWISE_ENV = "JAXTL_DEPTHWISE"


def depthwise_impl(requested: str | None = None) -> str:
    """Which depthwise implementation to use.

    An explicit ``requested`` wins, then ``$JAXTL_DEPTHWISE``, then the
    backend's default ('shift_add' on CPU, 'grouped' elsewhere). Read at trace
    time, so changing the variable affects functions jitted afterwards.
    """
    import os

    choice = requested or os.environ.get(DEPTHWISE_ENV) or None
    if choice is None:
        return "shift_add" if jax.default_backend() == "cpu" else "grouped"
    choice = choice.strip().lower()
    if choice not in DEPTHWISE_IMPLS:
        where = "the model's depthwise_impl" if requested else f"${DEPTHWISE_ENV}"
        raise ConfigError(f"unknown depthwise implementation {choice!r} (from {where}); "
                          f"use one of {', '.join(DEPTHWISE_IMPLS)}")
    return choice


def depthwise_conv(x, kernel, stride: int = 1, padding: int = 0, dilation: int = 1, impl: str | None = None):
    """Depthwise 2-D convolution of NHWC ``x`` with a ``(kh, kw, 1, C)`` kernel.

    Symmetric zero padding of ``padding`` on each spatial side, like
    ``nn.Conv2d(C, C, k, stride, padding, dilation, groups=C)``.
    """
    impl = depthwise_impl(impl)
    kh, kw, one, channels = kernel.shape
    if one != 1 or channels != x.shape[-1]:
        raise ValueError(f"depthwise kernel {kernel.shape} does not fit input with {x.shape[-1]} channels")
    if impl == "grouped":
        return lax.conv_general_dilated(
            x, kernel, window_strides=(stride, stride), padding=((padding, padding), (padding, padding)),
            rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=channels)
    return _depthwise_shift_add(x, kernel, stride, padding, dilation)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_shift_add(x, kernel, stride: int, padding: int, dilation: int):
    return _depthwise_shift_add_forward(x, kernel, stride, padding, dilation)


def _depthwise_shift_add_fwd(x, kernel, stride, padding, dilation):
    # The residual is the padded input, which the forward writes anyway: the
    # kernel gradient reads its windows from it, so the backward need not pad
    # again, and XLA need not keep the unpadded activation as well (MobileNetV2
    # fine-tune step 0.96x at 128 px, same-process A/B).
    padded = _pad_hw(x, padding)
    out = _depthwise_taps(padded, kernel, x.shape[1:3], stride, padding, dilation)
    return out, (padded, kernel)


# Bytes of input window + output gradient the kernel gradient works on at a time.
# The kh*kw tap reductions each read the whole layer; a slice of the batch that
# fits in cache is read from memory once instead of kh*kw times. Measured on a
# 2-core AVX-512 EPYC (1 MiB L2 per core, 32 MiB L3), batch 32, 3x3 kernel,
# whole batch -> 4-8 MB slices: 32x56x56x144 75 -> 31 ms, 32x112x112x32
# 64 -> 35 ms, 32x32x32x144 24 -> 11 ms, 32x7x7x960 6.1 -> 4.2 ms; 16 MB
# slices were slower again, single images slower than 2-image slices.
KERNEL_GRAD_SLICE_BYTES = 8 << 20


def _depthwise_shift_add_bwd(stride, padding, dilation, residuals, grad):
    """Input gradient as the shift-add's linear transpose (fast: shifted adds again).

    Kernel gradient one tap at a time in a loop: plain autodiff emits the kh*kw
    per-channel reductions sum(window * grad) as one multi-output fusion that
    XLA's CPU backend runs 2x slower than the same reductions in sequence
    (measured: 76 vs 36 ms for a 32x32x32x144 layer, 2 cores). The taps loop
    over a few images at a time (:data:`KERNEL_GRAD_SLICE_BYTES`) so that the
    kh*kw passes hit cache.
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

    On CPU a hand-written kernel (:mod:`jaxtl.native`, one pass over the layer
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
            window = _tap_window(x_part, (t // kw) * dilation, (t % kw) * dilation, out_h, out_w, stride)
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
    return _depthwise_taps(_pad_hw(x, padding), kernel, x.shape[1:3], stride, padding, dilation)


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
            window = _tap_window(x, i * dilation, j * dilation, out_h, out_w, stride)
            term = window.astype(acc_dtype) * kernel[i, j, 0, :].astype(acc_dtype)
            out = term if out is None else out + term
    return out.astype(x.dtype)


def _tap_window(x, top, left, out_h: int, out_w: int, stride: int):
    """Padded input pixels ``[top + k*stride, left + l*stride]`` for all output
    (k, l): the pixels that one kernel tap sees.

    Python-int offsets (the forward) give one strided ``lax.slice``, whose
    transpose is a single pad; traced offsets (the kernel-gradient loop) need a
    ``dynamic_slice``, whose transpose would write a full-size zero buffer per
    tap (the stride-2 input gradient of a 32x64x64x96 layer took 57 ms that way
    instead of 19)."""
    n, c = x.shape[0], x.shape[-1]
    span_h, span_w = (out_h - 1) * stride + 1, (out_w - 1) * stride + 1
    if isinstance(top, int) and isinstance(left, int):
        return lax.slice(x, (0, top, left, 0), (n, top + span_h, left + span_w, c), (1, stride, stride, 1))
    window = lax.dynamic_slice(x, (0, top, left, 0), (n, span_h, span_w, c))
    return window[:, ::stride, ::stride, :] if stride > 1 else window


class DepthwiseConv(nn.Module):
    """``nn.Conv2d(C, C, k, stride, padding, groups=C)`` on NHWC input.

    The parameter has nn.Conv's layout for ``feature_group_count=C``:
    ``kernel`` (kh, kw, 1, C) (PyTorch's (C, 1, kh, kw) transposed), and an
    optional ``bias`` (C,). ``impl`` picks the implementation (see
    :func:`depthwise_impl`); both give the same result to float32 rounding.
    """

    kernel_size: int
    stride: int = 1
    padding: int | None = None     # None: PyTorch's usual (k - 1) // 2 * dilation
    dilation: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    impl: str | None = None
    kernel_init: Callable = conv_init
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        k = self.kernel_size
        kernel = param(self, "kernel", self.kernel_init, (k, k, 1, channels), jnp.float32)
        padding = pad_same_symmetric(k, self.dilation) if self.padding is None else self.padding
        y = depthwise_conv(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, padding, self.dilation,
                           self.impl)
        if self.use_bias:
            bias = param(self, "bias", self.bias_init, (channels,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y
