"""EfficientNet-B0 ... B7 (Tan & Le 2019) and their weights.

torchvision's ``efficientnet_b*`` and timm's ``efficientnet_b*`` (the
PyTorch-native ones, not timm's ``tf_efficientnet_b*`` ports, which pad
TF-style and use BatchNorm eps 1e-3) build the same network; checked on the
installed sources and on the state dicts, whose tensor shapes agree one for
one for every variant:

* width multiplier on every channel count, rounded to a multiple of 8 by the
  TF-slim rule (:func:`jaxtl.models.layers.make_divisible`); depth
  multiplier on the repeats of each stage, rounded up;
* MBConv blocks: [1x1 expand] -> kxk depthwise -> squeeze-excitation ->
  1x1 project, BatchNorm after each conv, SiLU after all but the projection,
  symmetric padding (k - 1) / 2;
* squeeze-excitation on the expanded tensor, its squeeze width a quarter of
  the block's *input* channels (torchvision ``input_channels // 4``, timm
  ``round(expanded * 0.25 / expand_ratio)``: the same numbers), SiLU inside,
  sigmoid gate;
* stochastic depth on the residual branch of blocks with a skip connection,
  block i of n drops with ``drop_path_rate * i / n``;
* a 1x1 head conv to 4 x the last stage's width (= make_divisible(1280 x
  width)), then global average pooling, dropout and one Linear.

The sources differ in tensor names (per-source key maps), BatchNorm
(torchvision B5-B7: eps 1e-3, momentum 0.01; everything else PyTorch's
defaults), classifier dropout and stochastic-depth defaults (torchvision
0.2-0.5 and 0.2; timm 0 and 0): the sources' ``model_kwargs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxtl.models.layers import (
    BatchNorm,
    DepthwiseConv,
    Dropout,
    check_rates,
    conv,
    dense,
    global_avg_pool,
    inference_mode,
    make_divisible,
    SqueezeExcite,
    stochastic_depth,
)
from jaxtl.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    BackboneSpec,
    Preprocessing,
    SourceSpec,
    TableKeyMap,
    conv1x1_to_dense,
    register,
    timm_preprocessing,
    torchvision_weights,
    timm_hub_weights,
)

# ---------------------------------------------------------------------------
# Architecture.

# EfficientNet-B0 (paper, table 1): per stage expansion, kernel, first
# stride, output channels, repeats. The stem has 32 channels.
_B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
              (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
_B0_STEM = 32

# name: (width multiplier, depth multiplier)
VARIANTS = {
    "efficientnet_b0": (1.0, 1.0),
    "efficientnet_b1": (1.0, 1.1),
    "efficientnet_b2": (1.1, 1.2),
    "efficientnet_b3": (1.2, 1.4),
    "efficientnet_b4": (1.4, 1.8),
    "efficientnet_b5": (1.6, 2.2),
    "efficientnet_b6": (1.8, 2.6),
    "efficientnet_b7": (2.0, 3.1),
}


@dataclass(frozen=True)
class MBConvConfig:
    in_features: int
    expanded: int
    out_features: int
    kernel_size: int
    stride: int
    se_features: int

    @property
    def has_expand(self) -> bool:
        return self.expanded != self.in_features

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_features == self.out_features


@dataclass(frozen=True)
class Architecture:
    stem_features: int
    stages: tuple[tuple[MBConvConfig, ...], ...]
    head_features: int

    @property
    def num_blocks(self) -> int:
        return sum(len(s) for s in self.stages)


def architecture(width_mult: float = 1.0, depth_mult: float = 1.0) -> Architecture:
    def width(c: float) -> int:
        return make_divisible(c * width_mult)

    in_features = width(_B0_STEM)
    stem, stages = in_features, []
    for expand_ratio, kernel, stride, out, repeats in _B0_STAGES:
        out = width(out)
        blocks = []
        for i in range(math.ceil(repeats * depth_mult)):
            blocks.append(MBConvConfig(
                in_features=in_features,
                expanded=make_divisible(in_features * expand_ratio),
                out_features=out,
                kernel_size=kernel,
                stride=stride if i == 0 else 1,
                se_features=max(1, in_features // 4),
            ))
            in_features = out
        stages.append(tuple(blocks))
    return Architecture(stem, tuple(stages), 4 * in_features)


# ---------------------------------------------------------------------------
# Modules.


def drop_path_rates(drop_path_rate: float, num_blocks: int) -> list[float]:
    """Stochastic-depth rate of each block, in network order: linear in the
    block's position, ``rate * i / n`` (torchvision and timm alike), so the
    first block never drops and the last one almost at the full rate."""
    return [drop_path_rate * i / num_blocks for i in range(num_blocks)]


class MBConv(nn.Module):
    cfg: MBConvConfig
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    norm: Any = BatchNorm
    depthwise_impl: str | None = None
    axis_name: str | None = None   # the axis a train step is mapped over: drop-path masks per global example

    @nn.compact
    def __call__(self, x, use_running_average: bool, deterministic: bool):
        cfg = self.cfg
        y = x
        if cfg.has_expand:
            y = conv(cfg.expanded, 1, dtype=self.dtype, name="expand_conv")(y)
            y = nn.silu(self.norm(name="expand_bn")(y, use_running_average))
        y = DepthwiseConv(cfg.kernel_size, cfg.stride, dtype=self.dtype, impl=self.depthwise_impl,
                          name="dw_conv")(y)
        y = nn.silu(self.norm(name="dw_bn")(y, use_running_average))
        y = SqueezeExcite(cfg.se_features, nn.silu, nn.sigmoid, dtype=self.dtype, name="se")(y)
        y = conv(cfg.out_features, 1, dtype=self.dtype, name="project_conv")(y)
        y = self.norm(name="project_bn")(y, use_running_average)  # linear bottleneck: no activation
        if not cfg.residual:
            return y
        return x + stochastic_depth(self, y, self.drop_path_rate, deterministic, self.axis_name)


class EfficientNet(nn.Module):
    """EfficientNet-B0...B7 on NHWC float input (normalised with the backbone's mean/std).

    ``train=True`` normalises with batch statistics and updates
    ``batch_stats`` (apply with ``mutable=["batch_stats"]``); groups named in
    ``frozen`` use running statistics and no stochastic depth / dropout.
    Stochastic depth (block i of n drops its residual branch with
    ``drop_path_rate * i / n``) and the dropout before the classifier
    (``drop_rate``) need the ``'dropout'`` rng when active. ``features_only=True`` returns the pooled
    features the classifier sees (before dropout). ``axis_name`` synchronises
    BatchNorm statistics across devices and places each example in the global
    batch, from which its stochastic-depth and dropout masks are drawn.
    """

    width_mult: float = 1.0
    depth_mult: float = 1.0
    num_classes: int = 1000
    dtype: Any = jnp.float32
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9       # Flax convention: PyTorch momentum 0.1
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    axis_name: str | None = None
    depthwise_impl: str | None = None  # None: jaxtl.ops.depthwise_impl's default

    def __post_init__(self):
        check_rates(self, "EfficientNet")
        super().__post_init__()

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: Sequence[str] = (), features_only: bool = False):
        arch = architecture(self.width_mult, self.depth_mult)
        norm = partial(BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, axis_name=self.axis_name)

        x = x.astype(self.dtype)
        x = conv(arch.stem_features, 3, 2, dtype=self.dtype, name="stem_conv")(x)
        x = nn.silu(norm(name="stem_bn")(x, inference_mode(train, "stem", frozen)))
        rates = iter(drop_path_rates(self.drop_path_rate, arch.num_blocks))
        for s, stage in enumerate(arch.stages):
            group = f"stage{s + 1}"
            for j, cfg in enumerate(stage):
                block = MBConv(cfg, next(rates), self.dtype, norm, self.depthwise_impl, self.axis_name,
                               name=f"{group}_{j}")
                x = block(x, inference_mode(train, group, frozen), inference_mode(train, group, frozen))
        x = conv(arch.head_features, 1, dtype=self.dtype, name="head_conv")(x)
        x = nn.silu(norm(name="head_bn")(x, inference_mode(train, "head_conv", frozen)))
        x = global_avg_pool(x)
        if features_only:
            return x
        if self.drop_rate > 0:
            x = Dropout(self.drop_rate, axis_name=self.axis_name)(x, inference_mode(train, "head", frozen))
        x = dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Key maps: Flax module path -> PyTorch module name, per source.


def _torchvision_block(cfg: MBConvConfig, prefix: str) -> dict[str, str]:
    # features.<stage>.<block>.block: Sequential([expand], dw, SE, project); each
    # conv is a Conv2dNormActivation (.0 conv, .1 BatchNorm).
    names, k = {}, 0
    if cfg.has_expand:
        names.update(expand_conv=f"{prefix}.block.{k}.0", expand_bn=f"{prefix}.block.{k}.1")
        k += 1
    names.update(dw_conv=f"{prefix}.block.{k}.0", dw_bn=f"{prefix}.block.{k}.1")
    names.update({"se/reduce": f"{prefix}.block.{k + 1}.fc1", "se/expand": f"{prefix}.block.{k + 1}.fc2"})
    names.update(project_conv=f"{prefix}.block.{k + 2}.0", project_bn=f"{prefix}.block.{k + 2}.1")
    return names


def _timm_block(cfg: MBConvConfig, prefix: str) -> dict[str, str]:
    # Without expansion timm builds a DepthwiseSeparableConv (conv_dw, bn1, se,
    # conv_pw, bn2), otherwise an InvertedResidual (conv_pw, bn1, conv_dw, bn2,
    # se, conv_pwl, bn3).
    se = {"se/reduce": f"{prefix}.se.conv_reduce", "se/expand": f"{prefix}.se.conv_expand"}
    if cfg.has_expand:
        return {"expand_conv": f"{prefix}.conv_pw", "expand_bn": f"{prefix}.bn1",
                "dw_conv": f"{prefix}.conv_dw", "dw_bn": f"{prefix}.bn2", **se,
                "project_conv": f"{prefix}.conv_pwl", "project_bn": f"{prefix}.bn3"}
    return {"dw_conv": f"{prefix}.conv_dw", "dw_bn": f"{prefix}.bn1", **se,
            "project_conv": f"{prefix}.conv_pw", "project_bn": f"{prefix}.bn2"}


def module_names(variant: str, source: str) -> dict[tuple[str, ...], str]:
    """Flax module path -> PyTorch module name."""
    arch = architecture(*VARIANTS[variant])
    table: dict[tuple[str, ...], str] = {}

    def add(flax_module: str, torch_module: str):
        table[tuple(flax_module.split("/"))] = torch_module

    if source == "torchvision":
        add("stem_conv", "features.0.0")
        add("stem_bn", "features.0.1")
        for s, stage in enumerate(arch.stages):
            for j, cfg in enumerate(stage):
                for layer, name in _torchvision_block(cfg, f"features.{s + 1}.{j}").items():
                    add(f"stage{s + 1}_{j}/{layer}", name)
        head = len(arch.stages) + 1
        add("head_conv", f"features.{head}.0")
        add("head_bn", f"features.{head}.1")
        add("classifier", "classifier.1")   # classifier.0 is the Dropout
    elif source == "timm":
        add("stem_conv", "conv_stem")
        add("stem_bn", "bn1")
        for s, stage in enumerate(arch.stages):
            for j, cfg in enumerate(stage):
                for layer, name in _timm_block(cfg, f"blocks.{s}.{j}").items():
                    add(f"stage{s + 1}_{j}/{layer}", name)
        add("head_conv", "conv_head")
        add("head_bn", "bn2")
        add("classifier", "classifier")
    else:
        raise ValueError(f"unknown source {source!r}")
    return table


class EfficientNetKeyMap(TableKeyMap):
    """``("params", "stage2_0", "se", "reduce", "kernel")`` -> its PyTorch key."""

    def __init__(self, variant: str, source: str):
        super().__init__(variant, source, module_names(variant, source))

    def torch_key(self, collection, modules, leaf):
        key = super().torch_key(collection, modules, leaf)
        if leaf == "kernel" and modules[-1] in ("reduce", "expand"):
            return key, conv1x1_to_dense  # the squeeze-excitation's 1x1 convs are Dense here
        return key


# ---------------------------------------------------------------------------
# Registration.



def _tv_bicubic(crop: int, resize: int) -> Preprocessing:
    return Preprocessing(crop, resize, interpolation="bicubic")


# torchvision's weights (the first is torchvision's DEFAULT): the V1 files
# are ports (B0-B4 from timm, B5-B7 from lukemelas/EfficientNet-PyTorch),
# evaluated with bicubic resizing; B1's V2 was trained with torchvision's
# recipe and evaluated with bilinear resizing.
_TORCHVISION_WEIGHTS = {
    "efficientnet_b0": [("IMAGENET1K_V1", "efficientnet_b0_rwightman-7f5810bc.pth", _tv_bicubic(224, 256))],
    "efficientnet_b1": [("IMAGENET1K_V2", "efficientnet_b1-c27df63c.pth", Preprocessing(240, 255)),
                        ("IMAGENET1K_V1", "efficientnet_b1_rwightman-bac287d4.pth", _tv_bicubic(240, 256))],
    "efficientnet_b2": [("IMAGENET1K_V1", "efficientnet_b2_rwightman-c35c1473.pth", _tv_bicubic(288, 288))],
    "efficientnet_b3": [("IMAGENET1K_V1", "efficientnet_b3_rwightman-b3899882.pth", _tv_bicubic(300, 320))],
    "efficientnet_b4": [("IMAGENET1K_V1", "efficientnet_b4_rwightman-23ab8bcd.pth", _tv_bicubic(380, 384))],
    "efficientnet_b5": [("IMAGENET1K_V1", "efficientnet_b5_lukemelas-1a07897c.pth", _tv_bicubic(456, 456))],
    "efficientnet_b6": [("IMAGENET1K_V1", "efficientnet_b6_lukemelas-24a108a5.pth", _tv_bicubic(528, 528))],
    "efficientnet_b7": [("IMAGENET1K_V1", "efficientnet_b7_lukemelas-c5b4e57e.pth", _tv_bicubic(600, 600))],
}

_SQUASH_NOTE = ("timm evaluates this tag with crop_mode='squash' (both sides resized to the input size, "
                "no crop); jaxtl's resize-shorter-side + center crop is the same only for square images")

# timm's pretrained tags with an ImageNet-1k classifier (the first is timm's
# default for the name), from timm's pretrained_cfg: (tag, input size,
# crop_pct, mean, std, note). timm has no weights for efficientnet_b6/b7
# (only for the differently built tf_efficientnet_b6/b7).
_TIMM_WEIGHTS = {
    "efficientnet_b0": [("ra_in1k", 224, 0.875, None, None, ""),
                        ("ra4_e3600_r224_in1k", 224, 0.9, INCEPTION_MEAN, INCEPTION_STD, "")],
    "efficientnet_b1": [("ra4_e3600_r240_in1k", 240, 0.9, INCEPTION_MEAN, INCEPTION_STD, ""),
                        ("ft_in1k", 224, 0.875, None, None, "")],
    "efficientnet_b2": [("ra_in1k", 256, 0.875, None, None, "")],
    "efficientnet_b3": [("ra2_in1k", 288, 0.875, None, None, "")],
    "efficientnet_b4": [("ra2_in1k", 320, 0.875, None, None, "")],
    "efficientnet_b5": [("sw_in12k_ft_in1k", 448, 1.0, None, None, _SQUASH_NOTE)],
    "efficientnet_b6": [],
    "efficientnet_b7": [],
}

# Classifier dropout of torchvision's builders (timm's default is 0).
_TORCHVISION_DROP_RATE = {"efficientnet_b0": 0.2, "efficientnet_b1": 0.2, "efficientnet_b2": 0.3,
                          "efficientnet_b3": 0.3, "efficientnet_b4": 0.4, "efficientnet_b5": 0.4,
                          "efficientnet_b6": 0.5, "efficientnet_b7": 0.5}
# torchvision's EfficientNet defaults to stochastic_depth_prob=0.2 (active
# only in train mode); timm's builders default to 0.
_TORCHVISION_DROP_PATH_RATE = 0.2


def _torchvision_kwargs(name: str) -> dict[str, Any]:
    # B5-B7 (ports of lukemelas' TF-trained weights): BatchNorm eps 1e-3,
    # momentum 0.01 (Flax 0.99); B0-B4 PyTorch's defaults.
    big = name in ("efficientnet_b5", "efficientnet_b6", "efficientnet_b7")
    return dict(bn_epsilon=1e-3 if big else 1e-5, bn_momentum=0.99 if big else 0.9,
                drop_rate=_TORCHVISION_DROP_RATE[name], drop_path_rate=_TORCHVISION_DROP_PATH_RATE)


_TIMM_KWARGS = dict(bn_epsilon=1e-5, bn_momentum=0.9, drop_rate=0.0, drop_path_rate=0.0)


def layer_groups(variant: str):
    arch = architecture(*VARIANTS[variant])
    groups = [("stem", (("stem_conv",), ("stem_bn",)))]
    for s, stage in enumerate(arch.stages):
        groups.append((f"stage{s + 1}", tuple((f"stage{s + 1}_{j}",) for j in range(len(stage)))))
    groups.append(("head_conv", (("head_conv",), ("head_bn",))))
    groups.append(("head", (("classifier",),)))
    return tuple(groups)


def _register_all() -> None:
    for name, (width_mult, depth_mult) in VARIANTS.items():
        tv_weights = tuple(torchvision_weights(tag, fname, pre)
                           for tag, fname, pre in _TORCHVISION_WEIGHTS[name])
        timm_weights = tuple(
            timm_hub_weights(name, tag, timm_preprocessing(size, crop_pct, "bicubic", mean or IMAGENET_MEAN,
                                                      std or IMAGENET_STD), note)
            for tag, size, crop_pct, mean, std, note in _TIMM_WEIGHTS[name])
        arch = architecture(width_mult, depth_mult)
        register(BackboneSpec(
            name=name,
            family="efficientnet",
            constructor=partial(EfficientNet, width_mult=width_mult, depth_mult=depth_mult),
            sources={
                "torchvision": SourceSpec("torchvision", name, EfficientNetKeyMap(name, "torchvision"), tv_weights,
                                          model_kwargs=_torchvision_kwargs(name)),
                "timm": SourceSpec("timm", name, EfficientNetKeyMap(name, "timm"), timm_weights,
                                   model_kwargs=_TIMM_KWARGS),
            },
            layer_groups=layer_groups(name),
            head_path=("classifier",),
            preprocessing=tv_weights[0].preprocessing,
            num_features=arch.head_features,
            description=(f"EfficientNet-B{name[-1]} (MBConv + squeeze-excitation, SiLU; "
                         f"width x{width_mult}, depth x{depth_mult})"),
        ))


_register_all()
