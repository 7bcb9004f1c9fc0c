"""Each op's fast path against its plain reference (jaxtl.ops): values and gradients, and whole models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtl
from jaxtl import ops


def _close(a, b, rel=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * max(np.abs(b).max(), 1.0), np.abs(a - b).max()


def _value_and_grads(f, *args):
    y = f(*args)
    cot = jax.random.normal(jax.random.key(7), y.shape, y.dtype)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * cot), argnums=tuple(range(len(args))))(*args)
    return y, grads


def _same(fast, reference, *args):
    with jax.default_matmul_precision("highest"):
        y, g = jax.jit(lambda *a: _value_and_grads(fast, *a))(*args)
        y_ref, g_ref = jax.jit(lambda *a: _value_and_grads(reference, *a))(*args)
    _close(y, y_ref)
    for a, b in zip(g, g_ref):
        _close(a, b)


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# (input H=W, kernel, stride, padding, groups): a patch embedding, a 1x1, a tiny map, a plain 3x3, a grouped conv
@pytest.mark.parametrize("hw,k,stride,padding,groups", [(8, 4, 4, 0, 1), (9, 1, 2, 0, 1), (2, 3, 1, 1, 1),
                                                         (9, 3, 2, 1, 1), (8, 3, 1, 1, 2)])
@pytest.mark.parametrize("materialize", [False, True])
def test_conv2d_fast_paths_equal_the_reference(hw, k, stride, padding, groups, materialize):
    x, w = _normal(0, (2, hw, hw, 8)), _normal(1, (k, k, 8 // groups, 6))
    _same(lambda x, w: ops.conv2d(x, w, stride, padding, 1, groups, materialize_input=materialize),
          lambda x, w: ops.conv2d_reference(x, w, stride, padding, 1, groups), x, w)


@pytest.mark.parametrize("k,stride,padding,dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 2, 1), (3, 1, 2, 2)])
def test_depthwise_shift_add_equals_the_grouped_reference(k, stride, padding, dilation):
    x, w = _normal(2, (3, 11, 10, 16)), _normal(3, (k, k, 1, 16))
    _same(lambda x, w: ops.depthwise_conv2d(x, w, stride, padding, dilation, "shift_add"),
          lambda x, w: ops.depthwise_conv2d(x, w, stride, padding, dilation, "grouped"), x, w)


def test_layer_norm_closed_form_backward_equals_autodiff():
    x = _normal(4, (2, 5, 24)) * 3 + 10   # a residual stream whose mean is far from 0
    scale, bias = _normal(5, (24,)), _normal(6, (24,))
    _same(lambda *a: ops.layer_norm(*a, 1e-6), lambda *a: ops.layer_norm_reference(*a, 1e-6), x, scale, bias)


@pytest.mark.parametrize("k,stride,padding", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_max_pool_by_taps_equals_reduce_window(k, stride, padding):
    x = _normal(7, (2, 9, 10, 4))   # continuous values: no ties, so both put the gradient on the same pixel
    _same(lambda x: ops.max_pool2d(x, k, stride, padding), lambda x: ops.max_pool2d_reference(x, k, stride, padding),
          x)


def test_fused_attention_equals_the_reference():
    q, k, v = (_normal(s, (2, 17, 3, 16)) for s in (8, 9, 10))
    _same(ops.multi_head_attention, ops.multi_head_attention_reference, q, k, v)


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("vit_tiny_patch16_224", 32)])
def test_a_model_on_the_references_alone_gives_the_same_logits(name, size):
    """reference_implementations() switches every op a model traces; the model's logits do not change.
    (The gradients of each op are compared above.)"""
    kw = {"img_size": size} if name.startswith("vit") else {}
    model = jaxtl.create_model(name, num_classes=5, **kw)
    variables = jaxtl.init_variables(model, jaxtl.get_spec(name), 0)
    x = _normal(11, (2, size, size, 3))

    def forward():   # a new function per trace: JAX caches a function's trace, whatever the ops chose
        return lambda v, x: model.apply(v, x, train=False)

    fast_jaxpr = str(jax.make_jaxpr(forward())(variables, x))
    logits = jax.jit(forward())(variables, x)
    with ops.reference_implementations():
        ref_jaxpr = str(jax.make_jaxpr(forward())(variables, x))
        ref_logits = jax.jit(forward())(variables, x)
    assert "conv_general_dilated" in ref_jaxpr and ref_jaxpr != fast_jaxpr
    _close(logits, ref_logits, 1e-4)
