"""The native CPU kernel (jaxtl/native): the depthwise convolution's kernel gradient."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl import native
from jaxtl.models import layers
from jaxtl.models.layers import depthwise_conv

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
    out_h, out_w = layers.output_size(h, k, stride, pad, dilation), layers.output_size(w, k, stride, pad, dilation)
    grad = jnp.asarray(rng.standard_normal((n, out_h, out_w, channels)), jnp.float32)
    got = jax.jit(lambda p, g: native.depthwise_kernel_grad(p, g, (k, k), stride, dilation))(padded, grad)
    ref = reference_kernel_grad(padded, grad, k, stride, dilation)
    taps = layers._depthwise_kernel_grad_taps(padded, grad, (k, k, 1, channels), stride, dilation)
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
        "from jaxtl.models.layers import depthwise_conv\n"
        "x = jnp.ones((2, 8, 8, 4)); k = jnp.ones((3, 3, 1, 4))\n"
        "f = jax.grad(lambda k: depthwise_conv(x, k, 1, 1, 1, 'shift_add').sum())\n"
        "print(float(f(k).sum())); print(float(jax.jit(f)(k).sum()))\n"
    )
    env = {**os.environ, "JAXTL_CACHE": str(tmp_path / "cache"), "CXX": str(tmp_path / "no-such-compiler")}
    env.pop(native.OPT_OUT, None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    # a tap sees 7, 8 or 7 image rows (and columns) of the 8x8 images; 2 images x 4 channels
    assert [float(v) for v in r.stdout.split()] == [2 * 4 * (7 + 8 + 7) ** 2] * 2
    lines = [line for line in r.stderr.splitlines() if "native CPU kernels unavailable" in line]
    assert len(lines) == 1 and "no-such-compiler" in lines[0], r.stderr
    assert not any((tmp_path / "cache").rglob("*.so"))


def test_kernel_grad_under_pmap_and_shard_map_on_four_devices():
    # Four host devices run their kernel-gradient calls at the same time on XLA's shared pool:
    # each call must finish (its own thread works through the chunks) and match one device's.
    code = r"""
import os
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
import json, jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, PartitionSpec as P
from jaxtl import native
from jaxtl.models.layers import depthwise_conv
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
print(json.dumps({"native": "jaxtl_depthwise_kernel_grad" in hlo,
                  "pmap": float(jnp.abs(pmapped - one).max()) / scale,
                  "shard_map": float(jnp.abs(sharded - one).max()) / scale}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result["native"]
    assert result["pmap"] <= 1e-5 and result["shard_map"] <= 1e-5, result
