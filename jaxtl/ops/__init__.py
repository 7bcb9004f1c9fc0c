"""Operations with more than one implementation: a plain reference and fast paths.

Model code (:mod:`jaxtl.models`) calls these for what PyTorch computes; which
implementation runs is decided here, never inside a model.

========================  ====================================  ===============================================
op                        reference                             fast path (the default)
========================  ====================================  ===============================================
``conv2d``                ``lax.conv_general_dilated``          one matmul for 1x1 and patch (kernel = stride)
                                                                convolutions and on maps of <= 4 pixels; an
                                                                optional fusion barrier before it on CPU
``depthwise_conv2d``      grouped ``lax.conv_general_dilated``  kh*kw shifted multiply-adds with a one-pass
                                                                kernel gradient (native on CPU); CPU only
``layer_norm``            two-pass statistics, autodiff         the same forward, a closed-form backward
``max_pool2d``            ``lax.reduce_window``, autodiff       a running maximum over the taps, a closed-form
                                                                backward
``multi_head_attention``  batched matmuls and a softmax         a fused native kernel on CPU (float32, head_dim
                                                                a multiple of 16)
========================  ====================================  ===============================================

Every fast path gives its reference's result to float32 rounding (tests in
``tests/test_ops.py`` and ``tests/test_layers.py``); they exist because XLA's
CPU backend runs the plain forms slowly (docs/performance.md). To run a model
on the references alone, trace it inside :func:`reference_implementations`::

    with jaxtl.ops.reference_implementations():
        logits = jax.jit(model.apply)(variables, images)

The C++ kernels and their build live in :mod:`jaxtl.ops.native`.
"""

from __future__ import annotations

from jaxtl.ops.config import fast_paths_enabled, reference_implementations
from jaxtl.ops.attention import multi_head_attention, multi_head_attention_reference
from jaxtl.ops.conv import conv2d, conv2d_reference, output_size
from jaxtl.ops.depthwise import DEPTHWISE_IMPLS, depthwise_conv2d, depthwise_impl
from jaxtl.ops.norm import layer_norm, layer_norm_reference
from jaxtl.ops.pool import max_pool2d, max_pool2d_reference

__all__ = ["reference_implementations", "fast_paths_enabled", "multi_head_attention",
           "multi_head_attention_reference", "conv2d",
           "conv2d_reference", "output_size", "DEPTHWISE_IMPLS", "depthwise_conv2d", "depthwise_impl",
           "layer_norm", "layer_norm_reference", "max_pool2d", "max_pool2d_reference"]
