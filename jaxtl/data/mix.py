"""Mixup (Zhang et al., 2018) and CutMix (Yun et al., 2019) on the device, per example.

As timm's ``Mixup`` in its per-example mode ("elem"): every example draws whether it is mixed
(``prob``), whether by CutMix or by Mixup (``switch_prob``, when both are on) and its own
``lam ~ Beta(alpha, alpha)``; a CutMix box covers ``1 - lam`` of the image (timm's ``rand_bbox``)
and ``lam`` is then corrected to the area the box really keeps (``correct_lam``). The targets mix
with the same ``lam``: ``lam * y_i + (1 - lam) * y_partner``, after label smoothing, as timm's
``mixup_target``, and the loss is the soft-target cross-entropy.

The partner of example ``i`` is its neighbour ``i ^ 1`` in the global batch (timm uses the
flipped batch). Neighbours never straddle two devices when the per-device batch is even, so
the mixed batch, like every other random draw, does not depend on how many devices share the
batch. Every draw comes from the example's own key (its position in the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp

from jaxtl.errors import ConfigError


@dataclass(frozen=True)
class MixConfig:
    mixup_alpha: float = 0.0       # Beta(alpha, alpha) of Mixup; 0: off
    cutmix_alpha: float = 0.0      # Beta(alpha, alpha) of CutMix; 0: off
    prob: float = 1.0              # probability that an example is mixed at all
    switch_prob: float = 0.5       # with both on: probability of CutMix instead of Mixup

    def __post_init__(self):
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ConfigError(f"--mixup and --cutmix are Beta(alpha, alpha) parameters, >= 0 (0: off); got "
                              f"{self.mixup_alpha} and {self.cutmix_alpha}")
        for name, value in (("--mixup-prob", self.prob), ("--mixup-switch-prob", self.switch_prob)):
            if not 0 <= value <= 1:
                raise ConfigError(f"{name} must be in [0, 1], got {value}")

    @property
    def enabled(self) -> bool:
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.prob > 0


@dataclass(frozen=True)
class MixDraws:
    """Each example's draws: ``lam`` (corrected for CutMix), whether CutMix, and its box."""

    lam: jax.Array        # (N,) float32: the weight of the example itself
    cutmix: jax.Array     # (N,) bool
    box: jax.Array        # (N, 4) int32: top, bottom, left, right (exclusive), for CutMix


def _beta(key, alpha: float):
    return jax.random.beta(key, alpha, alpha) if alpha > 0 else jnp.ones((), jnp.float32)


def draw(keys, height: int, width: int, cfg: MixConfig) -> MixDraws:
    """The draws of every example from its own key (``keys``: one per example)."""

    def one(key):
        k_mix, k_switch, k_mixup, k_cutmix, k_y, k_x = jax.random.split(key, 6)
        mixed = jax.random.bernoulli(k_mix, cfg.prob)
        if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
            use_cutmix = jax.random.bernoulli(k_switch, cfg.switch_prob)
        else:
            use_cutmix = jnp.asarray(cfg.cutmix_alpha > 0)
        lam = jnp.where(use_cutmix, _beta(k_cutmix, cfg.cutmix_alpha), _beta(k_mixup, cfg.mixup_alpha))
        # timm's rand_bbox: a box of (1 - lam) of the area, centred uniformly, clipped to the image.
        ratio = jnp.sqrt(1.0 - lam)
        cut_h, cut_w = (height * ratio).astype(jnp.int32), (width * ratio).astype(jnp.int32)
        cy = jax.random.randint(k_y, (), 0, height)
        cx = jax.random.randint(k_x, (), 0, width)
        top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
        left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
        kept = 1.0 - (bottom - top) * (right - left) / (height * width)
        lam = jnp.where(use_cutmix, kept, lam)
        lam = jnp.where(mixed, lam, 1.0).astype(jnp.float32)
        return lam, use_cutmix & mixed, jnp.stack([top, bottom, left, right]).astype(jnp.int32)

    lam, cutmix, box = jax.vmap(one)(keys)
    return MixDraws(lam, cutmix, box)


def partner(x: jax.Array) -> jax.Array:
    """Each example's partner: its neighbour (0 <-> 1, 2 <-> 3, ...); an odd last example is its own."""
    n = x.shape[0]
    index = jnp.arange(n) ^ 1
    return x[jnp.where(index < n, index, jnp.arange(n))]


def mix_images(draws: MixDraws, images: jax.Array) -> jax.Array:
    """NHWC images mixed with their partners: a blend (Mixup) or a pasted box (CutMix)."""
    other = partner(images)
    rows = jnp.arange(images.shape[1])[None, :, None]
    cols = jnp.arange(images.shape[2])[None, None, :]
    top, bottom, left, right = (draws.box[:, i, None, None] for i in range(4))
    inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right) & draws.cutmix[:, None, None]
    lam = draws.lam.astype(images.dtype)[:, None, None, None]
    blend = (lam < 1) & ~draws.cutmix[:, None, None, None]  # an example left unmixed stays bit for bit
    blended = jnp.where(blend, lam * images + (1 - lam) * other, images)
    return jnp.where(inside[..., None], other, blended)


def mix_targets(draws: MixDraws, targets: jax.Array) -> jax.Array:
    """Soft targets (N, classes) mixed with the partners' by each example's ``lam``: rows still sum to 1."""
    lam = draws.lam[:, None]
    return jnp.where(lam < 1, lam * targets + (1.0 - lam) * partner(targets), targets)


def mix_keys(step_key: jax.Array) -> jax.Array:
    """The key of a step's mixing draws (the forward pass and the loss draw the same from it)."""
    return jax.random.fold_in(step_key, 0x313)
