"""The native CPU kernels (jaxtl/ops/native): the depthwise convolution's kernel gradient and multi-head attention."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtl.ops.native as native
import jaxtl.ops.attention as attention_ops
import jaxtl.ops.depthwise as depthwise_ops
from jaxtl.ops import depthwise_conv2d as depthwise_conv, multi_head_attention, output_size

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the native kernels are CPU kernels")


def reference_kernel_grad(padded, grad, k: int, stride: int, dilation: int) -> np.ndarray:
    """The definition, in float64: sum over batch and pixels of each tap's window times the gradient."""
    p, g = np.asarray(padded, np.float64), np.asarray(grad, np.float64)
    out_h, out_w = g.shape[1:3]
    out = np.zeros((k, k, p.shape[-1]))
    for i in range(k):
        for j in range(k):
            window = p[:, i * dilation:i * dilation + (out_h - 1) * stride + 1:stride,
                       j * dilation:j * dilation + (out_w - 1) * stride + 1:stride]
            out[i, j] = np.sum(window * g, axis=(0, 1, 2))
    return out


def test_the_native_kernels_build_here():
    # The machines jaxtl is tested on have a C++ compiler: a build failure is a defect, not a fallback.
    assert native.available(), native._state.get("error")


# Channels 45 = a 32-block, an 8-block and 5 single channels; 9x9 is the generic (not unrolled) path.
@pytest.mark.parametrize("k,stride,dilation,channels", [(3, 1, 1, 45), (3, 2, 1, 45), (3, 1, 2, 16), (5, 2, 1, 40),
                                                        (7, 1, 1, 8), (9, 1, 1, 5), (2, 2, 1, 33)])
def test_kernel_grad_equals_the_definition_and_the_xla_taps(k, stride, dilation, channels):
    rng = np.random.default_rng(k * 100 + stride * 10 + dilation)
    n, h, w = 3, 13, 11
    pad = (k - 1) // 2 * dilation
    padded = jnp.asarray(np.pad(rng.standard_normal((n, h, w, channels)), ((0, 0), (pad, pad), (pad, pad), (0, 0))),
                         jnp.float32)
    out_h, out_w = output_size(h, k, stride, pad, dilation), output_size(w, k, stride, pad, dilation)
    grad = jnp.asarray(rng.standard_normal((n, out_h, out_w, channels)), jnp.float32)
    got = jax.jit(lambda p, g: native.depthwise_kernel_grad(p, g, (k, k), stride, dilation))(padded, grad)
    ref = reference_kernel_grad(padded, grad, k, stride, dilation)
    taps = depthwise_ops._depthwise_kernel_grad_taps(padded, grad, (k, k, 1, channels), stride, dilation)
    assert got.shape == (k * k, channels) and got.dtype == jnp.float32
    scale = np.abs(ref).max()
    assert np.abs(np.asarray(got).reshape(k, k, channels) - ref).max() <= 1e-6 * scale * np.sqrt(n * h * w)
    assert np.abs(np.asarray(got).reshape(k, k, 1, channels) - np.asarray(taps)).max() <= 1e-5 * scale


def test_kernel_grad_is_bit_identical_from_call_to_call():
    # Work is split into chunks fixed by the shapes, summed in a fixed order: threads change nothing.
    rng = np.random.default_rng(0)
    padded = jnp.asarray(rng.standard_normal((8, 34, 34, 96)), jnp.float32)
    grad = jnp.asarray(rng.standard_normal((8, 32, 32, 96)), jnp.float32)
    f = jax.jit(lambda p, g: native.depthwise_kernel_grad(p, g, (3, 3), 1, 1))
    first = np.asarray(f(padded, grad))
    for _ in range(5):
        assert np.array_equal(np.asarray(f(padded, grad)), first)


def test_depthwise_gradient_uses_the_native_kernel_and_matches_xla(monkeypatch):
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 15, 15, 40)), jnp.bfloat16)  # bfloat16: accumulated in float32
    kernel = jnp.asarray(rng.standard_normal((3, 3, 1, 40)), jnp.float32)

    def loss(x, k):
        return jnp.sum(depthwise_conv(x, k.astype(x.dtype), 2, 1, 1, "shift_add").astype(jnp.float32) ** 2)

    def compiled():  # a new function each time: JAX reuses the trace of a function it has seen
        grad_fn = jax.jit(jax.grad(lambda x, k: loss(x, k), argnums=(0, 1)))
        return grad_fn, grad_fn.lower(x, kernel).as_text()

    grad_fn, hlo = compiled()
    assert "jaxtl_depthwise_kernel_grad" in hlo
    with_native = grad_fn(x, kernel)
    monkeypatch.setenv(native.OPT_OUT, "0")  # read when a function is traced
    grad_fn, hlo = compiled()
    assert "jaxtl_depthwise_kernel_grad" not in hlo
    without = grad_fn(x, kernel)
    assert np.array_equal(np.asarray(with_native[0]), np.asarray(without[0]))  # the input gradient is XLA's either way
    np.testing.assert_allclose(np.asarray(with_native[1]), np.asarray(without[1]), rtol=1e-5,
                               atol=1e-5 * float(np.abs(np.asarray(without[1])).max()))


def test_a_failed_build_says_why_once_and_training_code_falls_back(tmp_path):
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jaxtl.ops import depthwise_conv2d as depthwise_conv\n"
        "x = jnp.ones((2, 8, 8, 4)); k = jnp.ones((3, 3, 1, 4))\n"
        "f = jax.grad(lambda k: depthwise_conv(x, k, 1, 1, 1, 'shift_add').sum())\n"
        "print(float(f(k).sum())); print(float(jax.jit(f)(k).sum()))\n"
        "from jaxtl.ops import multi_head_attention\n"
        "q = jnp.ones((1, 3, 1, 16))\n"
        "print(float(jax.jit(jax.grad(lambda v: multi_head_attention(q, q, v).sum()))(q).sum()))\n"
    )
    env = {**os.environ, "JAXTL_CACHE": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-such-compiler")}
    env.pop(native.OPT_OUT, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # a tap sees 7, 8 or 7 image rows (and columns) of the 8x8 images; 2 images x 4 channels
    # the attention of equal tokens is the mean of v: d sum(y) / dv = 1 for each of the 3 x 16 entries
    assert [float(v) for v in r.stdout.split()] == [2 * 4 * (7 + 8 + 7) ** 2] * 2 + [48.0]
    lines = [line for line in r.stderr.splitlines() if "native CPU kernels unavailable" in line]
    assert len(lines) == 1 and "no-such-compiler" in lines[0], r.stderr
    assert not any((tmp_path / "cache").rglob("*.so"))


def test_kernels_under_pmap_and_shard_map_on_four_devices():
    # Four host devices run their kernel-gradient calls at the same time on XLA's shared pool:
    # each call must finish (its own thread works through the chunks) and match one device's.
    code = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
import jaxtl.ops.native as native
from jaxtl.ops import depthwise_conv2d as depthwise_conv, multi_head_attention
assert native.available() and jax.device_count() == 4
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((16, 30, 30, 72)), jnp.float32)
k = jnp.asarray(rng.standard_normal((3, 3, 1, 72)), jnp.float32)
def grad(k, x):
    return jax.grad(lambda k: jnp.sum(jnp.sin(depthwise_conv(x, k, 2, 1, 1, "shift_add"))))(k)
one = jax.jit(grad)(k, x)
per_device = lambda k, x: jax.lax.psum(grad(k, x), "d")
pmapped = jax.pmap(per_device, axis_name="d", in_axes=(None, 0))(k, x.reshape(4, 4, 30, 30, 72))[0]
mesh = Mesh(np.array(jax.devices()), ("d",))
sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("d")), out_specs=P(), check_vma=False))(k, x)
hlo = jax.jit(grad).lower(k, x).as_text()
scale = float(jnp.abs(one).max())
# attention: the gradient of q over a batch of 8 images, split 2 per device
q = jnp.asarray(rng.standard_normal((8, 33, 2, 32)), jnp.float32)
def attn_grad(q):
    return jax.grad(lambda q: jnp.sum(jnp.sin(multi_head_attention(q, q * 0.5, q + 1.0))))(q)
attn_one = jax.jit(attn_grad)(q)
attn_pmapped = jax.pmap(attn_grad)(q.reshape(4, 2, 33, 2, 32)).reshape(q.shape)
attn_sharded = jax.jit(jax.shard_map(attn_grad, mesh=mesh, in_specs=P("d"), out_specs=P("d"), check_vma=False))(q)
attn_hlo = jax.jit(attn_grad).lower(q).as_text()
attn_scale = float(jnp.abs(attn_one).max())
print(json.dumps({"native": "jaxtl_depthwise_kernel_grad" in hlo and "jaxtl_attention_backward" in attn_hlo,
                  "pmap": float(jnp.abs(pmapped - one).max()) / scale,
                  "shard_map": float(jnp.abs(sharded - one).max()) / scale,
                  "attention_pmap": float(jnp.abs(attn_pmapped - attn_one).max()) / attn_scale,
                  "attention_shard_map": float(jnp.abs(attn_sharded - attn_one).max()) / attn_scale}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["native"]
    assert result["pmap"] <= 1e-5 and result["shard_map"] <= 1e-5, result
    # attention: one task per (image, head) whichever device runs it: the same numbers
    assert result["attention_pmap"] == 0 and result["attention_shard_map"] == 0, result


# ---------------------------------------------------------------------------
# Attention (attention.cc).


def reference_attention(q, k, v, dy):
    """Forward and backward of softmax(q k^T / sqrt(d)) v per head, in float64 numpy."""
    q, k, v, dy = (np.asarray(t, np.float64).transpose(0, 2, 1, 3) for t in (q, k, v, dy))
    scale = q.shape[-1] ** -0.5
    s = q @ k.swapaxes(-1, -2) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = p @ v
    dv = p.swapaxes(-1, -2) @ dy
    dp = dy @ v.swapaxes(-1, -2)
    ds = p * (dp - np.sum(dp * p, -1, keepdims=True)) * scale
    dq, dk = ds @ k, ds.swapaxes(-1, -2) @ q
    return tuple(t.transpose(0, 2, 1, 3) for t in (y, dq, dk, dv))


# tokens: 197 = ViT at 224 px (rows in 6-row tiles and a tail; 197 padded to 208 = 3 x 64 + 16 score
# columns), 5 and 16 (one tile of padding, none); head_dim 16, 32, 64 and 80 (64-, 32- and 16-wide column tiles).
@pytest.mark.parametrize("batch,tokens,heads,head_dim,spread", [(2, 197, 3, 64, 1.0), (3, 5, 2, 16, 1.0),
                                                              (1, 16, 1, 32, 1.0), (2, 33, 2, 80, 1.0),
                                                              (2, 50, 2, 64, 6.0)])
def test_attention_forward_and_backward_equal_the_definition(batch, tokens, heads, head_dim, spread):
    # spread 6: logits in the hundreds, most probabilities underflow (the max-subtracted softmax must hold)
    rng = np.random.default_rng(tokens * 7 + head_dim)
    q, k, v, dy = (jnp.asarray(rng.standard_normal((batch, tokens, heads, head_dim)) * (spread if i < 2 else 1),
                               jnp.float32) for i in range(4))
    y, lse = jax.jit(lambda q, k, v: native.attention_forward(q, k, v, head_dim ** -0.5))(q, k, v)
    grads = jax.jit(lambda *a: native.attention_backward(*a, head_dim ** -0.5))(q, k, v, y, lse, dy)
    ref = reference_attention(q, k, v, dy)
    assert y.shape == q.shape and lse.shape == (batch, heads, tokens)
    for name, got, want in zip(("y", "dq", "dk", "dv"), (y, *grads), ref):
        err = np.abs(np.asarray(got, np.float64) - want).max()
        assert err <= 2e-5 * np.abs(want).max(), (name, err, np.abs(want).max())
    s = np.einsum("bihd,bjhd->bhij", np.asarray(q, np.float64), np.asarray(k, np.float64)) * head_dim ** -0.5
    m = s.max(-1)
    np.testing.assert_allclose(np.asarray(lse), m + np.log(np.exp(s - m[..., None]).sum(-1)), rtol=1e-5, atol=1e-5)


def test_a_nan_in_attention_stays_nan_like_xla():
    # A diverging model must reach the train step's non-finite check, not come out finite.
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((2, 20, 2, 16)).astype(np.float32) for _ in range(3))
    q[0, 3, 0, 5] = np.nan    # image 0, head 0: row 3 of the scores
    k[1, 7, 1, 2] = np.nan    # image 1, head 1: column 7, so every row
    q, k, v = map(jnp.asarray, (q, k, v))
    fused = jax.jit(lambda q, k, v: attention_ops._fused_attention(q, k, v, 0.25))
    got, want = np.asarray(fused(q, k, v)), np.asarray(attention_ops._attention_xla(q, k, v, 0.25))
    assert "jaxtl_attention_forward" in fused.lower(q, k, v).as_text()
    assert np.isnan(got[0, 3, 0]).all() and np.isnan(got[1, :, 1]).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    dq = np.asarray(jax.jit(jax.grad(lambda q: jnp.sum(attention_ops._fused_attention(q, k, v, 0.25))))(q))
    assert np.isnan(dq).any() and np.isnan(dq[1, :, 1]).all()


def test_attention_is_bit_identical_from_call_to_call():
    # One task per (image, head), each summed in a fixed order: threads change nothing.
    rng = np.random.default_rng(3)
    q, k, v = (jnp.asarray(rng.standard_normal((8, 65, 3, 64)), jnp.float32) for _ in range(3))
    f = jax.jit(jax.grad(lambda q, k, v: jnp.sum(jnp.sin(multi_head_attention(q, k, v))), argnums=(0, 1, 2)))
    first = [np.asarray(g) for g in f(q, k, v)]
    for _ in range(3):
        assert all(np.array_equal(np.asarray(g), f0) for g, f0 in zip(f(q, k, v), first))


def test_multi_head_attention_uses_the_native_kernel_and_matches_xla(monkeypatch):
    rng = np.random.default_rng(4)
    q, k, v = (jnp.asarray(rng.standard_normal((4, 50, 3, 64)), jnp.float32) for _ in range(3))

    def compiled():  # a new function each time: JAX reuses the trace of a function it has seen
        f = jax.jit(jax.value_and_grad(lambda q, k, v: jnp.sum(jnp.sin(multi_head_attention(q, k, v))),
                                       argnums=(0, 1, 2)))
        return f, f.lower(q, k, v).as_text()

    f, hlo = compiled()
    assert "jaxtl_attention_forward" in hlo and "jaxtl_attention_backward" in hlo
    with_native = f(q, k, v)
    monkeypatch.setenv(native.OPT_OUT, "0")
    f, hlo = compiled()
    assert "jaxtl_attention" not in hlo
    without = f(q, k, v)
    np.testing.assert_allclose(float(with_native[0]), float(without[0]), rtol=1e-5)
    for got, want in zip(with_native[1], without[1]):
        assert np.abs(np.asarray(got) - np.asarray(want)).max() <= 1e-5 * np.abs(np.asarray(want)).max()


def test_the_other_platforms_branch_gives_the_kernels_residuals():
    # lax.platform_dependent's default branch (a function compiled for a GPU/TPU) must hand the
    # shared backward the same (y, lse) as the CPU kernel.
    rng = np.random.default_rng(8)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 37, 3, 32)), jnp.float32) for _ in range(3))
    y, lse = jax.jit(lambda q, k, v: attention_ops._attention_and_lse(q, k, v, 0.2))(q, k, v)
    y_native, lse_native = jax.jit(lambda q, k, v: native.attention_forward(q, k, v, 0.2))(q, k, v)
    assert y.shape == y_native.shape and lse.shape == lse_native.shape
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_native), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lse), np.asarray(lse_native), rtol=1e-5, atol=1e-5)


def test_attention_under_vmap_equals_each_slice():
    # e.g. an ensemble of models vmapped over their parameters: the kernel runs once per slice
    rng = np.random.default_rng(6)
    q, k, v = (jnp.asarray(rng.standard_normal((3, 2, 17, 2, 16)), jnp.float32) for _ in range(3))
    f = jax.grad(lambda q, k, v: jnp.sum(jnp.sin(multi_head_attention(q, k, v))))
    mapped = jax.jit(jax.vmap(f))(q, k, v)
    assert "jaxtl_attention_backward" in jax.jit(jax.vmap(f)).lower(q, k, v).as_text()
    for i in range(3):
        assert np.array_equal(np.asarray(mapped[i]), np.asarray(jax.jit(f)(q[i], k[i], v[i])))


@pytest.mark.parametrize("dtype,head_dim,dropout", [("bfloat16", 64, False), ("float32", 8, False),
                                                    ("float32", 64, True)])
def test_attention_outside_the_kernel_takes_the_xla_path(dtype, head_dim, dropout):
    # bfloat16, a head_dim that is not a multiple of 16 and attention dropout (which needs the
    # probabilities) are XLA's; the result is the same formula either way.
    rng = np.random.default_rng(5)
    q, k, v = (jnp.asarray(rng.standard_normal((2, 9, 2, head_dim)), dtype) for _ in range(3))
    drop = (lambda p: p * 1.0) if dropout else None
    hlo = jax.jit(jax.grad(lambda q: jnp.sum(multi_head_attention(q, k, v, drop).astype(jnp.float32)))).lower(q).as_text()
    assert "jaxtl_attention" not in hlo
    got = np.asarray(multi_head_attention(q, k, v, drop), np.float64)
    want = reference_attention(q, k, v, np.zeros(q.shape))[0]
    assert np.abs(got - want).max() <= (2e-2 if dtype == "bfloat16" else 1e-5) * np.abs(want).max()
