"""Shared layers: the tiny-map convolution path, max pooling, BatchNorm's PyTorch semantics, LayerNorm's backward
and the per-example dropout masks."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from jax import lax

from jaxtl.models.layers import BatchNorm, Conv2d, LayerNorm, Linear, gelu_exact, max_pool
from jaxtl.ops.conv import conv_by_patches, conv_by_taps


@pytest.mark.parametrize("hw,k,stride,padding,dilation", [(2, 3, 1, 1, 1), (1, 3, 1, 1, 1), (3, 3, 2, 1, 1),
                                                         (4, 3, 2, 1, 1), (2, 1, 1, 0, 1), (5, 3, 1, 2, 2),
                                                         (4, 7, 2, 3, 1)])
def test_conv_by_taps_equals_xla_conv(hw, k, stride, padding, dilation):
    kx, kw = jax.random.split(jax.random.key(hw * 100 + k))
    x = jax.random.normal(kx, (3, hw, hw + 1, 8))
    w = jax.random.normal(kw, (k, k, 8, 5))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (stride, stride), ((padding, padding),) * 2,
                                        rhs_dilation=(dilation, dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def taps(x, w):
        return conv_by_taps(x, w, stride, padding, dilation)

    with jax.default_matmul_precision("highest"):  # jitted: one compile each, not one per operation
        np.testing.assert_allclose(jax.jit(taps)(x, w), jax.jit(ref)(x, w), rtol=1e-5, atol=1e-5)
        loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)))  # noqa: E731
        g_taps = jax.jit(jax.grad(loss(taps), argnums=(0, 1)))(x, w)
        g_ref = jax.jit(jax.grad(loss(ref), argnums=(0, 1)))(x, w)
    # One (taps x C_in) product and XLA's convolution sum in different orders, and sin() passes on the
    # float32 rounding of outputs up to ~50: gradients agree to 1e-5 of their largest value. For the 7x7
    # case the product form is the closer of the two to a float64 reference (1.5e-5 against 3.3e-5).
    for a, b in zip(g_taps, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("h,w,k", [(32, 48, 16), (2, 2, 2), (28, 14, 7)])
def test_conv_by_patches_equals_xla_conv_and_is_used_for_patch_embeddings(h, w, k):
    kx, kw = jax.random.split(jax.random.key(h + k))
    x = jax.random.normal(kx, (2, h, w, 3))
    kernel = jax.random.normal(kw, (k, k, 3, 6))

    def ref(x, w):
        return lax.conv_general_dilated(x, w, (k, k), ((0, 0), (0, 0)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(conv_by_patches(x, kernel), ref(x, kernel), rtol=1e-5, atol=1e-5)
        # A fixed random cotangent (a sin() loss would amplify the forward's rounding
        # of sums of k*k*3 products, |y| ~ 30, into the gradients).
        cot = jax.random.normal(jax.random.key(7), ref(x, kernel).shape)
        g = jax.grad(lambda x, w: jnp.sum(conv_by_patches(x, w) * cot), argnums=(0, 1))(x, kernel)
        g_ref = jax.grad(lambda x, w: jnp.sum(ref(x, w) * cot), argnums=(0, 1))(x, kernel)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    layer = Conv2d(6, k, stride=k, padding=0)
    jaxpr = str(jax.make_jaxpr(lambda x: layer.apply({"params": {"kernel": kernel}}, x))(x))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


@pytest.mark.parametrize("h,w,stride", [(9, 7, 1), (9, 7, 2), (8, 8, 2), (5, 6, 3)])
def test_pointwise_conv_is_a_matmul_equal_to_xla_conv(h, w, stride):
    kx, kw = jax.random.split(jax.random.key(h * 10 + stride))
    x = jax.random.normal(kx, (2, h, w, 12))
    kernel = jax.random.normal(kw, (1, 1, 12, 20))
    layer = Conv2d(20, 1, stride=stride, padding=0)

    def ours(x, k):
        return layer.apply({"params": {"kernel": k}}, x)

    def ref(x, k):
        return lax.conv_general_dilated(x, k, (stride, stride), ((0, 0), (0, 0)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

    with jax.default_matmul_precision("highest"):
        y, y_ref = ours(x, kernel), ref(x, kernel)
        cot = jax.random.normal(jax.random.key(3), y_ref.shape)
        g = jax.grad(lambda x, k: jnp.sum(ours(x, k) * cot), argnums=(0, 1))(x, kernel)
        g_ref = jax.grad(lambda x, k: jnp.sum(ref(x, k) * cot), argnums=(0, 1))(x, kernel)
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(g, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * float(np.abs(b).max()))
    jaxpr = str(jax.make_jaxpr(ours)(x, kernel))
    assert "conv_general_dilated" not in jaxpr and "dot_general" in jaxpr


def test_linear_matches_flax_dense_on_token_input():
    """Same parameters, initial values and outputs as nn.Dense on (batch, tokens, width)."""
    x = jax.random.normal(jax.random.key(0), (3, 5, 16))
    ours, ref = Linear(7), nn.Dense(7, kernel_init=Linear.kernel_init)
    p, p_ref = ours.init(jax.random.key(1), x), ref.init(jax.random.key(1), x)
    assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, p_ref)
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p_ref)):
        np.testing.assert_array_equal(a, b)
    with jax.default_matmul_precision("highest"):
        np.testing.assert_allclose(ours.apply(p, x), ref.apply(p, x), rtol=1e-6, atol=1e-6)
    assert ours.apply(p, x).shape == (3, 5, 7)


@pytest.mark.torch
# (12, 1, 0): more taps than an int8 index holds, so the winner is kept as int32.
@pytest.mark.parametrize("k,stride,padding,hw", [(3, 2, 1, (9, 8)), (2, 2, 0, (8, 6)), (3, 1, 1, (5, 7)),
                                                 (12, 1, 0, (13, 14))])
def test_max_pool_values_and_gradient_match_torch_with_ties_and_nan(k, stride, padding, hw):
    """Ties (ReLU zeros, repeated values) send the whole gradient to the same
    element PyTorch picks, not split; a NaN in a window wins, as in PyTorch."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(k * 10 + stride)
    x = np.maximum(np.round(rng.standard_normal((2, *hw, 3)) * 2) / 2, 0).astype(np.float32)  # many ties
    x[0, 1, 1, 0] = np.nan
    out_shape = jax.eval_shape(lambda v: max_pool(v, k, stride, padding), jnp.asarray(x)).shape
    upstream = rng.standard_normal(out_shape).astype(np.float32)

    def value_and_vjp(v, u):
        y, vjp = jax.vjp(lambda v: max_pool(v, k, stride, padding), v)
        return y, vjp(u)[0]

    y, grad = jax.jit(value_and_vjp)(jnp.asarray(x), jnp.asarray(upstream))

    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).requires_grad_()
    yt = torch.nn.functional.max_pool2d(xt, k, stride, padding)
    yt.backward(torch.from_numpy(upstream.transpose(0, 3, 1, 2).copy()))
    np.testing.assert_array_equal(np.asarray(y), yt.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(np.asarray(grad), xt.grad.numpy().transpose(0, 2, 3, 1))


def test_max_pool_gradient_behind_relu_matches_the_autodiff_running_maximum():
    """The hand-written backward against plain autodiff through the same
    running maximum (the previous implementation), jitted, on a ResNet stem's
    3x3/2 pool behind a ReLU (zeros: ties), odd and even sizes."""
    def autodiff_pool(x, k, stride, padding):
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)
        out_h, out_w = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
        best = None
        for i in range(k):
            for j in range(k):
                window = x[:, i:i + (out_h - 1) * stride + 1:stride, j:j + (out_w - 1) * stride + 1:stride]
                best = window if best is None else jnp.where((window > best) | jnp.isnan(window), window, best)
        return best

    for hw in [(16, 16), (15, 17)]:
        x = jax.random.normal(jax.random.key(hw[1]), (2, *hw, 5))
        up = jax.random.normal(jax.random.key(1), max_pool(x, 3, 2, 1).shape)
        ours = jax.jit(jax.grad(lambda v: jnp.sum(max_pool(jax.nn.relu(v), 3, 2, 1) * up)))(x)
        ref = jax.jit(jax.grad(lambda v: jnp.sum(autodiff_pool(jax.nn.relu(v), 3, 2, 1) * up)))(x)
        np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-6, atol=1e-6)
        assert np.count_nonzero(np.asarray(ours)) > 0


@pytest.mark.parametrize("stride", [1, 2])
def test_materialized_conv_input_changes_no_value_or_gradient(stride):
    """``materialize_input`` only moves where XLA puts a buffer: outputs and both
    gradients are bit-identical, also with a NaN in the kernel (the cond's
    predicate is true for NaN), the cond survives XLA's optimisation (a
    jaxlib that inlines it would silently lose the speed-up), and only a CPU
    step has it."""
    x = jax.random.normal(jax.random.key(0), (2, 9, 8, 6))
    up = jax.random.normal(jax.random.key(1), (2, (9 - 1) // stride + 1, (8 - 1) // stride + 1, 4))
    plain, kept = Conv2d(4, 3, stride, 1), Conv2d(4, 3, stride, 1, materialize_input=True)
    params = plain.init(jax.random.key(2), x)

    def loss(module, p, v):
        return jnp.sum(module.apply(p, jax.nn.relu(v * 2 + 1)) * up)

    for kernel_nan in (False, True):
        p = params
        if kernel_nan:
            p = {"params": {"kernel": params["params"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)}}
        ref = jax.jit(jax.value_and_grad(lambda p, v: loss(plain, p, v), argnums=(0, 1)))(p, x)
        got_fn = jax.jit(jax.value_and_grad(lambda p, v: loss(kept, p, v), argnums=(0, 1)))
        got = got_fn(p, x)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.isnan(float(got[0]))
    assert " conditional(" in got_fn.lower(params, x).compile().as_text()
    # CPU only: lowered for a GPU or TPU the step carries fewer conditionals.
    cases = {platform: jax.export.export(got_fn, platforms=[platform])(params, x).mlir_module().count("stablehlo.case")
             for platform in ("cpu", "cuda", "tpu")}
    assert cases["cuda"] < cases["cpu"] and cases["tpu"] < cases["cpu"], cases


def test_gelu_exact_matches_torch_formula():
    x = np.linspace(-8, 8, 2001, dtype=np.float32)
    torch = pytest.importorskip("torch")
    expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate="none").numpy()
    np.testing.assert_allclose(np.asarray(gelu_exact(jnp.asarray(x))), expected, rtol=1e-6, atol=1e-6)


def test_batchnorm_updates_running_var_with_unbiased_variance():
    x = jax.random.normal(jax.random.key(0), (4, 3, 3, 2)) * 3 + 1
    bn = BatchNorm(momentum=0.9)
    v = bn.init(jax.random.key(1), x, use_running_average=True)
    y, upd = bn.apply(v, x, use_running_average=False, mutable=["batch_stats"])
    flat = np.asarray(x).reshape(-1, 2)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], 0.1 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["var"], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
    # ... and normalises with the biased variance, like torch.nn.BatchNorm2d in train mode
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 2), (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_batchnorm_train_gradients_equal_textbook_autodiff_and_torch(offset):
    """BatchNorm stops the gradient of the variance through the batch mean (a
    term that is zero); input, scale and bias gradients must still equal full
    autodiff of the textbook formula, and torch.nn.BatchNorm2d's, to rounding."""
    rng = np.random.default_rng(int(offset))
    x = jnp.asarray(rng.standard_normal((4, 6, 5, 8)) * 2 + offset, jnp.float32)
    scale = jnp.asarray(rng.standard_normal(8), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(8), jnp.float32)
    weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    bn = BatchNorm(momentum=0.9)
    stats = bn.init(jax.random.key(0), x, use_running_average=True)["batch_stats"]

    def ours(x, scale, bias):
        y, _ = bn.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x,
                        use_running_average=False, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y) * weights)

    def textbook(x, scale, bias):
        mean = jnp.mean(x, (0, 1, 2))
        var = jnp.mean(jnp.square(x - mean), (0, 1, 2))
        return jnp.sum(jnp.sin((x - mean) / jnp.sqrt(var + 1e-5) * scale + bias) * weights)

    got = jax.jit(jax.grad(ours, argnums=(0, 1, 2)))(x, scale, bias)
    want = jax.jit(jax.grad(textbook, argnums=(0, 1, 2)))(x, scale, bias)
    for name, g, w in zip(("x", "scale", "bias"), got, want):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max()), name

    torch = pytest.importorskip("torch")
    tx = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy()).requires_grad_()
    tbn = torch.nn.BatchNorm2d(8).train()
    with torch.no_grad():
        tbn.weight.copy_(torch.from_numpy(np.array(scale)))
        tbn.bias.copy_(torch.from_numpy(np.array(bias)))
    tw = torch.from_numpy(np.asarray(weights).transpose(0, 3, 1, 2).copy())
    (torch.sin(tbn(tx)) * tw).sum().backward()
    for name, g, w in (("x", got[0], tx.grad.numpy().transpose(0, 2, 3, 1)), ("scale", got[1], tbn.weight.grad.numpy()),
                       ("bias", got[2], tbn.bias.grad.numpy())):
        assert float(np.abs(np.asarray(g) - w).max()) <= 1e-4 * float(np.abs(w).max()), name


@pytest.mark.parametrize("shape,offset", [((3, 65, 192), 20.0), ((2, 5, 7, 96), 0.0)])
def test_layer_norm_equals_flax_forward_exactly_and_its_backward_to_rounding(shape, offset):
    """The hand-written backward against autodiff through flax.linen.LayerNorm,
    on a residual-stream-like input (mean far from 0) and on NHWC maps."""
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.standard_normal(shape) * 3 + offset, jnp.float32)
    width = shape[-1]
    params = {"params": {"scale": jnp.asarray(rng.standard_normal(width), jnp.float32),
                         "bias": jnp.asarray(rng.standard_normal(width), jnp.float32)}}
    ours = LayerNorm(epsilon=1e-6)
    flax_ln = nn.LayerNorm(epsilon=1e-6, param_dtype=jnp.float32, use_fast_variance=False)
    assert jax.tree.map(np.shape, ours.init(jax.random.key(0), x)) == \
        jax.tree.map(np.shape, flax_ln.init(jax.random.key(0), x))
    np.testing.assert_array_equal(jax.jit(ours.apply)(params, x), jax.jit(flax_ln.apply)(params, x))

    weights = jnp.asarray(rng.standard_normal(shape), jnp.float32)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)) * weights)

    got = jax.jit(jax.grad(loss(ours), argnums=(0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(flax_ln), argnums=(0, 1)))(params, x)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert float(jnp.abs(g - w).max()) <= 1e-5 * float(jnp.abs(w).max())


def test_layer_norm_bfloat16_output_and_float32_statistics():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 64)) * 0.01 + 10.0, jnp.bfloat16)
    ln = LayerNorm(epsilon=1e-6, dtype=jnp.bfloat16)
    variables = ln.init(jax.random.key(0), x)
    out = ln.apply(variables, x)
    assert out.dtype == jnp.bfloat16 and variables["params"]["scale"].dtype == jnp.float32
    x64 = np.asarray(x, np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    assert float(np.abs(np.asarray(out, np.float64) - ref).max()) < 0.05
    grad = jax.grad(lambda x: jnp.sum(ln.apply(variables, x).astype(jnp.float32) ** 2))(x)
    assert grad.dtype == jnp.bfloat16 and bool(jnp.isfinite(grad).all())


def test_param_helper_initialises_like_flax_and_checks_shapes_without_tracing_the_initialiser():
    from flax import errors as flax_errors

    from jaxtl.models.layers import param

    traced = []

    def init(key, shape, dtype):
        traced.append(shape)
        return jax.random.normal(key, shape, dtype)

    class Ours(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ param(self, "w", init, (3, 2), jnp.float32)

    class Flax(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x @ self.param("w", init, (3, 2), jnp.float32)

    x = jnp.ones((1, 3))
    ours, theirs = Ours().init(jax.random.key(1), x), Flax().init(jax.random.key(1), x)
    np.testing.assert_array_equal(ours["params"]["w"], theirs["params"]["w"])   # same initialiser, same key
    traced.clear()
    np.testing.assert_array_equal(Ours().apply(ours, x), Flax().apply(ours, x))
    assert traced == [(3, 2)]               # only Flax's own param traced the initialiser again
    with pytest.raises(flax_errors.ScopeParamShapeError, match=r'"w".*\(3, 2\).*\(4, 2\)'):
        Ours().apply({"params": {"w": jnp.ones((4, 2))}}, x)


# --------------------------------------------------------------------------- per-example randomness


def test_dropout_has_flax_semantics():
    from jaxtl.models.layers import Dropout
    from jaxtl.rng import make_key

    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 7, 5)), jnp.float32)
    rngs = {"dropout": make_key(3)}
    np.testing.assert_array_equal(Dropout(0.3).apply({}, x, deterministic=True), x)
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)  # no rng needed
    np.testing.assert_array_equal(Dropout(1.0, deterministic=False).apply({}, x, rngs=rngs), jnp.zeros_like(x))
    out = np.asarray(Dropout(0.3).apply({}, x, deterministic=False, rngs=rngs))
    kept = out != 0
    np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.7, rtol=1e-6)
    assert abs(1.0 - kept.mean() - 0.3) < 0.03  # 2240 draws: one sigma is 0.01
    assert len({row.tobytes() for row in kept}) == 64  # every example its own mask
    with pytest.raises(Exception, match="dropout"):
        Dropout(0.3).apply({}, x, deterministic=False)


@pytest.mark.parametrize("which", ["dropout", "stochastic_depth", "example_keys"])
def test_draws_on_a_batch_split_in_two_equal_those_on_the_whole_batch(which):
    # jax.vmap with an axis name stands for a mapped step: each half finds its offset by
    # lax.axis_index, so half h's example i draws as example h * 4 + i of the whole batch.
    from jaxtl.models.layers import Dropout, example_keys, stochastic_depth
    from jaxtl.rng import make_key

    class DropPath(nn.Module):
        axis_name: str | None = None

        @nn.compact
        def __call__(self, x):
            return stochastic_depth(self, x, 0.5, False, self.axis_name)

    x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 6, 5)), jnp.float32)
    key = make_key(1)
    if which == "example_keys":
        def draw(x, axis_name=None):
            return jax.random.key_data(example_keys(key, x.shape[0], axis_name))
    else:
        module = partial(Dropout, 0.5, deterministic=False) if which == "dropout" else DropPath

        def draw(x, axis_name=None):
            return module(axis_name=axis_name).apply({}, x, rngs={"dropout": key})
    whole = np.asarray(draw(x))
    halves = np.asarray(jax.vmap(partial(draw, axis_name="data"), axis_name="data")(x.reshape(2, 4, 6, 5)))
    np.testing.assert_array_equal(halves.reshape(whole.shape), whole)
    # Without the axis each half would start at position 0: the test can tell.
    unplaced = np.asarray(jax.vmap(draw)(x.reshape(2, 4, 6, 5))).reshape(whole.shape)
    assert not np.array_equal(unplaced, whole)


def test_per_example_draws_do_not_depend_on_the_device_count():
    # Real mappings on 4 host devices against one: the same keys, dropout masks and augmentation.
    import subprocess
    import sys

    code = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import functools, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxtl.data.augment import train_augment
from jaxtl.data.preprocessing import Preprocessing
from jaxtl.models.layers import Dropout, example_keys
from jaxtl.rng import make_key
assert jax.device_count() == 4
key = make_key(7)
images = np.random.default_rng(0).integers(0, 256, (8, 40, 40, 3), dtype=np.uint8)
augment = functools.partial(train_augment, pre=Preprocessing(input_size=32, resize_size=40), jitter=(0.4, 0.4, 0.4, 0.1))
def per_device(x):
    n = x.shape[0]
    keys = jax.random.key_data(example_keys(key, n, "data"))
    y = augment(example_keys(key, n, "data"), x)
    return keys, y, Dropout(0.5, deterministic=False, axis_name="data").apply({}, y, rngs={"dropout": key})
def run(devices):
    mesh = Mesh(np.array(devices), ("data",))
    return jax.device_get(jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"), out_specs=P("data"),
                                                check_vma=False))(images))
one, four = run(jax.devices()[:1]), run(jax.devices())
pmapped = jax.device_get(jax.pmap(per_device, axis_name="data")(images.reshape(4, 2, 40, 40, 3)))
for name, a, b, c in zip(("keys", "augmented", "dropout"), one, four, pmapped):
    print(name, float(np.abs(a - b).max()), float(np.abs(a - c.reshape(a.shape)).max()))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    diffs = {name: (float(a), float(b)) for name, a, b in (line.split() for line in r.stdout.strip().splitlines())}
    assert diffs["keys"] == (0.0, 0.0), diffs
    # The same draws; the pixel arithmetic of a batch of 2 or 8 may round differently.
    assert max(diffs["augmented"]) < 1e-5 and max(diffs["dropout"]) < 1e-4, diffs
