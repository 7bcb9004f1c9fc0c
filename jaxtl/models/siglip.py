"""SigLIP (Zhai et al., 2023) and SigLIP 2 (Tschannen et al., 2025) image towers, from timm's weights.

timm's ``vit_{base,large}_patch16_siglip_N``, ``vit_so400m_patch14_siglip_N``
and ``vit_so400m_patch16_siglip_N`` are jaxtl's
:class:`~jaxtl.models.vit.VisionTransformer` with these options (checked in
timm's ``vision_transformer.py``):

* no class token; a position embedding over the patches only;
* LayerNorm eps 1e-6; exact GELU, except the so400m/16 towers' tanh GELU;
* multi-head attention pooling (MAP) after the final norm: one learned
  query attends over the patch tokens, then a projection and a residual MLP
  (timm's AttentionPoolLatent, big_vision's MAPHead);
* the checkpoints have no classifier (timm's ``num_classes=0``): the pooled
  vector is the image-text embedding.

Features (``features_only`` and the feature cache) are that pooled
embedding, what SigLIP's zero-shot classifier and linear probes read.
``webli`` is SigLIP, ``v2_webli`` SigLIP 2 (same image-tower architecture).
Left out: ``vit_so400m_patch14_siglip_384`` (384 is not a multiple of 14;
timm drops the last 6 pixels, use ``_378``), the ``_gap_`` variants (no MAP
head) and ``webli_ft_in1k`` (an ImageNet classifier).
"""

from __future__ import annotations

from functools import partial

from jaxtl.models.vit import VisionTransformer, layer_groups, timm_adapt_no_prefix, timm_key_map
from jaxtl.registry import INCEPTION_MEAN, INCEPTION_STD, BackboneSpec, SourceSpec, register, timm_hub_weights, \
    timm_preprocessing

# arch: (patch, embed_dim, depth, num_heads, mlp_ratio, act)
_ARCHS = {
    "vit_base_patch16": (16, 768, 12, 12, 4.0, "gelu"),
    "vit_large_patch16": (16, 1024, 24, 16, 4.0, "gelu"),
    "vit_so400m_patch14": (14, 1152, 27, 16, 3.7362, "gelu"),       # timm's ratio: int(1152 * 3.7362) = 4304
    "vit_so400m_patch16": (16, 1152, 27, 16, 3.7362, "gelu_tanh"),
}
# name: the tags timm publishes (the first is the default).
_TAGS = {
    "vit_base_patch16_siglip_224": ("v2_webli", "webli"),
    "vit_base_patch16_siglip_256": ("v2_webli", "webli", "webli_i18n"),
    "vit_base_patch16_siglip_384": ("v2_webli", "webli"),
    "vit_base_patch16_siglip_512": ("v2_webli", "webli"),
    "vit_large_patch16_siglip_256": ("v2_webli", "webli"),
    "vit_large_patch16_siglip_384": ("v2_webli", "webli"),
    "vit_so400m_patch14_siglip_224": ("v2_webli", "webli"),
    "vit_so400m_patch14_siglip_378": ("v2_webli", "webli"),
    "vit_so400m_patch16_siglip_256": ("v2_webli", "webli_i18n"),
    "vit_so400m_patch16_siglip_384": ("v2_webli",),
}
_LETTER = {768: "B", 1024: "L", 1152: "So400m"}


def _register_all() -> None:
    for name, tags in _TAGS.items():
        arch, _, size = name.partition("_siglip_")
        patch, width, depth, heads, mlp_ratio, act = _ARCHS[arch]
        # timm's pretrained_cfg: the name's size, crop_pct 0.9, bicubic, mean = std = 0.5.
        pre = timm_preprocessing(int(size), 0.9, "bicubic", INCEPTION_MEAN, INCEPTION_STD)
        weights = tuple(timm_hub_weights(name, tag, pre, num_classes=0) for tag in tags)
        register(BackboneSpec(
            name=name,
            family="siglip",
            constructor=partial(VisionTransformer, img_size=int(size), patch_size=patch, embed_dim=width,
                                depth=depth, num_heads=heads, mlp_ratio=mlp_ratio, act=act, class_token=False,
                                no_embed_class=True, pool="map"),
            sources={"timm": SourceSpec("timm", name, timm_key_map, weights, adapt=timm_adapt_no_prefix)},
            layer_groups=layer_groups(depth, ("patch_embed", "pos_embed"), ("attn_pool",)),
            head_path=("head",),
            preprocessing=pre,
            default_source="timm",
            num_features=width,
            description=f"SigLIP / SigLIP 2 image tower ViT-{_LETTER[width]}/{patch} ({depth} blocks, width "
                        f"{width}), attention pooling; features: the {width}-d image-text embedding; built for "
                        f"{size} px",
        ))


_register_all()
