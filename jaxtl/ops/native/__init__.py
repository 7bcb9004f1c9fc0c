"""Hand-written CPU kernels, compiled on first use and called from XLA (FFI custom calls).

Why: two operations XLA's CPU backend does badly and that matter for training
speed.

* The kernel gradient of a depthwise convolution (MobileNet, EfficientNet,
  ConvNeXt). XLA computes it as kh*kw multiply-reductions, each of which reads
  the whole layer; ``depthwise.cc`` makes one pass and keeps the kh*kw partial
  sums in registers.
* A ViT's multi-head attention, forward and backward. XLA runs it as batched
  matmuls of small (197 x 64) matrices, a softmax and head transposes;
  ``attention.cc`` does each (image, head) pair as one task whose scores stay
  in cache, on the projections' own (batch, tokens, heads, head_dim) layout.

How: the C++ sources ship with the package and are compiled with the system's
C++ compiler (``$CXX`` or ``c++``, ``-O3 -march=native``) against the FFI
headers that jaxlib ships (``jax.ffi.include_dir()``), once per source set,
jaxlib version and processor, into one library under ``<jaxtl cache>/native/``
(``JAXTL_CACHE`` or ``~/.cache/jaxtl``; a few seconds, once). Concurrent processes
share one build (a file lock; the library is renamed into place complete).
Measurements: docs/performance.md.

When there is no compiler, the build fails or ``JAXTL_NATIVE=0`` is set,
:func:`available` is False and the callers use their pure-XLA code: same
results to float32 rounding, slower. A failed build says why, once, on stderr.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

OPT_OUT = "JAXTL_NATIVE"      # "0": never build or use the native kernels
SOURCES = tuple(Path(__file__).with_name(name) for name in ("depthwise.cc", "attention.cc"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("parallel.h",))   # part of the build key
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")
TARGETS = {   # FFI target name -> C symbol
    "depthwise_kernel_grad": "JaxtlDepthwiseKernelGrad",
    "attention_forward": "JaxtlAttentionForward",
    "attention_backward": "JaxtlAttentionBackward",
}

_lock = threading.Lock()
_state: dict = {}   # "ok": bool, "error": str, "path": Path


def _build_dir() -> Path:
    import jaxlib

    from jaxtl.paths import native_build_dir

    key = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES + HEADERS) + " ".join(FLAGS).encode()
                         + jaxlib.__version__.encode())
    return native_build_dir(key.hexdigest()[:16])


def _compile(out: Path) -> None:
    import jax

    compiler = os.environ.get("CXX") or "c++"
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler!r} not found; install g++ or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise RuntimeError(f"{compiler} failed: {last}")
        os.replace(tmp, out)  # complete or not at all
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _load() -> None:
    import jax

    path = _build_dir() / "libjaxtl_native.so"
    if not path.exists():
        try:
            from filelock import FileLock
        except ImportError:  # a core dependency; without it two processes may both compile (harmless)
            _compile(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path.parent / ".build.lock")):
                if not path.exists():
                    _compile(path)
    lib = ctypes.cdll.LoadLibrary(str(path))
    for name, symbol in TARGETS.items():
        jax.ffi.register_ffi_target(f"jaxtl_{name}", jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    _state["path"] = path


def available() -> bool:
    """True when the native kernels are built and registered (building them on the first call)."""
    if os.environ.get(OPT_OUT, "").strip() == "0":
        return False
    with _lock:
        if "ok" not in _state:
            try:
                _load()
                _state["ok"] = True
            except Exception as e:  # noqa: BLE001 - any failure means: use the XLA code
                _state["ok"] = False
                _state["error"] = f"{type(e).__name__}: {e}"
                print(f"jaxtl: native CPU kernels unavailable ({_state['error']}); using XLA's slower "
                      f"depthwise kernel gradient and attention (set {OPT_OUT}=0 to skip the build)", file=sys.stderr)
        return _state["ok"]


def depthwise_kernel_grad(padded, grad, kernel_size: tuple[int, int], stride: int, dilation: int):
    """``sum(window_t(padded) * grad)`` per tap t and channel: a (kh * kw, C) float32 array.

    ``padded`` (N, Hp, Wp, C) and ``grad`` (N, Ho, Wo, C), float32 NHWC; CPU
    only; where :func:`available` is False, this raises (callers check it first)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    _check_available()
    kh, kw = kernel_size
    call = jax.ffi.ffi_call("jaxtl_depthwise_kernel_grad", jax.ShapeDtypeStruct((kh * kw, padded.shape[-1]),
                                                                              jnp.float32))
    return call(padded.astype(jnp.float32), grad.astype(jnp.float32), kh=np.int64(kh), kw=np.int64(kw),
                stride=np.int64(stride), dilation=np.int64(dilation))


def usable() -> bool:
    """True when JAX computes on the CPU by default and the kernels are available:
    the callers' trace-time choice (``lax.platform_dependent`` still covers a
    function compiled for another device)."""
    import jax

    return jax.default_backend() == "cpu" and available()


def _check_available() -> None:
    if not available():
        raise RuntimeError(f"jaxtl's native CPU kernels are not available ({_state.get('error', f'{OPT_OUT}=0')}); "
                           "use the XLA code path")


ATTENTION_LANES = 16   # head_dim must be a multiple of this (attention.cc's vector width)


def attention_forward(q, k, v, scale: float):
    """Softmax attention per (image, head): ``(y, lse)``.

    ``q``, ``k``, ``v`` (batch, tokens, heads, head_dim) float32 with head_dim a
    multiple of 16; ``y`` has their shape, ``lse`` (batch, heads, tokens) is the
    log of each softmax row's denominator (the backward's residual). CPU only."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    _check_available()
    b, t, h, _ = q.shape
    # vmap (an ensemble, per-example gradients) runs the kernel once per mapped slice
    call = jax.ffi.ffi_call("jaxtl_attention_forward", (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                                         jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
                            vmap_method="sequential")
    return call(q, k, v, scale=np.float32(scale))


def attention_backward(q, k, v, y, lse, dy, scale: float):
    """``(dq, dk, dv)`` of :func:`attention_forward` for the output gradient ``dy``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    _check_available()
    like = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    call = jax.ffi.ffi_call("jaxtl_attention_backward", (like, like, like), vmap_method="sequential")
    return call(q, k, v, y, dy, lse, scale=np.float32(scale))
