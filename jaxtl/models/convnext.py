"""ConvNeXt-T/S/B (Liu et al. 2022) and their weights.

torchvision's ``convnext_*`` and timm's ``convnext_*`` build the same network
(checked on the installed sources and state dicts):

* stem: 4x4 conv with stride 4 (no padding, with bias), LayerNorm;
* four stages of blocks; stages 2-4 start with a downsampling layer:
  LayerNorm, then a 2x2 conv with stride 2 (with bias);
* block: 7x7 depthwise conv (padding 3, with bias) -> LayerNorm -> Linear to
  4 x C -> exact GELU -> Linear back to C -> per-channel layer scale ->
  stochastic depth -> + input;
* head: global average pooling, LayerNorm, one Linear;
* every LayerNorm normalises over the channels with eps 1e-6. PyTorch
  permutes NCHW to channels-last for it (torchvision's ``LayerNorm2d``, timm's
  ``LayerNorm2d`` / ``LayerNorm``): in NHWC that is a plain last-axis
  LayerNorm;
* stochastic depth of block i of n (over the whole network) is
  ``drop_path_rate * i / (n - 1)``.

They differ in tensor names (per-source key maps; torchvision stores the
layer scale as (C, 1, 1), timm's ``gamma`` as (C,)) and in the default
stochastic-depth rate (torchvision 0.1 / 0.4 / 0.5 for T / S / B, timm 0): the
sources' ``model_kwargs``. Neither has dropout before the classifier by
default.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from jaxtl.models.layers import (DepthwiseConv, Dropout, check_rates, conv, dense, gelu_exact, global_avg_pool,
                                 inference_mode, param, stochastic_depth)
from jaxtl.registry import (
    BackboneSpec,
    Preprocessing,
    SourceSpec,
    TableKeyMap,
    register,
    timm_preprocessing,
    torchvision_weights,
    timm_hub_weights,
)

# name: (blocks per stage, channels per stage)
VARIANTS = {
    "convnext_tiny": ((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnext_small": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "convnext_base": ((3, 3, 27, 3), (128, 256, 512, 1024)),
}

LN_EPSILON = 1e-6


def layer_norm(dtype: Any, name: str, epsilon: float = LN_EPSILON) -> nn.LayerNorm:
    # Two-pass variance like PyTorch's layer_norm (E[x^2] - E[x]^2 loses
    # digits on the residual stream, whose mean can be far from 0);
    # statistics in float32.
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False, name=name)


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Stochastic-depth rate of each block, in network order: linear from 0 at
    the first block to the full rate at the last, ``rate * i / (n - 1)``
    (torchvision; timm's ``linspace(0, rate, n)`` is the same)."""
    if num_blocks < 2:
        return [0.0] * num_blocks
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


class ConvNeXtBlock(nn.Module):
    drop_path_rate: float = 0.0
    layer_scale_init: float = 1e-6
    dtype: Any = jnp.float32
    depthwise_impl: str | None = None
    axis_name: str | None = None   # the axis a train step is mapped over: drop-path masks per global example

    @nn.compact
    def __call__(self, x, deterministic: bool):
        channels = x.shape[-1]
        y = DepthwiseConv(7, 1, 3, use_bias=True, dtype=self.dtype, impl=self.depthwise_impl, name="dw_conv")(x)
        y = layer_norm(self.dtype, "norm")(y)
        y = dense(4 * channels, dtype=self.dtype, name="fc1")(y)
        y = gelu_exact(y)
        y = dense(channels, dtype=self.dtype, name="fc2")(y)
        gamma = param(self, "layer_scale", nn.initializers.constant(self.layer_scale_init), (channels,), jnp.float32)
        y = y * gamma.astype(y.dtype)
        return x + stochastic_depth(self, y, self.drop_path_rate, deterministic, self.axis_name)


class ConvNeXt(nn.Module):
    """ConvNeXt on NHWC float input (normalised with the backbone's mean/std).

    There is no BatchNorm: ``train`` switches on stochastic depth
    (``drop_path_rate``, the rate of the last block) and the dropout before
    the classifier (``drop_rate``), both drawing from the ``'dropout'`` rng
    and both off in groups named in ``frozen``. ``features_only=True``
    returns the pooled, normalised features the classifier sees.
    ``axis_name`` is the axis a train step is mapped over: there is no
    BatchNorm to synchronise, but stochastic depth and dropout draw each
    example's mask from its position in the global batch.
    """

    depths: Sequence[int] = (3, 3, 9, 3)
    dims: Sequence[int] = (96, 192, 384, 768)
    num_classes: int = 1000
    dtype: Any = jnp.float32
    ln_epsilon: float = LN_EPSILON
    layer_scale_init: float = 1e-6
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    axis_name: str | None = None
    depthwise_impl: str | None = None  # None: jaxtl.ops.depthwise_impl's default

    def __post_init__(self):
        check_rates(self, "ConvNeXt")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: Sequence[str] = (), features_only: bool = False):
        norm = partial(layer_norm, self.dtype, epsilon=self.ln_epsilon)
        x = x.astype(self.dtype)
        # Kernel = stride = 4, no padding: one embedding per 4x4 patch.
        x = conv(self.dims[0], 4, 4, 0, use_bias=True, dtype=self.dtype, name="stem_conv")(x)
        x = norm(name="stem_norm")(x)
        rates = iter(drop_path_rates(self.drop_path_rate, sum(self.depths)))
        for s, (depth, width) in enumerate(zip(self.depths, self.dims)):
            group = f"stage{s + 1}"
            if s > 0:
                x = norm(name=f"{group}_downsample_norm")(x)
                x = conv(width, 2, 2, 0, use_bias=True, dtype=self.dtype, name=f"{group}_downsample_conv")(x)
            for j in range(depth):
                x = ConvNeXtBlock(next(rates), self.layer_scale_init, self.dtype, self.depthwise_impl, self.axis_name,
                                  name=f"{group}_{j}")(x, inference_mode(train, group, frozen))
        x = global_avg_pool(x)
        x = norm(name="head_norm")(x)
        if features_only:
            return x.astype(jnp.float32)
        if self.drop_rate > 0:
            x = Dropout(self.drop_rate, axis_name=self.axis_name)(x, inference_mode(train, "head", frozen))
        x = dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Key maps.


def _layer_scale_from_torchvision(w: np.ndarray) -> np.ndarray:
    """torchvision's (C, 1, 1) ``layer_scale`` as the (C,) Flax parameter."""
    if w.ndim == 3 and w.shape[1:] == (1, 1):
        return w.reshape(-1)
    return w  # the converter reports the shape mismatch with the key's name


def module_names(variant: str, source: str) -> dict[tuple[str, ...], str]:
    """Flax module path -> PyTorch module name (``layer_scale`` -> the parameter's key)."""
    depths, _ = VARIANTS[variant]
    table: dict[tuple[str, ...], str] = {}

    def add(flax_module: str, torch_module: str):
        table[tuple(flax_module.split("/"))] = torch_module

    if source == "torchvision":
        # features: 0 stem, then blocks of stage 1, downsample + blocks of stage 2, ...
        add("stem_conv", "features.0.0")
        add("stem_norm", "features.0.1")
        for s, depth in enumerate(depths):
            stage = f"stage{s + 1}"
            if s > 0:
                add(f"{stage}_downsample_norm", f"features.{2 * s}.0")
                add(f"{stage}_downsample_conv", f"features.{2 * s}.1")
            for j in range(depth):
                # block: Sequential(dw conv, Permute, LayerNorm, Linear, GELU, Linear, Permute)
                prefix = f"features.{2 * s + 1}.{j}"
                add(f"{stage}_{j}/dw_conv", f"{prefix}.block.0")
                add(f"{stage}_{j}/norm", f"{prefix}.block.2")
                add(f"{stage}_{j}/fc1", f"{prefix}.block.3")
                add(f"{stage}_{j}/fc2", f"{prefix}.block.5")
                add(f"{stage}_{j}/layer_scale", f"{prefix}.layer_scale")
        add("head_norm", "classifier.0")
        add("classifier", "classifier.2")  # classifier.1 is the Flatten
    elif source == "timm":
        add("stem_conv", "stem.0")
        add("stem_norm", "stem.1")
        for s, depth in enumerate(depths):
            stage = f"stage{s + 1}"
            if s > 0:
                add(f"{stage}_downsample_norm", f"stages.{s}.downsample.0")
                add(f"{stage}_downsample_conv", f"stages.{s}.downsample.1")
            for j in range(depth):
                prefix = f"stages.{s}.blocks.{j}"
                add(f"{stage}_{j}/dw_conv", f"{prefix}.conv_dw")
                add(f"{stage}_{j}/norm", f"{prefix}.norm")
                add(f"{stage}_{j}/fc1", f"{prefix}.mlp.fc1")
                add(f"{stage}_{j}/fc2", f"{prefix}.mlp.fc2")
                add(f"{stage}_{j}/layer_scale", f"{prefix}.gamma")
        add("head_norm", "head.norm")
        add("classifier", "head.fc")
    else:
        raise ValueError(f"unknown source {source!r}")
    return table


class ConvNeXtKeyMap(TableKeyMap):
    """``("params", "stage2_0", "fc1", "kernel")`` -> its PyTorch key; the layer
    scale is a leaf here and its own parameter there."""

    def __init__(self, variant: str, source: str):
        super().__init__(variant, source, module_names(variant, source))

    def torch_key(self, collection, modules, leaf):
        if collection == "params" and leaf == "layer_scale":
            key = self.table[(*modules, leaf)]
            return (key, _layer_scale_from_torchvision) if self.source == "torchvision" else key
        return super().torch_key(collection, modules, leaf)


# ---------------------------------------------------------------------------
# Registration.

# torchvision's only weights (IMAGENET1K_V1 = DEFAULT): crop 224 after
# resizing to 236 / 230 / 232, bilinear.
_TORCHVISION_WEIGHTS = {
    "convnext_tiny": [("IMAGENET1K_V1", "convnext_tiny-983f1562.pth", Preprocessing(224, 236))],
    "convnext_small": [("IMAGENET1K_V1", "convnext_small-0c510722.pth", Preprocessing(224, 230))],
    "convnext_base": [("IMAGENET1K_V1", "convnext_base-6075fbad.pth", Preprocessing(224, 232))],
}
# timm's 224-px tags with an ImageNet-1k classifier, timm's default first
# (tag, crop_pct); all bicubic with ImageNet mean/std. Left out: the 384-px
# fine-tunes (crop_mode 'squash'), the CLIP ones (other mean/std, 256-320 px)
# and the headless / 12k / 22k-class ones.
_TIMM_WEIGHTS = {
    "convnext_tiny": [("in12k_ft_in1k", 0.95), ("fb_in22k_ft_in1k", 0.875), ("fb_in1k", 0.875)],
    "convnext_small": [("in12k_ft_in1k", 0.95), ("fb_in22k_ft_in1k", 0.875), ("fb_in1k", 0.875)],
    "convnext_base": [("fb_in22k_ft_in1k", 0.875), ("fb_in1k", 0.875)],
}
# torchvision's builders default to stochastic_depth_prob 0.1 / 0.4 / 0.5
# (active only in train mode); timm's to drop_path_rate 0.
_TORCHVISION_DROP_PATH_RATE = {"convnext_tiny": 0.1, "convnext_small": 0.4, "convnext_base": 0.5}


def layer_groups(variant: str):
    depths, _ = VARIANTS[variant]
    groups = [("stem", (("stem_conv",), ("stem_norm",)))]
    for s, depth in enumerate(depths):
        stage = f"stage{s + 1}"
        downsample = ((f"{stage}_downsample_norm",), (f"{stage}_downsample_conv",)) if s > 0 else ()
        groups.append((stage, (*downsample, *((f"{stage}_{j}",) for j in range(depth)))))
    groups.append(("head_norm", (("head_norm",),)))
    groups.append(("head", (("classifier",),)))
    return tuple(groups)


_DESCRIPTIONS = {"convnext_tiny": "ConvNeXt-T", "convnext_small": "ConvNeXt-S", "convnext_base": "ConvNeXt-B"}


def _register_all() -> None:
    for name, (depths, dims) in VARIANTS.items():
        tv_weights = tuple(torchvision_weights(tag, fname, pre)
                           for tag, fname, pre in _TORCHVISION_WEIGHTS[name])
        timm_weights = tuple(timm_hub_weights(name, tag, timm_preprocessing(224, crop_pct, "bicubic"))
                             for tag, crop_pct in _TIMM_WEIGHTS[name])
        # DINOv3's distilled ConvNeXts: timm's own network without a classifier (224 px, crop 1.0).
        timm_weights += (timm_hub_weights(name, "dinov3_lvd1689m", timm_preprocessing(224, 1.0, "bicubic"),
                                          num_classes=0),)
        register(BackboneSpec(
            name=name,
            family="convnext",
            constructor=partial(ConvNeXt, depths=depths, dims=dims),
            sources={
                "torchvision": SourceSpec("torchvision", name, ConvNeXtKeyMap(name, "torchvision"), tv_weights,
                                          model_kwargs=dict(drop_path_rate=_TORCHVISION_DROP_PATH_RATE[name])),
                "timm": SourceSpec("timm", name, ConvNeXtKeyMap(name, "timm"), timm_weights,
                                   model_kwargs=dict(drop_path_rate=0.0)),
            },
            layer_groups=layer_groups(name),
            head_path=("classifier",),
            preprocessing=tv_weights[0].preprocessing,
            num_features=dims[-1],
            description=(f"{_DESCRIPTIONS[name]} (7x7 depthwise conv, LayerNorm, GELU MLP, layer scale; "
                         f"depths {'-'.join(map(str, depths))}, widths {'-'.join(map(str, dims))})"),
        ))


_register_all()
