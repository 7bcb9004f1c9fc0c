"""VGG-11/13/16/19, with and without BatchNorm (torchvision's architecture) and its weights.

torchvision's VGG: five blocks of 3x3 convolutions (padding 1, with bias;
``_bn`` variants put a BatchNorm after each), each block ended by a 2x2
max-pool; then ``AdaptiveAvgPool2d((7, 7))``, flatten, and the classifier
Linear(25088, 4096)-ReLU-Dropout-Linear(4096, 4096)-ReLU-Dropout-Linear(4096, N).

Two details decide whether converted weights give torchvision's logits:

* **Adaptive pooling.** At 224 px the features are already 7x7 and the pool
  does nothing; at any other size PyTorch averages over bins
  ``[floor(i * H / 7), ceil((i + 1) * H / 7))``, which overlap when H is not a
  multiple of 7 and repeat pixels when H < 7 (a 32 px image gives a 1x1 map,
  copied to all 49 cells). :func:`adaptive_avg_pool` does exactly that.
* **Flatten order.** PyTorch flattens the (N, 512, 7, 7) map channel-major,
  and the first Linear's 25088 input rows are in that order. The model
  transposes NHWC -> NCHW before flattening, so ``classifier_0``'s kernel is
  simply torchvision's weight transposed (no row permutation in the key map)
  and converted parameters keep PyTorch's layout.

Flax module names mirror torchvision's indices (``features_3`` is
``features.3``, ``classifier_6`` is ``classifier.6``), so the standard key map
serves. timm's ``vgg*`` models are *not* a second source: they replace the two
hidden Linear layers by a 7x7 and a 1x1 convolution (``pre_logits.fc1/fc2``)
followed by global pooling, which is the same function only at 224 px.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Sequence

import jax.numpy as jnp
import flax.linen as nn
from jax import lax

from jaxtl.errors import ConfigError
from jaxtl.models.layers import BatchNorm, Dropout, conv, dense, max_pool, inference_mode
from jaxtl.registry import BackboneSpec, Preprocessing, SourceSpec, register, standard_key_map, torchvision_weights

# Output channels of the five blocks; the architectures differ only in how
# many convolutions each block has (the paper's configurations A, B, D, E).
BLOCK_WIDTHS = (64, 128, 256, 512, 512)
BLOCK_DEPTHS = {
    "vgg11": (1, 1, 2, 2, 2),
    "vgg13": (2, 2, 2, 2, 2),
    "vgg16": (2, 2, 3, 3, 3),
    "vgg19": (2, 2, 4, 4, 4),
}
POOLED_SIZE = 7          # AdaptiveAvgPool2d((7, 7))
HIDDEN_FEATURES = 4096
MIN_INPUT_SIZE = 32      # five 2x2 max-pools; smaller inputs leave an empty map


def _bin_edges(size: int, out: int) -> list[tuple[int, int]]:
    """PyTorch's adaptive pooling bins: [floor(i * size / out), ceil((i + 1) * size / out))."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def _adaptive_avg_pool_axis(x, axis: int, out: int):
    size = x.shape[axis]
    if size == out:
        return x
    if size % out == 0:
        # Equal, disjoint bins: a reshape and a mean.
        shape = x.shape[:axis] + (out, size // out) + x.shape[axis + 1:]
        return jnp.mean(x.reshape(shape), axis=axis + 1)
    cells = [jnp.mean(lax.slice_in_dim(x, start, end, axis=axis), axis=axis, keepdims=True)
             for start, end in _bin_edges(size, out)]
    return jnp.concatenate(cells, axis=axis)


def adaptive_avg_pool(x, output_size: int | tuple[int, int]):
    """``nn.AdaptiveAvgPool2d(output_size)`` on NHWC ``x``, accumulated in float32.

    Every output cell averages a rectangle of rows x columns, so pooling the
    rows and then the columns gives the same mean as PyTorch's 2-D window.
    """
    oh, ow = (output_size, output_size) if isinstance(output_size, int) else output_size
    if x.shape[1:3] == (oh, ow):
        return x
    y = _adaptive_avg_pool_axis(x.astype(jnp.float32), 1, oh)
    y = _adaptive_avg_pool_axis(y, 2, ow)
    return y.astype(x.dtype)


def feature_layout(depths: Sequence[int], batch_norm: bool) -> list[list[tuple[int, int | None]]]:
    """Per block, each conv's (torchvision ``features`` index, its BatchNorm's index or None).

    torchvision's ``features`` Sequential holds Conv2d, [BatchNorm2d], ReLU per
    convolution and one MaxPool2d per block, numbered consecutively.
    """
    index, blocks = 0, []
    for n_convs in depths:
        block = []
        for _ in range(n_convs):
            block.append((index, index + 1 if batch_norm else None))
            index += 3 if batch_norm else 2
        index += 1  # the max-pool
        blocks.append(block)
    return blocks


class VGG(nn.Module):
    """VGG on NHWC float input (normalised with the backbone's mean/std), at least 32 px.

    ``train=True`` normalises with batch statistics and updates ``batch_stats``
    (``_bn`` variants; apply with ``mutable=["batch_stats"]``); groups named in
    ``frozen`` always use running statistics. Dropout (``drop_rate``, rng
    stream ``'dropout'``) follows each hidden Linear layer: the first is part
    of group "fc", the one feeding the classifier of group "head"; each is
    active only with ``train=True`` and its group not frozen.
    ``features_only=True`` returns the 4096-d input of the classifier (after
    the second ReLU, before its dropout).
    """

    depths: Sequence[int] = BLOCK_DEPTHS["vgg16"]
    batch_norm: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    bn_epsilon: float = 1e-5
    bn_momentum: float = 0.9       # PyTorch momentum 0.1
    drop_rate: float = 0.5
    axis_name: str | None = None   # synchronise BatchNorm statistics; dropout masks per global example

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: Sequence[str] = (), features_only: bool = False):
        if x.ndim != 4:
            raise ConfigError(f"VGG expects NHWC images (batch, height, width, channels), got shape {x.shape}")
        if min(x.shape[1], x.shape[2]) < MIN_INPUT_SIZE:
            raise ConfigError(f"VGG needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} px "
                              f"(five 2x2 max-pools), got {x.shape[1]}x{x.shape[2]}")
        norm = partial(BatchNorm, momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                       dtype=self.dtype, axis_name=self.axis_name)
        x = x.astype(self.dtype)
        for b, block in enumerate(feature_layout(self.depths, self.batch_norm)):
            group = f"block{b + 1}"
            for conv_index, bn_index in block:
                # Not the first: its input is the image batch (see jaxtl.ops.conv.materialized).
                x = conv(BLOCK_WIDTHS[b], 3, 1, 1, use_bias=True, dtype=self.dtype, name=f"features_{conv_index}",
                         materialize_input=conv_index > 0)(x)
                if bn_index is not None:
                    x = norm(name=f"features_{bn_index}")(x, inference_mode(train, group, frozen))
                x = nn.relu(x)
            x = max_pool(x, 2, 2, 0)

        if x.shape[1:3] != (POOLED_SIZE, POOLED_SIZE):
            x = adaptive_avg_pool(x, POOLED_SIZE)
            # XLA:CPU (jaxlib 0.10) otherwise fuses the pooled map, a broadcast
            # when the features are 1x1 (32 px inputs), together with the last
            # convolutions and the classifier into one YNNPACK fusion that
            # recomputes its producers. Values are unchanged.
            x = lax.optimization_barrier(x)
        # PyTorch flattens NCHW: channel-major, the order of classifier.0's input rows.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)

        x = nn.relu(dense(HIDDEN_FEATURES, dtype=self.dtype, name="classifier_0")(x))
        x = Dropout(self.drop_rate, axis_name=self.axis_name)(x, not train or "fc" in frozen)
        x = nn.relu(dense(HIDDEN_FEATURES, dtype=self.dtype, name="classifier_3")(x))
        if features_only:
            return x.astype(jnp.float32)
        x = Dropout(self.drop_rate, axis_name=self.axis_name)(x, not train or "head" in frozen)
        x = dense(self.num_classes, dtype=self.dtype, name="classifier_6")(x)
        return x.astype(jnp.float32)


# ---------------------------------------------------------------------------
# Registration.

# torchvision's IMAGENET1K_V1 for every VGG: resize 256, crop 224, bilinear,
# ImageNet mean/std. (vgg16's IMAGENET1K_FEATURES, ported from ssd.pytorch,
# has no classifier and another normalisation; it is not listed.)
_TV_V1 = Preprocessing(224, 256)
_TORCHVISION_FILES = {
    "vgg11": "vgg11-8a719046.pth",
    "vgg13": "vgg13-19584684.pth",
    "vgg16": "vgg16-397923af.pth",
    "vgg19": "vgg19-dcbb9e9d.pth",
    "vgg11_bn": "vgg11_bn-6002323d.pth",
    "vgg13_bn": "vgg13_bn-abd245e5.pth",
    "vgg16_bn": "vgg16_bn-6c64b313.pth",
    "vgg19_bn": "vgg19_bn-c79401a0.pth",
}


def layer_groups(depths: Sequence[int], batch_norm: bool):
    groups = []
    for b, block in enumerate(feature_layout(depths, batch_norm)):
        prefixes = []
        for conv_index, bn_index in block:
            prefixes.append((f"features_{conv_index}",))
            if bn_index is not None:
                prefixes.append((f"features_{bn_index}",))
        groups.append((f"block{b + 1}", tuple(prefixes)))
    groups.append(("fc", (("classifier_0",), ("classifier_3",))))
    groups.append(("head", (("classifier_6",),)))
    return tuple(groups)


def _register_all() -> None:
    for name, filename in _TORCHVISION_FILES.items():
        base = name.removesuffix("_bn")
        batch_norm = name.endswith("_bn")
        depths = BLOCK_DEPTHS[base]
        weights = (torchvision_weights("IMAGENET1K_V1", filename, _TV_V1),)
        n_layers = sum(depths) + 3
        register(BackboneSpec(
            name=name,
            family="vgg",
            constructor=partial(VGG, depths=depths, batch_norm=batch_norm),
            sources={"torchvision": SourceSpec("torchvision", name, standard_key_map, weights)},
            layer_groups=layer_groups(depths, batch_norm),
            head_path=("classifier_6",),
            preprocessing=_TV_V1,
            num_features=HIDDEN_FEATURES,
            description=f"VGG-{n_layers} ({sum(depths)} 3x3 convs{' + BatchNorm' if batch_norm else ''}, "
                        "two 4096-d hidden Linear layers with dropout 0.5)",
        ))


_register_all()
