"""CLIP image towers (Radford et al., 2021) and their OpenCLIP / MetaCLIP / DataComp / DFN retrainings, from timm.

timm's ``vit_{base_patch16,base_patch32,large_patch14}_clip_224`` are
jaxtl's :class:`~jaxtl.models.vit.VisionTransformer` with these options
(checked in timm's ``vision_transformer.py``):

* a LayerNorm after the embedding (``pre_norm``), and so no bias in the
  patch projection; LayerNorm eps 1e-5;
* class-token pooling after the final norm, then the image-text projection
  (768 -> 512, or 1024 -> 768 for L/14): timm holds it as ``head`` in these
  checkpoints, jaxtl as the backbone's ``proj``, with a new classifier after
  it;
* exact GELU. OpenAI's and MetaCLIP's weights were trained with QuickGELU
  (``x * sigmoid(1.702 x)``): timm's ``_quickgelu_`` names build that, and so
  do jaxtl's. timm also lists ``openai`` under the plain names (exact GELU);
  that pairing is timm's, kept for parity, but the ``_quickgelu_`` name is
  the network the weights were trained as.

Features (``features_only`` and the feature cache) are the projected
embedding, the space CLIP's zero-shot classifiers and linear probes use.
The ``_ft_in1k`` tags are ImageNet classifiers without the projection: not
registered.
"""

from __future__ import annotations

from functools import partial

from jaxtl.models.vit import VisionTransformer, layer_groups, timm_adapt, timm_clip_key_map
from jaxtl.registry import (INCEPTION_MEAN, INCEPTION_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, BackboneSpec, SourceSpec,
                            register, timm_hub_weights, timm_preprocessing)

# arch: (patch, embed_dim, depth, num_heads, projection width)
_ARCHS = {
    "vit_base_patch16": (16, 768, 12, 12, 512),
    "vit_base_patch32": (32, 768, 12, 12, 512),
    "vit_large_patch14": (14, 1024, 24, 16, 768),
}
# The tags timm publishes for each name (the first is the default), without the fine-tuned classifiers,
# with the crop_pct of timm's pretrained_cfg (224 px, bicubic) and, where they are not CLIP's,
# its mean and std ("inception": 0.5, LAION's ViT-L/14).
_TAGS = {
    "vit_base_patch16_clip_224": (("laion2b", 1.0), ("datacompxl", 1.0), ("dfn2b", 1.0), ("laion400m_e32", 1.0),
                                  ("metaclip_2pt5b", 1.0), ("metaclip_400m", 1.0), ("openai", 0.9)),
    "vit_base_patch32_clip_224": (("laion2b", 0.9), ("datacompxl", 1.0), ("laion400m_e32", 0.9),
                                  ("metaclip_2pt5b", 1.0), ("metaclip_400m", 1.0), ("openai", 0.9)),
    "vit_large_patch14_clip_224": (("laion2b", 1.0, "inception"), ("datacompxl", 1.0), ("dfn2b", 1.0),
                                   ("dfn2b_s39b", 1.0), ("laion400m_e32", 1.0), ("metaclip_2pt5b", 1.0),
                                   ("metaclip_400m", 1.0), ("openai", 1.0), ("apple_mclip2_dfndr2b", 1.0)),
    "vit_base_patch16_clip_quickgelu_224": (("openai", 0.9), ("metaclip_2pt5b", 1.0), ("metaclip_400m", 1.0)),
    "vit_base_patch32_clip_quickgelu_224": (("openai", 0.9), ("metaclip_2pt5b", 1.0), ("metaclip_400m", 1.0),
                                            ("laion400m_e32", 0.9)),
    "vit_large_patch14_clip_quickgelu_224": (("openai", 1.0), ("metaclip_2pt5b", 1.0), ("metaclip_400m", 1.0),
                                             ("dfn2b", 1.0)),
}
_STATS = {"clip": (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), "inception": (INCEPTION_MEAN, INCEPTION_STD)}


def _register_all() -> None:
    for name, tags in _TAGS.items():
        arch = name.split("_clip")[0]
        patch, width, depth, heads, proj = _ARCHS[arch]
        quick = "_quickgelu_" in name
        # timm's _quickgelu_ names read the files of the plain names.
        weights = [timm_hub_weights(name.replace("_quickgelu", ""), tag,
                                    timm_preprocessing(224, crop_pct, "bicubic", *_STATS[(*stats, "clip")[0]]),
                                    num_classes=0)
                   for tag, crop_pct, *stats in tags]
        source = SourceSpec("timm", name, timm_clip_key_map, tuple(weights), adapt=timm_adapt,
                            torch_kwargs={"num_classes": proj})
        register(BackboneSpec(
            name=name,
            family="clip",
            constructor=partial(VisionTransformer, img_size=224, patch_size=patch, embed_dim=width, depth=depth,
                                num_heads=heads, pre_norm=True, ln_epsilon=1e-5,
                                act="quick_gelu" if quick else "gelu", embed_proj=proj),
            sources={"timm": source},
            layer_groups=layer_groups(depth, ("patch_embed", "cls_token", "pos_embed", "norm_pre"), ("proj",)),
            head_path=("head",),
            preprocessing=weights[0].preprocessing,
            default_source="timm",
            num_features=proj,
            description=f"CLIP image tower ViT-{'B' if width == 768 else 'L'}/{patch} ({depth} blocks, width "
                        f"{width}{', QuickGELU' if quick else ''}); features: the {proj}-d image-text embedding; "
                        "224 px",
        ))


_register_all()
