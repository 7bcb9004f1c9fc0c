"""DINOv3 Vision Transformers (S, S+, B, L; patch 16) with timm's weights.

timm 1.0.31 builds ``vit_{small,small_plus,base,large}_patch16_dinov3[_qkvb]``
as its ``Eva`` class; checked on the installed source (``timm/models/eva.py``,
``timm/layers/pos_embed_sincos.py``) and state dicts:

* patch embedding: 16x16 conv, stride 16, with bias; ``dynamic_img_size``:
  any multiple of 16, height and width separately, no resampling of anything
  (there is no absolute position embedding); timm silently drops a remainder
  of fewer than 16 pixels, jaxtl refuses such a size;
* tokens: class token, 4 register tokens (``reg_token``), then the patches
  row-major; no position embedding is added to any of them;
* pre-norm blocks, LayerNorm eps 1e-5 everywhere: x + ls1 * attn(norm1(x)),
  then x + ls2 * mlp(norm2(x)); the layer scales (``gamma_1``, ``gamma_2``)
  are per-channel, initialised to 1e-5;
* attention: one fused ``qkv`` Linear without bias; the ``_qkvb`` variants
  add ``q_bias`` and ``v_bias`` only (the key bias is a zero buffer, never
  stored); no q/k norm, no inner attention norm; biased output ``proj``;
* rotary position embedding (``RotaryEmbeddingDinoV3``) on q and k of the
  patch tokens only (the 5 prefix tokens are not rotated), per head
  (head_dim D): patch centre coordinates ``(i + 0.5) / h`` and
  ``(j + 0.5) / w``, each axis normalised by its own size ('separate'),
  mapped to [-1, 1]; periods ``100 ** (2k / (D / 2))`` for k < D / 4;
  angles ``2 pi coord / period`` laid out as [row angles, column angles]
  (D / 2), duplicated to D ('rotate_half' layout) and applied as
  ``x cos + rotate_half(x) sin`` with rotate_half(x) = [-x2, x1]; timm
  computes the periods in float32 (Meta's original stores them rounded to
  bfloat16, so timm, and jaxtl with it, differ slightly from Meta's code);
* the train-time coordinate augmentations (shift / jitter / rescale) exist
  in timm but these models leave them off (``rope_rescale_coords`` is
  commented out, ``aug_active`` is False), so train mode uses the same
  coordinates as eval; they are not implemented here;
* MLP: exact-erf GELU of width 4 x C (S, B, L); S+ uses SwiGLU
  (``fc1_g``, ``fc1_x``, ``fc2``: silu(fc1_g(x)) * fc1_x(x), hidden 4 x C
  rounded up to a multiple of 8);
* the final LayerNorm (``norm``) on every token; timm's default pooling is
  the mean of the patch tokens (``global_pool='avg'``, registers excluded,
  no fc_norm); its checkpoints have no classifier (``num_classes=0``).

jaxtl's features are the DINOv3 paper's linear probe instead: the class
token and the mean of the patch tokens (registers excluded), both after the
final norm, concatenated (``2 x C``). With ``probe_blocks=n`` the class
tokens of the last n blocks, each through the final norm, come first, then
the last block's patch mean (DINOv2's ``create_linear_input`` with
``avgpool=True``): ``(n + 1) x C``. The ``head`` is a new Dense on them.

Left out: ``vit_huge_plus`` (840 M parameters) and ``vit_7b`` (6.7 B) run the
same code but are too large to test for parity on a CPU here; the EUPE
(``eupe_lvd1689m``) distilled weights of tiny/small/base; timm's patch
dropout.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from jaxtl.errors import ConfigError
from jaxtl.models.layers import (Dropout, LayerNorm, check_rates, conv, dense, inference_mode, param, stochastic_depth)
from jaxtl.models.vit import QKV_INDEX, LayerScale, Mlp, SelfAttention, check_dimensions, fused_slice, \
    linear_probe_features
from jaxtl.registry import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LEAF_TO_TORCH,
    BackboneSpec,
    FlaxPath,
    SourceSpec,
    register,
    timm_hub_weights,
    timm_preprocessing,
)

NUM_PREFIX_TOKENS = 5  # class token + 4 registers

# ---------------------------------------------------------------------------
# Rotary position embedding (numpy, at trace time: it depends on the grid only).


def rope_sin_cos(grid_h: int, grid_w: int, head_dim: int, temperature: float = 100.0):
    """``(sin, cos)``, each ``(grid_h * grid_w, head_dim)`` float32, as timm's ``RotaryEmbeddingDinoV3``.

    Computed step by step in float32 as timm does, so the angles round the same way.
    """
    if head_dim % 4:
        raise ConfigError(f"DINOv3 rotary embedding needs head_dim divisible by 4, got {head_dim}")
    n = head_dim // 4
    f32 = np.float32
    exponents = f32(2.0) * np.arange(n, dtype=f32) / f32(head_dim // 2)
    periods = np.power(f32(temperature), exponents, dtype=f32)
    # Patch centres normalised by each axis's own size, then [0, 1] -> [-1, 1].
    rows = (np.arange(0.5, grid_h, dtype=f32) / f32(grid_h)).astype(f32)
    cols = (np.arange(0.5, grid_w, dtype=f32) / f32(grid_w)).astype(f32)
    coords = np.stack(np.meshgrid(rows, cols, indexing="ij"), axis=-1).reshape(-1, 2)
    coords = (f32(2.0) * coords - f32(1.0)).astype(f32)
    angles = (f32(2 * math.pi) * coords[:, :, None]).astype(f32) / periods[None, None, :]
    angles = angles.reshape(-1, 2 * n).astype(f32)   # [row angles, column angles]
    sin, cos = np.sin(angles).astype(f32), np.cos(angles).astype(f32)
    return np.concatenate([sin, sin], -1), np.concatenate([cos, cos], -1)


def rotate_patches(t, sin, cos):
    """Rope on the patch tokens of q or k; the class and register tokens are not rotated."""
    p = NUM_PREFIX_TOKENS
    return jnp.concatenate([t[:, :p], apply_rope(t[:, p:], sin, cos)], axis=1)


def apply_rope(x, sin, cos):
    """``x cos + rotate_half(x) sin`` on (batch, tokens, heads, head_dim); sin/cos (tokens, head_dim)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    sin = jnp.asarray(sin)[None, :, None, :]
    cos = jnp.asarray(cos)[None, :, None, :]
    return (x * cos.astype(x.dtype) + rotated * sin.astype(x.dtype)).astype(x.dtype)


# ---------------------------------------------------------------------------
# The network.


class SwiGLU(nn.Module):
    """silu(fc1_g(x)) * fc1_x(x) -> dropout -> fc2 -> dropout (timm's ``SwiGLU``, split fc1)."""

    hidden: int
    drop_rate: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, deterministic: bool):
        gate = dense(self.hidden, dtype=self.dtype, name="fc1_g")(x)
        y = jax.nn.silu(gate) * dense(self.hidden, dtype=self.dtype, name="fc1_x")(x)
        y = Dropout(self.drop_rate, axis_name=self.axis_name)(y, deterministic=deterministic)
        y = dense(x.shape[-1], dtype=self.dtype, name="fc2")(y)
        return Dropout(self.drop_rate, axis_name=self.axis_name)(y, deterministic=deterministic)


class Block(nn.Module):
    """x + ls1 * attn(norm1(x)), then x + ls2 * mlp(norm2(x)) (timm's ``EvaBlock``)."""

    num_heads: int
    mlp_hidden: int
    swiglu: bool = False
    qkv_bias: bool = False
    ln_epsilon: float = 1e-5
    layer_scale_init: float = 1e-5
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x, sin, cos, deterministic: bool):
        y = LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, name="norm1")(x)
        # timm's k_bias is a zero buffer: only q and v have a bias in the _qkvb variants.
        attn = SelfAttention(num_heads=self.num_heads, qkv_bias=self.qkv_bias, key_bias=False,
                             attn_drop_rate=self.attn_drop_rate, proj_drop_rate=self.proj_drop_rate, dtype=self.dtype,
                             axis_name=self.axis_name, name="attn")
        y = attn(y, deterministic, partial(rotate_patches, sin=sin, cos=cos))
        y = LayerScale(init_value=self.layer_scale_init, name="ls1")(y)
        x = x + stochastic_depth(self, y, self.drop_path_rate, deterministic, self.axis_name)
        y = LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, name="norm2")(x)
        mlp = SwiGLU if self.swiglu else Mlp
        y = mlp(hidden=self.mlp_hidden, drop_rate=self.proj_drop_rate, dtype=self.dtype, axis_name=self.axis_name,
                name="mlp")(y, deterministic)
        y = LayerScale(init_value=self.layer_scale_init, name="ls2")(y)
        return x + stochastic_depth(self, y, self.drop_path_rate, deterministic, self.axis_name)


class DinoV3ViT(nn.Module):
    """DINOv3 ViT on NHWC float input whose height and width are multiples of ``patch_size``.

    ``img_size`` is the size the model is described and initialised at (the
    preprocessing's crop); any other multiple of 16, square or not, runs as
    it is, since the rotary embedding is computed from the grid. Dropout
    follows timm's names (``drop_rate`` before the head, ``pos_drop_rate``
    after the tokens are concatenated, ``proj_drop_rate`` after the attention
    projection and in the MLP, ``attn_drop_rate`` on the attention weights,
    ``drop_path_rate`` the last block's stochastic depth, linear from 0); all
    are active only with ``train=True`` in groups not named in ``frozen``.

    ``features_only=True`` returns the head's input: the linear-probe
    features (see the module docstring), ``(probe_blocks + 1) * embed_dim``
    wide.
    """

    num_classes: int = 1000
    dtype: Any = jnp.float32
    img_size: int = 256
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    swiglu: bool = False
    swiglu_align_to: int = 8
    qkv_bias: bool = False
    num_reg_tokens: int = 4
    ln_epsilon: float = 1e-5
    layer_scale_init: float = 1e-5
    rope_temperature: float = 100.0
    probe_blocks: int = 1
    drop_rate: float = 0.0
    pos_drop_rate: float = 0.0
    proj_drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    axis_name: str | None = None

    def __post_init__(self):
        check_dimensions(self, "DINOv3 ViT")
        if self.num_reg_tokens != NUM_PREFIX_TOKENS - 1:
            raise ConfigError(f"DINOv3 ViT has {NUM_PREFIX_TOKENS - 1} register tokens, got {self.num_reg_tokens}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ConfigError(f"DINOv3 ViT embed_dim {self.embed_dim} / num_heads {self.num_heads} must give a "
                              "head width divisible by 4 (rotary embedding)")
        check_rates(self, "DINOv3 ViT", ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate",
                                         "drop_path_rate"))
        super().__post_init__()

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.embed_dim * self.mlp_ratio)
        if self.swiglu and self.swiglu_align_to:
            hidden += -hidden % self.swiglu_align_to   # timm's SwiGLU(align_to=8)
        return hidden

    def _check_input(self, x) -> None:
        if x.ndim != 4:
            raise ConfigError(f"DINOv3 ViT expects NHWC images (batch, height, width, channels), got shape {x.shape}")
        if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
            raise ConfigError(f"DINOv3 ViT needs height and width that are multiples of {self.patch_size}, got "
                              f"{x.shape[1]}x{x.shape[2]}")
        if x.shape[3] != self.in_chans:
            raise ConfigError(f"DINOv3 ViT expects {self.in_chans} channels (NHWC), got {x.shape[3]} "
                              f"(shape {x.shape})")

    @nn.compact
    def __call__(self, x, train: bool = False, frozen: Sequence[str] = (), features_only: bool = False):
        self._check_input(x)
        batch, width = x.shape[0], self.embed_dim
        grid_h, grid_w = x.shape[1] // self.patch_size, x.shape[2] // self.patch_size
        x = conv(width, self.patch_size, self.patch_size, 0, use_bias=True, dtype=self.dtype,
                 name="patch_embed")(x.astype(self.dtype))
        x = x.reshape(batch, grid_h * grid_w, width)
        cls_token = param(self, "cls_token", nn.initializers.truncated_normal(0.02), (1, 1, width), jnp.float32)
        reg_token = param(self, "reg_token", nn.initializers.truncated_normal(0.02),
                          (1, self.num_reg_tokens, width), jnp.float32)
        prefix = jnp.concatenate([cls_token, reg_token], axis=1).astype(self.dtype)
        x = jnp.concatenate([jnp.broadcast_to(prefix, (batch, NUM_PREFIX_TOKENS, width)), x], axis=1)
        x = Dropout(self.pos_drop_rate, axis_name=self.axis_name)(
            x, deterministic=inference_mode(train, "embed", frozen))

        sin, cos = rope_sin_cos(grid_h, grid_w, width // self.num_heads, self.rope_temperature)
        norm = LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, name="norm")
        class_tokens = []
        for i in range(self.depth):
            rate = self.drop_path_rate * i / (self.depth - 1) if self.depth > 1 else 0.0
            block = Block(num_heads=self.num_heads, mlp_hidden=self.mlp_hidden, swiglu=self.swiglu,
                          qkv_bias=self.qkv_bias, ln_epsilon=self.ln_epsilon, layer_scale_init=self.layer_scale_init,
                          proj_drop_rate=self.proj_drop_rate, attn_drop_rate=self.attn_drop_rate,
                          drop_path_rate=rate, dtype=self.dtype, axis_name=self.axis_name, name=f"blocks_{i}")
            x = block(x, sin, cos, inference_mode(train, f"block{i}", frozen))
            if self.depth - self.probe_blocks <= i < self.depth - 1:
                class_tokens.append(x[:, 0])
        features = linear_probe_features(norm, class_tokens, norm(x), NUM_PREFIX_TOKENS)
        if features_only:
            return features.astype(jnp.float32)
        features = Dropout(self.drop_rate, axis_name=self.axis_name)(
            features, deterministic=inference_mode(train, "head", frozen))
        return dense(self.num_classes, dtype=self.dtype, name="head")(features).astype(jnp.float32)


# ---------------------------------------------------------------------------
# Weight names (timm).

_BLOCK_NAMES = {("ls1",): "gamma_1", ("ls2",): "gamma_2"}


def timm_key_map(path: FlaxPath):
    collection, *modules, leaf = path
    if collection != "params":
        raise KeyError(f"no timm name for Flax leaf {'/'.join(path)}")
    if not modules:                                    # cls_token, reg_token
        if leaf not in ("cls_token", "reg_token"):
            raise KeyError(f"no timm name for Flax leaf {'/'.join(path)}")
        return leaf
    top, part = modules[0], tuple(modules[1:])
    if top.startswith("blocks_"):
        prefix = f"blocks.{int(top[len('blocks_'):])}"
        if part in _BLOCK_NAMES and leaf == "gamma":
            return f"{prefix}.{_BLOCK_NAMES[part]}"
        if part[:1] == ("attn",) and part[1:] in (("query",), ("key",), ("value",)):
            if leaf == "kernel":
                return f"{prefix}.attn.qkv.weight", fused_slice(QKV_INDEX[part[1]], leaf)
            if part[1] == "key":
                raise KeyError(f"timm has no key bias (Flax leaf {'/'.join(path)})")
            return f"{prefix}.attn.{part[1][0]}_bias"   # q_bias, v_bias
        return f"{prefix}.{'.'.join(part)}.{LEAF_TO_TORCH[(collection, leaf)]}"
    if top == "patch_embed":
        return f"patch_embed.proj.{LEAF_TO_TORCH[(collection, leaf)]}"
    return f"{top}.{LEAF_TO_TORCH[(collection, leaf)]}"   # norm, head


# ---------------------------------------------------------------------------
# Registry.

# name: (embed_dim, depth, num_heads, swiglu, qkv_bias, extra tags)
_ARCHS = {
    "vit_small_patch16_dinov3": (384, 12, 6, False, False, ()),
    "vit_small_patch16_dinov3_qkvb": (384, 12, 6, False, True, ()),
    "vit_small_plus_patch16_dinov3": (384, 12, 6, True, False, ()),
    "vit_small_plus_patch16_dinov3_qkvb": (384, 12, 6, True, True, ()),
    "vit_base_patch16_dinov3": (768, 12, 12, False, False, ()),
    "vit_base_patch16_dinov3_qkvb": (768, 12, 12, False, True, ()),
    "vit_large_patch16_dinov3": (1024, 24, 16, False, False, ("sat493m",)),
    "vit_large_patch16_dinov3_qkvb": (1024, 24, 16, False, True, ("sat493m",)),
}
_LETTER = {"small": "S", "small_plus": "S+", "base": "B", "large": "L"}

# timm's _dinov3_cfg: 256 px, crop_pct 1.0, bicubic, ImageNet mean/std; the
# satellite (sat493m) weights have their own mean/std.
_PRE = timm_preprocessing(256, 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
_SAT_PRE = timm_preprocessing(256, 1.0, "bicubic", (0.430, 0.411, 0.296), (0.213, 0.156, 0.143))
_TAG_PRE = {"lvd1689m": _PRE, "sat493m": _SAT_PRE}


def _weights(name: str, tag: str):
    # The checkpoints hold no classifier (timm's num_classes=0): convert with head="new".
    return timm_hub_weights(name, tag, _TAG_PRE[tag], note="no classifier: a new head is needed (head='new')",
                            num_classes=0)


def reference_features(model, images):
    """What ``features_only=True`` computes (``probe_blocks=1``), from timm's model: class token and patch
    mean of ``forward_features``; timm's own output is the patch mean alone."""
    import torch

    tokens = model.forward_features(images)
    return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)


def layer_groups(depth: int):
    return (
        ("embed", (("patch_embed",), ("cls_token",), ("reg_token",))),
        *[(f"block{i}", ((f"blocks_{i}",),)) for i in range(depth)],
        ("norm", (("norm",),)),
        ("head", (("head",),)),
    )


def _register_all() -> None:
    for name, (width, depth, heads, swiglu, qkv_bias, extra_tags) in _ARCHS.items():
        weights = tuple(_weights(name, tag) for tag in ("lvd1689m", *extra_tags))
        size = name[len("vit_"):name.index("_patch16")]
        register(BackboneSpec(
            name=name,
            family="dinov3",
            constructor=partial(DinoV3ViT, embed_dim=width, depth=depth, num_heads=heads, swiglu=swiglu,
                                qkv_bias=qkv_bias),
            sources={"timm": SourceSpec("timm", name, timm_key_map, weights, reference_features=reference_features)},
            layer_groups=layer_groups(depth),
            head_path=("head",),
            preprocessing=_PRE,
            default_source="timm",
            num_features=2 * width,
            description=(f"DINOv3 ViT-{_LETTER[size]}/16 ({depth} blocks, width {width}, {heads} heads, "
                         f"{'SwiGLU' if swiglu else 'GELU'} MLP, 4 registers, rotary positions"
                         f"{', q/v bias' if qkv_bias else ''}); features: class token + patch mean; "
                         "any multiple of 16 px"),
        ))


_register_all()
