"""DenseNet-121/169/201 (DenseNet-BC, torchvision's architecture) and its weights.

Stem: 7x7/2 conv, BatchNorm, ReLU, 3x3/2 max-pool. Four dense blocks; each
layer sees the concatenation of the block input and every earlier layer's
output and adds ``growth_rate`` (32) channels: BN-ReLU-1x1 conv to
``bn_size * growth_rate`` (128) channels, BN-ReLU-3x3 conv to 32. Between
blocks a transition halves channels and resolution: BN-ReLU-1x1 conv-2x2
average pool. Then ``norm5``, ReLU, global average pool, classifier.

timm's ``densenet121/169/201`` are the same network with the same tensor
names (timm's copy of torchvision's code, its BatchNormAct2d holding the
BatchNorm and the ReLU), so one key map serves both sources.

Checkpoint names: torchvision's published ``.pth`` files predate a rename and
spell a dense layer's modules ``norm.1, conv.1, norm.2, conv.2`` where the
module now says ``norm1, conv1, norm2, conv2`` (torchvision and timm fix the
keys with a regex when loading). The sources' ``rename_keys`` hook
(:func:`modern_key_names`) accepts both spellings before keys are matched.
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any, Mapping, Sequence

import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from jaxtl.errors import ConfigError, ConversionError
from jaxtl.models.layers import BatchNorm, Dropout, conv, dense, global_avg_pool, max_pool, inference_mode
from jaxtl.registry import (
    BackboneSpec,
    FlaxPath,
    Preprocessing,
    SourceSpec,
    register,
    standard_key_map,
    timm_preprocessing,
    torchvision_weights,
    timm_hub_weights,
)

GROWTH_RATE = 32
BN_SIZE = 4
STEM_FEATURES = 2 * GROWTH_RATE
BLOCK_SIZES = {
    "densenet121": (6, 12, 24, 16),
    "densenet169": (6, 12, 32, 32),
    "densenet201": (6, 12, 48, 32),
}


def num_features(block_sizes: Sequence[int], growth_rate: int = GROWTH_RATE) -> int:
    """Channels after the last block: each layer adds ``growth_rate``, each transition halves."""
    features = 2 * growth_rate
    for i, n_layers in enumerate(block_sizes):
        features += n_layers * growth_rate
        if i < len(block_sizes) - 1:
            features //= 2
    return features


def _final_map_size(size: int, n_blocks: int) -> int:
    size = (size + 2 * 3 - 7) // 2 + 1    # conv0: 7x7, stride 2, padding 3
    size = (size + 2 * 1 - 3) // 2 + 1    # pool0: 3x3, stride 2, padding 1
    for _ in range(n_blocks - 1):
        size //= 2                        # transitions: 2x2 average pool
    return size


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv-BN-ReLU-3x3 conv; returns the ``growth_rate`` new channels."""

    growth_rate: int = GROWTH_RATE
    bn_size: int = BN_SIZE
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    norm: Any = BatchNorm
    axis_name: str | None = None   # the axis a train step is mapped over: dropout masks per global example

    @nn.compact
    def __call__(self, x, use_running_average: bool, deterministic: bool):
        y = nn.relu(self.norm(name="norm1")(x, use_running_average))
        y = conv(self.bn_size * self.growth_rate, 1, dtype=self.dtype, name="conv1")(y)
        y = nn.relu(self.norm(name="norm2")(y, use_running_average))
        y = conv(self.growth_rate, 3, 1, 1, dtype=self.dtype, name="conv2")(y)
        if self.drop_rate > 0:
            y = Dropout(self.drop_rate, axis_name=self.axis_name)(y, deterministic)
        return y


class DenseBlock(nn.Module):
    n_layers: int
    growth_rate: int = GROWTH_RATE
    bn_size: int = BN_SIZE
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    norm: Any = BatchNorm
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, use_running_average: bool, deterministic: bool):
        for i in range(self.n_layers):
            new = DenseLayer(self.growth_rate, self.bn_size, self.drop_rate, self.dtype, self.norm, self.axis_name,
                             name=f"denselayer{i + 1}")(x, use_running_average, deterministic)
            # Channel order as torch.cat([input, layer1, layer2, ...], dim=1).
            x = jnp.concatenate([x, new], axis=-1)
        return x


class Transition(nn.Module):
    """BN-ReLU-1x1 conv to ``features`` channels, 2x2 average pool (stride 2, floor)."""

    features: int
    dtype: Any = jnp.float32
    norm: Any = BatchNorm

    @nn.compact
    def __call__(self, x, use_running_average: bool):
        x = nn.relu(self.norm(name="norm")(x, use_running_average))
        x = conv(self.features, 1, dtype=self.dtype, name="conv")(x)
        return nn.avg_pool(x, (2, 2), (2, 2))


class DenseNet(nn.Module):
    """DenseNet-BC on NHWC float input (normalised with the backbone's mean/std).

    ``train=True`` normalises with batch statistics and updates ``batch_stats``
    (apply with ``mutable=["batch_stats"]``); groups named in ``frozen`` always
    use running statistics. ``drop_rate`` is dropout on the pooled features
    before the classifier (timm's ``drop_rate``, group "head");
    ``layer_drop_rate`` dropout on each dense layer's new channels
    (torchvision's ``drop_rate``, timm's ``proj_drop_rate``, group of the
    block). Both default to 0, as the published weights were trained; when
    positive they are active only with ``train=True`` in unfrozen groups (rng
    stream ``'dropout'``). ``features_only=True`` returns the pooled features
    that feed the classifier.
    """

    block_sizes: Sequence[int] = BLOCK_SIZES["densenet121"]
    growth_rate: int = GROWTH_RATE
    bn_size: int = BN_SIZE
    num_classes: int = 1000
    dtype: Any = jnp.float32
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9       # PyTorch momentum 0.1
    drop_rate: float = 0.0
    layer_drop_rate: float = 0.0
    axis_name: str | None = None   # synchronise BatchNorm statistics; dropout masks per global example

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: Sequence[str] = (), features_only: bool = False):
        if x.ndim != 4:
            raise ConfigError(f"DenseNet expects NHWC images (batch, height, width, channels), got shape {x.shape}")
        n_blocks = len(self.block_sizes)
        if min(_final_map_size(x.shape[1], n_blocks), _final_map_size(x.shape[2], n_blocks)) < 1:
            raise ConfigError(f"images of {x.shape[1]}x{x.shape[2]} px are too small for DenseNet "
                              "(its last block would get an empty feature map; use at least 29 px)")
        norm = partial(BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, axis_name=self.axis_name)
        x = x.astype(self.dtype)
        x = conv(2 * self.growth_rate, 7, 2, 3, dtype=self.dtype, name="conv0")(x)
        x = nn.relu(norm(name="norm0")(x, inference_mode(train, "stem", frozen)))
        x = max_pool(x, 3, 2, 1)

        features = 2 * self.growth_rate
        for i, n_layers in enumerate(self.block_sizes):
            group = f"block{i + 1}"
            use_running = inference_mode(train, group, frozen)
            x = DenseBlock(n_layers, self.growth_rate, self.bn_size, self.layer_drop_rate, self.dtype, norm,
                           self.axis_name, name=f"denseblock{i + 1}")(x, use_running, not train or group in frozen)
            features += n_layers * self.growth_rate
            if i < len(self.block_sizes) - 1:
                # The transition after a block belongs to that block's group.
                features //= 2
                x = Transition(features, self.dtype, norm, name=f"transition{i + 1}")(x, use_running)

        x = nn.relu(norm(name="norm5")(x, inference_mode(train, "norm5", frozen)))
        x = global_avg_pool(x)
        if features_only:
            return x
        if self.drop_rate > 0:
            x = Dropout(self.drop_rate, axis_name=self.axis_name)(x, not train or "head" in frozen)
        x = dense(self.num_classes, dtype=self.dtype, name="classifier")(x)
        return x.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Weight names.

# A dense layer's module in the published checkpoints: "...denselayer7.norm.1.weight".
_LEGACY_LAYER_KEY = re.compile(
    r"^(.*\.denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$")


def modern_key_names(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename ``denselayerN.norm.1`` -> ``denselayerN.norm1`` (and conv.1, norm.2, conv.2).

    Keys already spelled the current way are kept; a checkpoint that holds a
    tensor under both spellings is ambiguous and refused.
    """
    out: dict[str, np.ndarray] = {}
    renamed_from: dict[str, str] = {}
    for key, value in arrays.items():
        m = _LEGACY_LAYER_KEY.match(key)
        new = f"{m.group(1)}{m.group(2)}" if m else key
        if new in out:
            first = renamed_from.get(new, new)
            raise ConversionError(f"the state dict holds {new} twice ({first} and {key}); "
                                  "keep either the old (norm.1) or the new (norm1) spelling")
        out[new] = value
        if m:
            renamed_from[new] = key
    return out


def key_map(flax_path: FlaxPath):
    """Flax leaf -> PyTorch key, e.g. ``("params", "denseblock2", "denselayer3", "norm1", "scale")``
    -> ``features.denseblock2.denselayer3.norm1.weight``.

    Everything but the classifier lives in torchvision's ``features`` Sequential.
    """
    def torch_prefix(modules: tuple[str, ...]) -> str:
        return ".".join(modules if modules[0] == "classifier" else ("features", *modules))

    return standard_key_map(flax_path, torch_prefix)


# ---------------------------------------------------------------------------
# Registration.

_TV_V1 = Preprocessing(224, 256)   # torchvision IMAGENET1K_V1: resize 256, crop 224, bilinear
_TORCHVISION_FILES = {
    "densenet121": "densenet121-a639ec97.pth",
    "densenet169": "densenet169-b2777c0a.pth",
    "densenet201": "densenet201-c1103571.pth",
}
# timm's pretrained tags, its default first: densenet121.ra_in1k is timm's own
# training (RandAugment recipe); the tv_in1k ones are torchvision's weights
# re-hosted. All evaluate at 224 px, crop_pct 0.875, bicubic.
_TIMM_TAGS = {
    "densenet121": ("ra_in1k", "tv_in1k"),
    "densenet169": ("tv_in1k",),
    "densenet201": ("tv_in1k",),
}
_TIMM_EVAL = timm_preprocessing(224, 0.875, "bicubic")


def layer_groups(block_sizes: Sequence[int]):
    groups = [("stem", (("conv0",), ("norm0",)))]
    for i in range(len(block_sizes)):
        prefixes = [(f"denseblock{i + 1}",)]
        if i < len(block_sizes) - 1:
            prefixes.append((f"transition{i + 1}",))
        groups.append((f"block{i + 1}", tuple(prefixes)))
    groups.append(("norm5", (("norm5",),)))
    groups.append(("head", (("classifier",),)))
    return tuple(groups)


def _register_all() -> None:
    for name, block_sizes in BLOCK_SIZES.items():
        tv_file = _TORCHVISION_FILES[name]
        tv_weights = (torchvision_weights("IMAGENET1K_V1", tv_file, _TV_V1),)
        timm_weights = tuple(timm_hub_weights(name, tag, _TIMM_EVAL) for tag in _TIMM_TAGS[name])
        register(BackboneSpec(
            name=name,
            family="densenet",
            constructor=partial(DenseNet, block_sizes=block_sizes),
            sources={
                "torchvision": SourceSpec("torchvision", name, key_map, tv_weights, rename_keys=modern_key_names),
                "timm": SourceSpec("timm", name, key_map, timm_weights, rename_keys=modern_key_names),
            },
            layer_groups=layer_groups(block_sizes),
            head_path=("classifier",),
            preprocessing=_TV_V1,
            num_features=num_features(block_sizes),
            description=f"DenseNet-{name[8:]} (DenseNet-BC, growth rate {GROWTH_RATE}, "
                        f"blocks of {'/'.join(map(str, block_sizes))} layers)",
        ))


_register_all()
