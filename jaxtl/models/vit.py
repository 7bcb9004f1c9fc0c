"""Vision Transformer (ViT-Ti/S/B/L, patch 16) with timm's and torchvision's weights.

timm's ``vit_*_patch16_224`` and torchvision's ``vit_b_16`` / ``vit_l_16`` are
the same network (checked against the installed sources): pre-norm blocks
with LayerNorm eps 1e-6, biased fused q/k/v projection, exact-erf GELU MLP of
width 4 x D, a class token concatenated *before* the learned position
embedding is added (so it has N + 1 positions), final LayerNorm, and a single
Linear head on the class token (no pre-logits layer). Only the tensor names
differ, so both libraries are sources of the same registry entries.

Flax keeps q, k and v as three Dense layers; the key maps slice the fused
PyTorch tensors (timm ``qkv``, torchvision ``in_proj_*``, both stacked q, k, v
along the output rows).

A ViT is built for one image size (its position embedding has one entry per
patch). Building it for another size (``img_size=384``) and converting
224-px weights resamples the position embedding during conversion, the way
each source library does it (see :func:`resample_pos_embed`).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from jaxtl.errors import ConfigError
from jaxtl.models.layers import (Dropout, LayerNorm, check_rates, conv, dense, gelu_exact, inference_mode,
                                 multi_head_attention, param, stochastic_depth)
from jaxtl.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    INCEPTION_MEAN,
    INCEPTION_STD,
    LEAF_TO_TORCH,
    BackboneSpec,
    FlaxPath,
    Preprocessing,
    SourceSpec,
    register,
    timm_preprocessing,
    torchvision_weights,
    timm_hub_weights,
)

# ---------------------------------------------------------------------------
# Position-embedding resampling (numpy, run once at conversion time).


def _cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel with coefficient ``a``."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_weights(in_size: int, out_size: int, *, align_corners: bool = False,
                    antialias: bool = False) -> np.ndarray:
    """The (out_size, in_size) matrix of PyTorch's 1-D bicubic ``F.interpolate``.

    Two different algorithms hide behind ``mode="bicubic"`` in PyTorch:

    * ``antialias=False``: 4 taps at floor(src) - 1 ... + 2 with a = -0.75,
      out-of-range taps clamped to the edge pixel (their weight accumulates
      there). ``src = (i + 0.5) * in / out - 0.5`` or, with align_corners,
      ``i * (in - 1) / (out - 1)``.
    * ``antialias=True`` (PIL's resampling): a = -0.5, the kernel stretched by
      the scale when downsampling, taps outside the image dropped and the
      remaining weights renormalised to sum to 1. With align_corners only the
      scale changes to (in - 1) / (out - 1); the centres stay at (i + 0.5) *
      scale.

    ``jax.image.resize`` implements neither exactly, hence this matrix.
    """
    if in_size < 1 or out_size < 1:
        raise ConfigError(f"cannot resize {in_size} -> {out_size} samples")
    weights = np.zeros((out_size, in_size), np.float64)
    if antialias:
        if align_corners:
            scale = (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        else:
            scale = in_size / out_size
        stretch = max(scale, 1.0)        # widen the kernel only when shrinking
        support = 2.0 * stretch
        for i in range(out_size):
            center = scale * (i + 0.5)
            # int() truncates toward zero, as the C++ cast does.
            lo = max(int(center - support + 0.5), 0)
            hi = min(int(center + support + 0.5), in_size)
            taps = np.arange(lo, hi)
            w = _cubic_kernel((taps - center + 0.5) / stretch, -0.5)
            total = w.sum()
            weights[i, lo:hi] = w / total if total != 0.0 else w
        return weights
    for i in range(out_size):
        if align_corners:
            src = i * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        else:
            src = (i + 0.5) * in_size / out_size - 0.5   # not clamped at 0 for cubic
        base = math.floor(src)
        t = src - base
        taps = _cubic_kernel(np.array([t + 1.0, t, 1.0 - t, 2.0 - t]), -0.75)
        for offset, w in zip(range(-1, 3), taps):
            weights[i, min(max(base + offset, 0), in_size - 1)] += w
    return weights


def resize_bicubic(x: np.ndarray, size: tuple[int, int], *, align_corners: bool = False,
                   antialias: bool = False) -> np.ndarray:
    """Resize the (H, W) axes of a channels-last array ``(..., H, W, C)`` like
    ``F.interpolate(mode="bicubic")`` on the NCHW equivalent. Computed in float64."""
    x = np.asarray(x)
    h, w = x.shape[-3], x.shape[-2]
    wh = bicubic_weights(h, size[0], align_corners=align_corners, antialias=antialias)
    ww = bicubic_weights(w, size[1], align_corners=align_corners, antialias=antialias)
    return np.einsum("oh,pw,...hwc->...opc", wh, ww, x.astype(np.float64))


def resample_pos_embed(posemb, new_grid: int | tuple[int, int], num_prefix_tokens: int = 1, *,
                       old_grid: tuple[int, int] | None = None, align_corners: bool = False,
                       antialias: bool = True) -> np.ndarray:
    """Resample a ``(1, prefix + gh * gw, D)`` position embedding to another patch grid.

    The prefix (class token) entries are kept; the grid entries are resized
    bicubically. The defaults are timm's (``resample_abs_pos_embed`` as called
    by its checkpoint filter: align_corners=False, antialias=True).
    torchvision's ``interpolate_embeddings`` uses align_corners=True,
    antialias=False. The old grid is assumed square unless given.
    """
    posemb = np.asarray(posemb)
    if posemb.ndim != 3:
        raise ConfigError(f"position embedding must be (1, tokens, dim), got shape {posemb.shape}")
    new_grid = (new_grid, new_grid) if isinstance(new_grid, int) else tuple(new_grid)
    n_grid = posemb.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(max(n_grid, 0))
        if side * side != n_grid:
            raise ConfigError(f"position embedding has {n_grid} grid tokens, not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != n_grid:
        raise ConfigError(f"old_grid {old_grid} does not match {n_grid} grid tokens")
    if tuple(old_grid) == new_grid:
        return posemb
    prefix, grid = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    grid = grid.reshape(posemb.shape[0], old_grid[0], old_grid[1], posemb.shape[2])
    grid = resize_bicubic(grid, new_grid, align_corners=align_corners, antialias=antialias)
    grid = grid.reshape(posemb.shape[0], new_grid[0] * new_grid[1], posemb.shape[2]).astype(posemb.dtype)
    return np.concatenate([prefix, grid], axis=1)


def _pos_embed_adapter(*, align_corners: bool, antialias: bool, num_prefix_tokens: int = 1):
    """SourceSpec.adapt: resample ``pos_embed`` when the model's grid differs.

    ``num_prefix_tokens`` is how many leading entries are not on the grid: 1
    for a class token with its own position, 0 where the tokens ahead of the
    patches have none (DINOv2 with registers, SigLIP without a class token).
    """

    def adapt(path: FlaxPath, value: np.ndarray, target_shape: tuple[int, ...]) -> np.ndarray | None:
        if path != ("params", "pos_embed") or value.ndim != 3 or len(target_shape) != 3:
            return None
        if value.shape[0] != target_shape[0] or value.shape[2] != target_shape[2]:
            return None  # another width: a different architecture, not another resolution
        side = math.isqrt(max(target_shape[1] - num_prefix_tokens, 0))
        if side * side != target_shape[1] - num_prefix_tokens:
            return None
        try:
            return resample_pos_embed(value, side, num_prefix_tokens, align_corners=align_corners,
                                      antialias=antialias)
        except ConfigError:
            return None  # not a square grid: reported as a wrong shape
    return adapt


# ---------------------------------------------------------------------------
# The network.


def _layer_norm(epsilon: float, dtype: Any, name: str) -> LayerNorm:
    # PyTorch's two-pass statistics in float32, with a hand-written backward
    # (why: jaxtl.ops.norm.layer_norm_closed_form).
    return LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


def quick_gelu(x):
    """OpenAI CLIP's ``x * sigmoid(1.702 x)`` (timm's ``quick_gelu``)."""
    return x * nn.sigmoid(jnp.asarray(1.702, x.dtype) * x)


def gelu_tanh(x):
    """``nn.GELU(approximate="tanh")``: big_vision's GELU."""
    return nn.gelu(x, approximate=True)


# The MLP's activation by timm's name; "swiglu" is timm's SwiGLUPacked (DINOv2 giant).
ACTIVATIONS = {"gelu": gelu_exact, "quick_gelu": quick_gelu, "gelu_tanh": gelu_tanh, "swiglu": nn.silu}
POOLS = ("token", "token_patch_mean", "map")


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections.

    ``key_bias=False`` drops the key's bias alone (DINOv3's ``_qkvb``: q and v
    only). ``rotate``, if given, maps q and k (batch, tokens, heads, head_dim)
    before the scores: rotary position embeddings.
    """

    num_heads: int
    qkv_bias: bool = True
    key_bias: bool | None = None   # None: as qkv_bias
    attn_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None   # the axis a train step is mapped over: dropout masks per global example

    @nn.compact
    def __call__(self, x, deterministic: bool, rotate: Callable | None = None):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        proj = partial(dense, width, dtype=self.dtype, use_bias=self.qkv_bias)

        def heads(t):  # (batch, tokens, width) -> (batch, tokens, heads, head_dim): a reshape, no copy
            return t.reshape(batch, tokens, self.num_heads, head_dim)

        q = heads(proj(name="query")(x))
        k = heads(proj(name="key", use_bias=self.qkv_bias if self.key_bias is None else self.key_bias)(x))
        v = heads(proj(name="value")(x))
        if rotate is not None:
            q, k = rotate(q), rotate(k)
        # Created even when unused: the proj dropout keeps its name (Dropout_1) and its random stream.
        attn_dropout = Dropout(self.attn_drop_rate, axis_name=self.axis_name)
        dropout = partial(attn_dropout, deterministic=False) if self.attn_drop_rate > 0 and not deterministic else None
        y = multi_head_attention(q, k, v, dropout).reshape(batch, tokens, width)
        y = dense(width, dtype=self.dtype, name="proj")(y)
        return Dropout(self.proj_drop_rate, axis_name=self.axis_name)(y, deterministic=deterministic)


class Mlp(nn.Module):
    """fc1, activation, fc2; with ``act="swiglu"`` fc1 is twice as wide and
    ``silu(first half) * second half`` feeds fc2 (timm's SwiGLUPacked)."""

    hidden: int
    drop_rate: float = 0.0
    act: str = "gelu"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool):
        width = x.shape[-1]
        y = dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        if self.act == "swiglu":
            gate, value = jnp.split(y, 2, axis=-1)
            y = nn.silu(gate) * value
        else:
            y = ACTIVATIONS[self.act](y)
        y = Dropout(self.drop_rate, axis_name=self.axis_name)(y, deterministic=deterministic)
        y = dense(width, dtype=self.dtype, name="fc2")(y)
        return Dropout(self.drop_rate, axis_name=self.axis_name)(y, deterministic=deterministic)


class LayerScale(nn.Module):
    """A learned per-channel scale of a residual branch (CaiT; DINOv2's ``ls1``/``ls2``)."""

    init_value: float

    @nn.compact
    def __call__(self, x):
        gamma = param(self, "gamma", nn.initializers.constant(self.init_value), (x.shape[-1],), jnp.float32)
        return x * gamma.astype(x.dtype)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)),
    each branch scaled by a LayerScale when ``layer_scale`` is set."""

    num_heads: int
    mlp_hidden: int
    qkv_bias: bool = True
    ln_epsilon: float = 1e-6
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    layer_scale: float | None = None
    act: str = "gelu"
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool):
        y = _layer_norm(self.ln_epsilon, self.dtype, "norm1")(x)
        y = SelfAttention(num_heads=self.num_heads, qkv_bias=self.qkv_bias, attn_drop_rate=self.attn_drop_rate,
                          proj_drop_rate=self.proj_drop_rate, dtype=self.dtype, axis_name=self.axis_name,
                          name="attn")(y, deterministic)
        if self.layer_scale is not None:
            y = LayerScale(self.layer_scale, name="ls1")(y)
        x = x + stochastic_depth(self, y, self.drop_path_rate, deterministic, self.axis_name)
        y = _layer_norm(self.ln_epsilon, self.dtype, "norm2")(x)
        y = Mlp(hidden=self.mlp_hidden, drop_rate=self.proj_drop_rate, act=self.act, dtype=self.dtype,
                axis_name=self.axis_name, name="mlp")(y, deterministic)
        if self.layer_scale is not None:
            y = LayerScale(self.layer_scale, name="ls2")(y)
        return x + stochastic_depth(self, y, self.drop_path_rate, deterministic, self.axis_name)


class AttentionPool(nn.Module):
    """Multi-head attention pooling with one learned query (timm's AttentionPoolLatent,
    big_vision's MAPHead): the latent attends over the tokens, then a
    projection and a residual MLP (x + mlp(norm(x)))."""

    num_heads: int
    mlp_hidden: int
    ln_epsilon: float = 1e-6
    act: str = "gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        batch, tokens, width = x.shape
        head_dim = width // self.num_heads
        latent = param(self, "latent", nn.initializers.truncated_normal(width ** -0.5), (1, 1, width), jnp.float32)
        q = dense(width, dtype=self.dtype, name="query")(jnp.broadcast_to(latent.astype(self.dtype), (batch, 1, width)))
        k = dense(width, dtype=self.dtype, name="key")(x)
        v = dense(width, dtype=self.dtype, name="value")(x)
        y = multi_head_attention(q.reshape(batch, 1, self.num_heads, head_dim),
                                 k.reshape(batch, tokens, self.num_heads, head_dim),
                                 v.reshape(batch, tokens, self.num_heads, head_dim)).reshape(batch, 1, width)
        y = dense(width, dtype=self.dtype, name="proj")(y)
        z = _layer_norm(self.ln_epsilon, self.dtype, "norm")(y)
        y = y + Mlp(hidden=self.mlp_hidden, act=self.act, dtype=self.dtype, name="mlp")(z, True)
        return y[:, 0]


def linear_probe_features(norm, class_tokens: Sequence, x, num_prefix_tokens: int):
    """DINOv2's linear-probe input: the earlier blocks' class tokens (each through the final ``norm``; it
    is per token), the last block's (``x``, normed), then the mean of its patch tokens (registers excluded)."""
    patch_mean = x[:, num_prefix_tokens:].astype(jnp.float32).mean(axis=1).astype(x.dtype)
    return jnp.concatenate([*(norm(t) for t in class_tokens), x[:, 0], patch_mean], axis=-1)


def check_dimensions(module: nn.Module, family: str) -> None:
    """One-line errors for a transformer's sizes: positive integers, an image size that is a
    multiple of the patch, a width divisible by the heads."""
    for attr in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "in_chans", "probe_blocks"):
        value = getattr(module, attr)
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{family} {attr} must be a positive integer, got {value!r}")
    if module.img_size % module.patch_size:
        nearest = max(round(module.img_size / module.patch_size), 1) * module.patch_size
        raise ConfigError(f"{family} img_size {module.img_size} is not a multiple of patch_size {module.patch_size}; "
                          f"use e.g. img_size={nearest}")
    if module.embed_dim % module.num_heads:
        raise ConfigError(f"{family} embed_dim {module.embed_dim} is not divisible by num_heads {module.num_heads}")
    if module.probe_blocks > module.depth:
        raise ConfigError(f"{family} probe_blocks={module.probe_blocks} exceeds the {module.depth} blocks")


class VisionTransformer(nn.Module):
    """ViT on NHWC float input of exactly ``img_size`` x ``img_size`` pixels.

    Dropout follows timm's names: ``drop_rate`` before the head,
    ``pos_drop_rate`` after the position embedding, ``proj_drop_rate`` after
    the attention projection and in the MLP, ``attn_drop_rate`` on the
    attention weights, ``drop_path_rate`` the stochastic-depth rate of the
    last block (linear from 0 over the blocks). torchvision's ``dropout=p`` is
    ``pos_drop_rate=proj_drop_rate=p``; its ``attention_dropout`` is
    ``attn_drop_rate``. They are active only with ``train=True`` and only in
    layer groups not named in ``frozen`` (rng stream ``"dropout"``).

    The options of timm's VisionTransformer that DINOv2, CLIP and SigLIP use:
    ``class_token`` (SigLIP has none), ``reg_tokens`` (register tokens after
    the class token), ``no_embed_class`` (the position embedding covers the
    patches only and is added before the class and register tokens are
    prepended), ``pre_norm`` (CLIP: a LayerNorm after the embedding, and no
    bias in the patch projection), ``layer_scale`` (LayerScale's initial
    value, DINOv2), ``act`` (a key of :data:`ACTIVATIONS`).

    ``pool`` is what the head reads, after the final norm, and what
    ``features_only=True`` returns:

    * ``"token"``: the class token;
    * ``"token_patch_mean"``: the class token concatenated with the mean of
      the patch tokens (registers excluded), DINOv2's linear probe; with
      ``probe_blocks=n`` the class tokens of the last n blocks (each through
      the final norm) come first, as in DINOv2's ``create_linear_input``;
    * ``"map"``: attention pooling with a learned query (SigLIP).

    ``embed_proj=N`` adds CLIP's projection (a Linear to N, timm's ``head`` in
    its CLIP checkpoints) after the pooling: the features are then the
    image-text embedding.

    ``axis_name`` is the axis a train step is mapped over: there is no
    BatchNorm to synchronise, but dropout and stochastic depth draw each
    example's mask from its position in the global batch.
    """

    num_classes: int = 1000
    dtype: Any = jnp.float32
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    ln_epsilon: float = 1e-6
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    pre_norm: bool = False
    layer_scale: float | None = None
    act: str = "gelu"
    pool: str = "token"
    probe_blocks: int = 1
    embed_proj: int = 0
    grad_checkpointing: bool = False   # recompute each block's activations in the backward pass
    axis_name: str | None = None

    def __post_init__(self):
        check_dimensions(self, "ViT")
        if self.act not in ACTIVATIONS:
            raise ConfigError(f"ViT act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"ViT pool must be one of {', '.join(POOLS)}, got {self.pool!r}")
        if self.pool != "map" and not self.class_token:
            raise ConfigError(f"ViT pool={self.pool!r} reads the class token; use class_token=True or pool='map'")
        if self.probe_blocks > 1 and self.pool != "token_patch_mean":
            raise ConfigError("ViT probe_blocks > 1 needs pool='token_patch_mean' (DINOv2's linear probe)")
        check_rates(self, "ViT", ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"))
        super().__post_init__()

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    def _check_input(self, x) -> None:
        if x.ndim != 4:
            raise ConfigError(f"ViT expects NHWC images (batch, height, width, channels), got shape {x.shape}")
        if x.shape[1] != self.img_size or x.shape[2] != self.img_size:
            raise ConfigError(
                f"this ViT was built for {self.img_size}x{self.img_size} images but got {x.shape[1]}x{x.shape[2]}; "
                f"resize the images, or build the model with img_size=N (a multiple of {self.patch_size}; "
                "converted position embeddings are resampled)")
        if x.shape[3] != self.in_chans:
            raise ConfigError(f"ViT expects {self.in_chans} channels (NHWC), got {x.shape[3]} (shape {x.shape})")

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: Sequence[str] = (), features_only: bool = False):
        self._check_input(x)

        batch = x.shape[0]
        width, patches = self.embed_dim, self.grid_size ** 2
        x = x.astype(self.dtype)
        # Kernel = stride = patch, no padding: one embedding per patch, row-major.
        x = conv(width, self.patch_size, self.patch_size, 0, use_bias=not self.pre_norm, dtype=self.dtype,
                 name="patch_embed")(x)
        x = x.reshape(batch, patches, width)
        prefix = []
        if self.class_token:
            cls_token = param(self, "cls_token", nn.initializers.normal(1e-6), (1, 1, width), jnp.float32)
            prefix.append(jnp.broadcast_to(cls_token.astype(self.dtype), (batch, 1, width)))
        if self.reg_tokens:
            reg_token = param(self, "reg_token", nn.initializers.normal(1e-6), (1, self.reg_tokens, width),
                              jnp.float32)
            prefix.append(jnp.broadcast_to(reg_token.astype(self.dtype), (batch, self.reg_tokens, width)))
        positions = patches if self.no_embed_class else patches + self.num_prefix_tokens
        pos_embed = param(self, "pos_embed", nn.initializers.truncated_normal(0.02), (1, positions, width),
                          jnp.float32).astype(self.dtype)
        if self.no_embed_class:
            x = jnp.concatenate([*prefix, x + pos_embed], axis=1)
        else:
            # Class token first, then the position embedding over all N + 1 tokens.
            x = jnp.concatenate([*prefix, x], axis=1) + pos_embed
        x = Dropout(self.pos_drop_rate, axis_name=self.axis_name)(
            x, deterministic=inference_mode(train, "embed", frozen))
        if self.pre_norm:
            x = _layer_norm(self.ln_epsilon, self.dtype, "norm_pre")(x)

        hidden = int(width * self.mlp_ratio)
        class_tokens = []   # of the blocks before the last among the probed ones
        for i in range(self.depth):
            rate = self.drop_path_rate * i / (self.depth - 1) if self.depth > 1 else 0.0
            block_cls = nn.remat(EncoderBlock, static_argnums=(2,)) if self.grad_checkpointing else EncoderBlock
            block = block_cls(num_heads=self.num_heads, mlp_hidden=hidden, qkv_bias=self.qkv_bias,
                              ln_epsilon=self.ln_epsilon, proj_drop_rate=self.proj_drop_rate,
                              attn_drop_rate=self.attn_drop_rate, drop_path_rate=rate,
                              layer_scale=self.layer_scale, act=self.act, dtype=self.dtype,
                              axis_name=self.axis_name, name=f"blocks_{i}")
            x = block(x, inference_mode(train, f"block{i}", frozen))
            if self.depth - self.probe_blocks <= i < self.depth - 1:
                class_tokens.append(x[:, 0])
        norm = _layer_norm(self.ln_epsilon, self.dtype, "norm")
        x = norm(x)
        if self.pool == "token":
            features = x[:, 0]
        elif self.pool == "token_patch_mean":
            features = linear_probe_features(norm, class_tokens, x, self.num_prefix_tokens)
        else:
            features = AttentionPool(num_heads=self.num_heads, mlp_hidden=hidden, ln_epsilon=self.ln_epsilon,
                                     act=self.act, dtype=self.dtype, name="attn_pool")(x[:, self.num_prefix_tokens:])
        if self.embed_proj:
            features = dense(self.embed_proj, dtype=self.dtype, name="proj")(features)
        if features_only:
            return features.astype(jnp.float32)
        features = Dropout(self.drop_rate, axis_name=self.axis_name)(
            features, deterministic=inference_mode(train, "head", frozen))
        return dense(self.num_classes, dtype=self.dtype, name="head")(features).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Weight names.

QKV_INDEX = {"query": 0, "key": 1, "value": 2}


def fused_slice(index: int, leaf: str, parts: int = 3) -> Callable[[np.ndarray], np.ndarray]:
    """Rows ``index * D : (index + 1) * D`` of a fused (parts * D, D) / (parts * D,) tensor, as a Flax leaf."""

    def take(w: np.ndarray) -> np.ndarray:
        d = w.shape[0] // parts
        part = w[index * d:(index + 1) * d]
        return part.T if leaf == "kernel" else part
    return take


def _vit_key_map(names: dict[str, str], block: Callable[[int], str], fused: dict[str, tuple[str, str, tuple]]):
    """A key map from the per-source names of modules and parameters.

    ``names`` maps a Flax module path ("norm", "mlp/fc1", "attn_pool/proj",
    relative to its block inside ``blocks_i``) or parameter path
    ("cls_token", "ls1/gamma") to the PyTorch name; ``fused`` maps a Flax
    module whose children are slices of one PyTorch tensor ("attn") to
    (weight key, bias key, the children in row order).
    """

    def key_map(path: FlaxPath):
        collection, *modules, leaf = path
        if collection != "params":
            raise KeyError(f"no PyTorch name for Flax leaf {'/'.join(path)}")
        prefix = ""
        if modules and modules[0].startswith("blocks_"):
            prefix = block(int(modules[0][len("blocks_"):])) + "."
            modules = modules[1:]
        parent, child = "/".join(modules[:-1]), modules[-1] if modules else None
        if parent in fused and child in fused[parent][2]:
            weight, bias, parts = fused[parent]
            return prefix + (weight if leaf == "kernel" else bias), \
                fused_slice(parts.index(child), leaf, len(parts))
        own = "/".join([*modules, leaf])
        if own in names:                             # a parameter of its own: cls_token, ls1/gamma
            return prefix + names[own]
        return f"{prefix}{names['/'.join(modules)]}.{LEAF_TO_TORCH[(collection, leaf)]}"
    return key_map


_TIMM_NAMES = {"cls_token": "cls_token", "reg_token": "reg_token", "pos_embed": "pos_embed",
               "patch_embed": "patch_embed.proj", "norm_pre": "norm_pre", "norm": "norm", "head": "head",
               "norm1": "norm1", "norm2": "norm2", "attn/proj": "attn.proj", "mlp/fc1": "mlp.fc1",
               "mlp/fc2": "mlp.fc2", "ls1/gamma": "ls1.gamma", "ls2/gamma": "ls2.gamma",
               "attn_pool/latent": "attn_pool.latent", "attn_pool/query": "attn_pool.q",
               "attn_pool/proj": "attn_pool.proj", "attn_pool/norm": "attn_pool.norm",
               "attn_pool/mlp/fc1": "attn_pool.mlp.fc1", "attn_pool/mlp/fc2": "attn_pool.mlp.fc2"}
_TIMM_FUSED = {"attn": ("attn.qkv.weight", "attn.qkv.bias", ("query", "key", "value")),
               "attn_pool": ("attn_pool.kv.weight", "attn_pool.kv.bias", ("key", "value"))}

timm_key_map = _vit_key_map(_TIMM_NAMES, lambda i: f"blocks.{i}", _TIMM_FUSED)

# CLIP's checkpoints in timm hold the image-text projection as ``head``; jaxtl
# keeps it in the backbone (``proj``) and puts a new classifier after it.
timm_clip_key_map = _vit_key_map({**_TIMM_NAMES, "proj": "head", "head": "classifier"}, lambda i: f"blocks.{i}",
                                 _TIMM_FUSED)

torchvision_key_map = _vit_key_map(
    {"cls_token": "class_token", "pos_embed": "encoder.pos_embedding", "patch_embed": "conv_proj",
     "norm": "encoder.ln", "head": "heads.head", "norm1": "ln_1", "norm2": "ln_2",
     "attn/proj": "self_attention.out_proj", "mlp/fc1": "mlp.0", "mlp/fc2": "mlp.3"},
    lambda i: f"encoder.layers.encoder_layer_{i}",
    {"attn": ("self_attention.in_proj_weight", "self_attention.in_proj_bias", ("query", "key", "value"))},
)

# Each source resamples the position embedding the way its own library does
# when 224-px weights meet a model built for another size, so converted
# weights match what that library's model computes:
# timm's checkpoint filter (resample_abs_pos_embed): bicubic, align_corners
# False, antialias True (PIL-style kernel, a = -0.5);
# torchvision's interpolate_embeddings: bicubic, align_corners True, no
# antialias (a = -0.75). The two methods give different embeddings, so each
# source keeps its own (jaxtl.convert_state_dict(..., img_size=N) then matches
# that library loading 224-px weights into its img_size=N model).
timm_adapt = _pos_embed_adapter(align_corners=False, antialias=True)
timm_adapt_no_prefix = _pos_embed_adapter(align_corners=False, antialias=True, num_prefix_tokens=0)
torchvision_adapt = _pos_embed_adapter(align_corners=True, antialias=False)


# ---------------------------------------------------------------------------
# Registry.

# name: (embed_dim, depth, num_heads, timm default tag, torchvision name)
_ARCHS = {
    "vit_tiny_patch16_224": (192, 12, 3, "augreg_in21k_ft_in1k", None),
    "vit_small_patch16_224": (384, 12, 6, "augreg_in21k_ft_in1k", None),
    "vit_base_patch16_224": (768, 12, 12, "augreg2_in21k_ft_in1k", "vit_b_16"),
    "vit_large_patch16_224": (1024, 24, 16, "augreg_in21k_ft_in1k", "vit_l_16"),
}
_LETTER = {192: "Ti", 384: "S", 768: "B", 1024: "L"}

# timm's pretrained_cfg of those tags: 224 px, crop_pct 0.9, bicubic,
# mean = std = 0.5 (the augreg models were trained in [-1, 1]).
_TIMM_PRE = timm_preprocessing(224, 0.9, "bicubic", INCEPTION_MEAN, INCEPTION_STD)

# torchvision's ViT_B_16_Weights / ViT_L_16_Weights. The SWAG end-to-end
# weights (384 / 512 px) are left out: PretrainedWeights cannot say which
# img_size to build the model for. The SWAG linear-classifier weights are
# 224 px with the same architecture.
_TV_SWAG_LINEAR = Preprocessing(224, 224, IMAGENET_MEAN, IMAGENET_STD, "bicubic")
_TORCHVISION_WEIGHTS = {
    "vit_b_16": [("IMAGENET1K_V1", "vit_b_16-c867db91.pth", Preprocessing(224, 256)),
                 ("IMAGENET1K_SWAG_LINEAR_V1", "vit_b_16_lc_swag-4e70ced5.pth", _TV_SWAG_LINEAR)],
    "vit_l_16": [("IMAGENET1K_V1", "vit_l_16-852ce7e3.pth", Preprocessing(224, 242)),
                 ("IMAGENET1K_SWAG_LINEAR_V1", "vit_l_16_lc_swag-4d563306.pth", _TV_SWAG_LINEAR)],
}


def layer_groups(depth: int, embed: Sequence[str] = ("patch_embed", "cls_token", "pos_embed"),
                 pool: Sequence[str] = ()):
    """embed, one group per block, the final norm (with ``pool``: the pooling or
    projection after it, in one group as timm's layer decay has them), head."""
    return (
        ("embed", tuple((name,) for name in embed)),
        *[(f"block{i}", ((f"blocks_{i}",),)) for i in range(depth)],
        ("pool", (("norm",), *((name,) for name in pool))) if pool else ("norm", (("norm",),)),
        ("head", (("head",),)),
    )


def _register_all() -> None:
    for name, (width, depth, heads, timm_tag, tv_name) in _ARCHS.items():
        sources = {"timm": SourceSpec("timm", name, timm_key_map, (timm_hub_weights(name, timm_tag, _TIMM_PRE),),
                                      adapt=timm_adapt)}
        aliases = {}
        if tv_name is not None:
            tv_weights = tuple(torchvision_weights(tag, fname, pre)
                               for tag, fname, pre in _TORCHVISION_WEIGHTS[tv_name])
            sources["torchvision"] = SourceSpec("torchvision", tv_name, torchvision_key_map, tv_weights,
                                                adapt=torchvision_adapt)
            aliases[tv_name] = "torchvision"
        register(BackboneSpec(
            name=name,
            family="vit",
            constructor=partial(VisionTransformer, embed_dim=width, depth=depth, num_heads=heads, patch_size=16),
            sources=sources,
            layer_groups=layer_groups(depth),
            head_path=("head",),
            preprocessing=_TIMM_PRE,
            default_source="timm",
            num_features=width,
            description=f"ViT-{_LETTER[width]}/16 ({depth} blocks, width {width}, {heads} heads), "
                        "class-token pooling, built for 224 px (img_size=N resamples position embeddings)",
        ), aliases=aliases)


_register_all()
