"""DINOv2 (Oquab et al., 2023) and DINOv2 with registers (Darcet et al., 2024), from timm's weights.

timm's ``vit_{small,base,large,giant}_patch14_dinov2`` and
``vit_*_patch14_reg4_dinov2`` are jaxtl's :class:`~jaxtl.models.vit.VisionTransformer`
with these options (checked in timm's ``vision_transformer.py``):

* patch 14, built for 518 px (a 37 x 37 grid); any multiple of 14 works,
  converting resamples the position embedding the way timm's checkpoint
  filter does (bicubic, antialiased);
* LayerScale on both residual branches (``init_values=1e-5``), LayerNorm eps
  1e-6, exact GELU; giant: timm's SwiGLUPacked MLP (fc1 8192 wide,
  ``silu(first half) * second half``, fc2 from 4096);
* ``_reg4_``: 4 register tokens after the class token, and a position
  embedding over the patches only (``no_embed_class``);
* the checkpoints have no classifier (timm's ``num_classes=0``).

Features (``features_only`` and the feature cache) are the papers' linear
probe: the class token concatenated with the mean of the patch tokens, both
after the final norm (2 x width; registers excluded). ``probe_blocks=4``
prepends the class tokens of the last 4 blocks (DINOv2's linear evaluation
with ``n_last_blocks=4``, ``avgpool=True``; 5 x width). ``--strategy
feature_extract`` uses the default, one block: it is what both papers' linear
probes report and keeps the cached features half the size of the 4-block
variant.
"""

from __future__ import annotations

from functools import partial

from jaxtl.models.vit import VisionTransformer, layer_groups, timm_adapt, timm_adapt_no_prefix, timm_key_map
from jaxtl.registry import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, SourceSpec, register, timm_hub_weights, \
    timm_preprocessing

# timm's pretrained_cfg of the lvd142m tag: 518 px, crop_pct 1.0, bicubic, ImageNet statistics.
PREPROCESSING = timm_preprocessing(518, 1.0, "bicubic", IMAGENET_MEAN, IMAGENET_STD)
TAG = "lvd142m"

# size: (embed_dim, depth, num_heads, mlp act, mlp_ratio)
_SIZES = {
    "small": (384, 12, 6, "gelu", 4.0),
    "base": (768, 12, 12, "gelu", 4.0),
    "large": (1024, 24, 16, "gelu", 4.0),
    "giant": (1536, 40, 24, "swiglu", 2.66667 * 2),   # timm's ratio: fc1 = int(1536 * 5.33334) = 8192
}


def reference_features(model, images):
    """What jaxtl's ``features_only`` computes, from timm's model: class token and patch mean."""
    import torch

    tokens = model.forward_features(images)
    return torch.cat([tokens[:, 0], tokens[:, model.num_prefix_tokens:].mean(dim=1)], dim=-1)


def _register_all() -> None:
    for size, (width, depth, heads, act, mlp_ratio) in _SIZES.items():
        for registers in (0, 4):
            name = f"vit_{size}_patch14_{'reg4_' if registers else ''}dinov2"
            weights = (timm_hub_weights(name, TAG, PREPROCESSING, num_classes=0),)
            source = SourceSpec("timm", name, timm_key_map, weights,
                                adapt=timm_adapt_no_prefix if registers else timm_adapt,
                                reference_features=reference_features)
            register(BackboneSpec(
                name=name,
                family="dinov2",
                constructor=partial(VisionTransformer, img_size=518, patch_size=14, embed_dim=width, depth=depth,
                                    num_heads=heads, mlp_ratio=mlp_ratio, act=act, layer_scale=1e-5,
                                    reg_tokens=registers, no_embed_class=bool(registers), pool="token_patch_mean"),
                sources={"timm": source},
                layer_groups=layer_groups(depth, ("patch_embed", "cls_token", "pos_embed")
                                          + (("reg_token",) if registers else ())),
                head_path=("head",),
                preprocessing=PREPROCESSING,
                default_source="timm",
                num_features=2 * width,
                description=f"DINOv2 ViT-{size[0].upper()}/14{' with 4 registers' if registers else ''} "
                            f"({depth} blocks, width {width}), self-supervised on LVD-142M; features: class "
                            "token + patch mean; built for 518 px (img_size=N, a multiple of 14)",
            ))


_register_all()
