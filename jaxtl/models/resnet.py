"""ResNet-18/34/50/101/152 (torchvision's architecture, v1.5) and its weights.

v1.5: a bottleneck block strides on its 3x3 convolution, not the first 1x1.
timm's ``resnet*`` models use the same layout and the same tensor names as
torchvision, so one key map serves both sources.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn

from jaxtl.models.layers import BatchNorm, conv, dense, global_avg_pool, max_pool, inference_mode
from jaxtl.registry import (
    BackboneSpec,
    Preprocessing,
    SourceSpec,
    register,
    standard_key_map,
    timm_preprocessing,
    torchvision_weights,
    timm_hub_weights,
)


class BasicBlock(nn.Module):
    features: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    norm: Any = BatchNorm
    expansion = 1

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        residual = x
        # materialize_input: else XLA recomputes these inputs inside the kernel gradient (jaxtl.ops.conv.materialized).
        y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv1", materialize_input=True)(x)
        y = nn.relu(self.norm(name="bn1")(y, use_running_average))
        y = conv(self.features, 3, 1, dtype=self.dtype, name="conv2", materialize_input=True)(y)
        y = self.norm(name="bn2")(y, use_running_average)
        if self.downsample:
            residual = conv(self.features, 1, self.stride, dtype=self.dtype, name="downsample_0")(x)
            residual = self.norm(name="downsample_1")(residual, use_running_average)
        return nn.relu(y + residual)


class Bottleneck(nn.Module):
    features: int
    stride: int = 1
    downsample: bool = False
    dtype: Any = jnp.float32
    norm: Any = BatchNorm
    expansion = 4

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        residual = x
        y = conv(self.features, 1, 1, dtype=self.dtype, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y, use_running_average))
        y = conv(self.features, 3, self.stride, dtype=self.dtype, name="conv2", materialize_input=True)(y)  # v1.5
        y = nn.relu(self.norm(name="bn2")(y, use_running_average))
        y = conv(self.features * 4, 1, 1, dtype=self.dtype, name="conv3")(y)
        y = self.norm(name="bn3")(y, use_running_average)
        if self.downsample:
            residual = conv(self.features * 4, 1, self.stride, dtype=self.dtype, name="downsample_0")(x)
            residual = self.norm(name="downsample_1")(residual, use_running_average)
        return nn.relu(y + residual)


class ResNet(nn.Module):
    """ResNet on NHWC float input (normalised with the backbone's mean/std).

    ``train=True`` normalises with batch statistics and updates ``batch_stats``
    (apply with ``mutable=["batch_stats"]``); groups named in ``frozen`` always
    use running statistics. ``features_only=True`` returns the pooled features
    that feed the head.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    num_classes: int = 1000
    dtype: Any = jnp.float32
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9       # PyTorch momentum 0.1
    grad_checkpointing: bool = False  # recompute each block's activations in the backward pass
    axis_name: str | None = None   # synchronise BatchNorm statistics across devices

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: Sequence[str] = (), features_only: bool = False):
        block_cls = BasicBlock if self.block == "basic" else Bottleneck
        norm = partial(BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, axis_name=self.axis_name)
        x = x.astype(self.dtype)
        x = conv(64, 7, 2, 3, dtype=self.dtype, name="conv1")(x)
        x = nn.relu(norm(name="bn1")(x, inference_mode(train, "stem", frozen)))
        x = max_pool(x, 3, 2, 1)
        in_features = 64
        for i, n_blocks in enumerate(self.stage_sizes):
            group = f"layer{i + 1}"
            features = 64 * 2 ** i
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                downsample = j == 0 and (stride != 1 or in_features != features * block_cls.expansion)
                make = nn.remat(block_cls, static_argnums=(2,)) if self.grad_checkpointing else block_cls
                x = make(features, stride, downsample, self.dtype, norm, name=f"{group}_{j}")(
                    x, inference_mode(train, group, frozen))
                in_features = features * block_cls.expansion
        x = global_avg_pool(x)
        if features_only:
            return x
        x = dense(self.num_classes, dtype=self.dtype, name="fc")(x)
        return x.astype(jnp.float32)


_ARCHS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
    "resnet101": ("bottleneck", (3, 4, 23, 3)),
    "resnet152": ("bottleneck", (3, 8, 36, 3)),
}

# torchvision's published ImageNet weights; the first one is torchvision's DEFAULT.
_TV_V1 = Preprocessing(224, 256)   # resize 256, crop 224, bilinear
_TV_V2 = Preprocessing(224, 232)   # the "new training recipe" weights: resize 232
_TORCHVISION_WEIGHTS = {
    "resnet18": [("IMAGENET1K_V1", "resnet18-f37072fd.pth", _TV_V1)],
    "resnet34": [("IMAGENET1K_V1", "resnet34-b627a593.pth", _TV_V1)],
    "resnet50": [("IMAGENET1K_V2", "resnet50-11ad3fa6.pth", _TV_V2),
                 ("IMAGENET1K_V1", "resnet50-0676ba61.pth", _TV_V1)],
    "resnet101": [("IMAGENET1K_V2", "resnet101-cd907fc2.pth", _TV_V2),
                  ("IMAGENET1K_V1", "resnet101-63fe2227.pth", _TV_V1)],
    "resnet152": [("IMAGENET1K_V2", "resnet152-f82ba261.pth", _TV_V2),
                  ("IMAGENET1K_V1", "resnet152-394f9c45.pth", _TV_V1)],
}
# timm's default pretrained tags ("ResNet strikes back" recipes): eval at
# crop_pct 0.95, bicubic.
_TIMM_TAGS = {"resnet18": "a1_in1k", "resnet34": "a1_in1k", "resnet50": "a1_in1k",
              "resnet101": "a1h_in1k", "resnet152": "a1h_in1k"}


def _layer_groups(stage_sizes: Sequence[int]):
    return (
        ("stem", (("conv1",), ("bn1",))),
        *[(f"layer{i + 1}", tuple((f"layer{i + 1}_{j}",) for j in range(n))) for i, n in enumerate(stage_sizes)],
        ("head", (("fc",),)),
    )


def _register_all() -> None:
    for name, (block, stages) in _ARCHS.items():
        tv_weights = tuple(torchvision_weights(tag, fname, pre) for tag, fname, pre in _TORCHVISION_WEIGHTS[name])
        timm_weights = (timm_hub_weights(name, _TIMM_TAGS[name], timm_preprocessing(224, 0.95, "bicubic")),)
        register(BackboneSpec(
            name=name,
            family="resnet",
            constructor=partial(ResNet, stage_sizes=stages, block=block),
            sources={
                "torchvision": SourceSpec("torchvision", name, standard_key_map, tv_weights),
                "timm": SourceSpec("timm", name, standard_key_map, timm_weights),
            },
            layer_groups=_layer_groups(stages),
            head_path=("fc",),
            preprocessing=tv_weights[0].preprocessing,
            num_features=512 if block == "basic" else 2048,
            description=f"ResNet-{name[6:]} ({'basic' if block == 'basic' else 'bottleneck'} blocks, v1.5)",
        ))


_register_all()
