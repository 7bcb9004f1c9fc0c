"""Building blocks shared by the model families.

Everything here reproduces PyTorch's math exactly, because converted weights
must give torchvision's/timm's logits to float32 rounding:

* :class:`BatchNorm` updates ``running_var`` with the *unbiased* batch variance
  as PyTorch does (Flax's own BatchNorm uses the biased one), normalises with
  the biased one, and can synchronise statistics across devices (``axis_name``).
* :func:`conv` pads explicitly and symmetrically like ``nn.Conv2d(padding=p)``;
  ``'SAME'`` pads asymmetrically on strided layers and would diverge.

Randomness is drawn per example (:func:`example_keys`): :class:`Dropout` and
:func:`stochastic_depth` draw example i's mask from the ``'dropout'`` key
folded with i's position in the global batch, so a step mapped over several
devices draws the masks one device would.

The modules hold the parameters; the arithmetic of convolution, pooling,
LayerNorm and attention is in :mod:`jaxtl.ops`, with its reference and fast paths.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import errors as flax_errors
from jax import lax

from jaxtl import ops
from jaxtl.ops import multi_head_attention  # noqa: F401  (the families' attention)
from jaxtl.ops.conv import pad_same_symmetric
from jaxtl.errors import ConfigError
from jaxtl.rng import independent_keys

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
    own error. A new parameter goes through Flax's path unchanged.
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
            # layer. Stopping the gradient there drops exactly that zero term.
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
    # Compute the input into a buffer of its own first (``jaxtl.ops.conv.materialized``).
    materialize_input: bool = False

    @nn.compact
    def __call__(self, x):
        k, cin = self.kernel_size, x.shape[-1]
        if cin % self.groups:
            raise ValueError(f"{cin} input channels are not divisible by groups={self.groups}")
        kernel = param(self, "kernel", self.kernel_init, (k, k, cin // self.groups, self.features), jnp.float32)
        y = ops.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding, self.dilation,
                       self.groups, materialize_input=self.materialize_input)
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
    plain 2-D matmul.
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


class LayerNorm(nn.Module):
    """``nn.LayerNorm(width, eps)`` over the last axis: the parameters (``scale``,
    ``bias``), initialisers and float32 statistics of
    ``flax.linen.LayerNorm(use_fast_variance=False)``, computed by
    :func:`jaxtl.ops.layer_norm`. The output is cast to
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
        return ops.layer_norm(x.astype(jnp.float32), scale, bias, float(self.epsilon)).astype(self.dtype)


def max_pool(x, kernel_size: int, stride: int, padding: int):
    """``nn.MaxPool2d(k, s, p)`` on NHWC input (pads with -inf; ties and NaN as PyTorch)."""
    return ops.max_pool2d(x, kernel_size, stride, padding)


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


def inference_mode(train: bool, group: str, frozen: Sequence[str]) -> bool:
    """A layer group runs in inference mode in evaluation and while frozen.

    This is the Keras semantics: a frozen group's BatchNorm normalises with its
    running statistics (which then do not drift) and its dropout is off.
    """
    return (not train) or (group in frozen)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor``.

    The TF-slim rule both torchvision (``_make_divisible``) and timm
    (``make_divisible``) use: round half up, never below ``min_value``
    (default ``divisor``), and never more than 10 % below ``value``.
    """
    min_value = divisor if min_value is None else min_value
    rounded = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def example_keys(key: jax.Array, batch_size: int, axis_name: str | None = None) -> jax.Array:
    """One key per example, shape ``(batch_size,)``: ``fold_in(key, p)`` for ``p`` the example's
    position in the global batch.

    Under a mapping over ``axis_name`` every device holds ``batch_size`` consecutive examples of
    the global batch, device d the positions [d * batch_size, (d + 1) * batch_size); without an
    axis the positions start at 0. An example's draws then depend on ``key`` and its position
    only, not on how many devices share the batch. The keys draw independently of each other
    under ``jax.vmap`` (:func:`jaxtl.rng.independent_keys`).
    """
    offset = lax.axis_index(axis_name) * batch_size if axis_name else 0
    positions = offset + jnp.arange(batch_size, dtype=jnp.int32)
    return independent_keys(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, positions))


def example_bernoulli(key: jax.Array, p: float, shape: Sequence[int], axis_name: str | None = None) -> jax.Array:
    """Boolean draws of ``shape``, True with probability ``p``; row i (axis 0 is the batch) is
    drawn from example i's key (:func:`example_keys`)."""
    keys = example_keys(key, shape[0], axis_name)
    return jax.vmap(lambda k: jax.random.bernoulli(k, p, tuple(shape[1:])))(keys)


class Dropout(nn.Module):
    """``flax.linen.Dropout`` with its mask drawn per example.

    Zeroes each input with probability ``rate`` and scales the kept ones by
    1 / (1 - rate) (``rate`` 1: all zeros); off when ``deterministic`` (given
    here or to the call) or at rate 0. Axis 0 is the batch: example i's mask
    comes from ``make_rng(rng_collection)`` folded with i's position in the
    global batch (:func:`example_keys`; ``axis_name`` is the axis the step is
    mapped over, to find that position), so the masks do not depend on how
    many devices share the batch.
    """

    rate: float
    deterministic: bool | None = None
    rng_collection: str = "dropout"
    axis_name: str | None = None

    @nn.compact
    def __call__(self, inputs, deterministic: bool | None = None):
        deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
        if self.rate == 0.0 or deterministic:
            return inputs
        if self.rate == 1.0:
            return jnp.zeros_like(inputs)
        keep = 1.0 - self.rate
        mask = example_bernoulli(self.make_rng(self.rng_collection), keep, inputs.shape, self.axis_name)
        return lax.select(mask, inputs / keep, jnp.zeros_like(inputs))


def stochastic_depth(module: nn.Module, x, rate: float, deterministic: bool, axis_name: str | None = None):
    """Drop the whole residual branch of random samples, rescale the kept ones by
    1 / (1 - rate): torchvision's ``StochasticDepth(rate, "row")`` and timm's
    ``DropPath``. Draws from the ``'dropout'`` rng stream, per example as
    :class:`Dropout` does (``axis_name``: the axis the step is mapped over)."""
    if deterministic or rate == 0.0:
        return x
    keep = 1.0 - rate
    if keep <= 0.0:
        return jnp.zeros_like(x)
    mask = example_bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1), axis_name)
    return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype)).astype(x.dtype)


class SqueezeExcite(nn.Module):
    """Channel gate: mean over H, W -> Dense -> ``activation`` -> Dense -> ``gate`` -> scale the channels.

    PyTorch writes the two Dense layers as 1x1 convolutions on the pooled
    (N, C, 1, 1) tensor, which is the same affine map. MobileNetV3 uses ReLU and
    a hard sigmoid, EfficientNet SiLU and a sigmoid.
    """

    squeeze_features: int
    activation: Callable = nn.relu
    gate: Callable = nn.sigmoid
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        s = dense(self.squeeze_features, dtype=self.dtype, name="reduce", kernel_init=conv_init)(s)
        s = self.activation(s)
        s = dense(channels, dtype=self.dtype, name="expand", kernel_init=conv_init)(s)
        s = self.gate(s)
        return x * s[:, None, None, :].astype(x.dtype)


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
    ``erfc``, which XLA's CPU backend computes several times slower than ``erf``.
    """
    return x * 0.5 * (1.0 + lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class DepthwiseConv(nn.Module):
    """``nn.Conv2d(C, C, k, stride, padding, groups=C)`` on NHWC input.

    The parameter has nn.Conv's layout for ``feature_group_count=C``:
    ``kernel`` (kh, kw, 1, C) (PyTorch's (C, 1, kh, kw) transposed), and an
    optional ``bias`` (C,). ``impl`` picks the implementation (see
    :func:`jaxtl.ops.depthwise_impl`); both give the same result to float32 rounding.
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
        y = ops.depthwise_conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, padding,
                                 self.dilation, self.impl)
        if self.use_bias:
            bias = param(self, "bias", self.bias_init, (channels,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y
