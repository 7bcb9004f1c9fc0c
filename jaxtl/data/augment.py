"""On-device training augmentation: pure, jittable functions of (rng keys, batch).

The host ships uint8 NHWC batches that are already resized (shorter side ->
``resize_size``) and center-cropped to a square; everything random happens
here, on the device, so given keys always produce the same batch.

Every random function takes either one key per image (a key array of shape
(N,)) or a single key, which it splits into one per image. Image i's random
values come from its own key only, so an image is augmented the same way
whichever batch it is in: the train step passes keys folded with each
image's position in the global batch (``jaxtl.models.layers.example_keys``),
and the result does not depend on how many devices share the batch.

The semantics follow torchvision's tensor transforms:

* :func:`random_resized_crop` samples crops from the same distribution as
  ``RandomResizedCrop.get_params`` (not the same draws: JAX keys, not torch's
  generator) and resizes them like
  ``F.resized_crop(..., antialias=True)`` (bilinear, antialiased when
  downscaling, only pixels inside the crop contribute).
* :func:`random_horizontal_flip` flips each image with probability ``p``.
* :func:`color_jitter` follows ``ColorJitter`` (factors sampled per image,
  ops in a random order per image, clamped after each op) on float RGB in
  [0, 255] instead of [0, 1].

Sizes, ranges and probabilities are static Python values. The building
blocks are jitted internally (so eager calls compile once rather than op by
op) and inline into an outer ``jax.jit``; bind the static arguments with
``functools.partial`` before jitting a composition such as :func:`train_augment`.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Sequence, Union

import jax
import jax.numpy as jnp

from jaxtl.data.transforms import normalize
from jaxtl.data.preprocessing import Preprocessing
from jaxtl.rng import independent_keys

Range = Union[float, Sequence[float]]

# ITU-R 601-2 luma weights, as PIL's convert("L") uses them (torchvision's
# tensor path rounds the red weight to 0.2989: a difference below 0.03 / 255).
_LUMA = (0.299, 0.587, 0.114)
_MAX_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params tries 10 crops
_HIGHEST = jax.lax.Precision.HIGHEST  # resampling must not drop to bf16/tf32 matmuls


# --------------------------------------------------------------------------- keys


def image_keys(key, n: int):
    """One key per image, shape (n,): ``key`` itself when it is already that, else ``key`` split
    into n. Returned as :func:`jaxtl.rng.independent_keys`, ready to ``jax.vmap`` draws over."""
    key = jnp.asarray(key)
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)  # raw uint32 key data (jax.random.PRNGKey)
    if key.ndim == 0:
        key = jax.random.split(key, n)
    elif key.shape != (n,):
        raise ValueError(f"expected one key or one key per image ({n}), got keys of shape {key.shape}")
    return independent_keys(key)


def _uniform_per_image(key, n: int, count: int):
    """(n, count) float32 uniforms in [0, 1); row i drawn from image i's key alone.

    Each op draws all its numbers at once: every draw is a hash that XLA
    compiles on its own, and the compile time grows with their number.
    """
    return jax.vmap(lambda k: jax.random.uniform(k, (count,), jnp.float32))(image_keys(key, n))


def _scaled(u, lo, hi):
    """u uniform in [0, 1) -> uniform in [lo, hi) (as ``jax.random.uniform(minval, maxval)``)."""
    return jnp.maximum(lo, u * (hi - lo) + lo)


def _split_each(keys, num: int):
    """Each image's key split into ``num``: a tuple of ``num`` key arrays of shape (n,)."""
    parts = jax.vmap(lambda k: jax.random.split(k, num))(keys)
    return tuple(parts[:, i] for i in range(num))


# --------------------------------------------------------------------------- crop


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback when no attempt fits: a center crop clamped to the ratio range."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _uniform_index(u, count):
    """An integer uniform in [0, count) from u uniform in [0, 1).

    u takes 2**23 equally likely values, so a bin's probability is off by at
    most count / 2**23 relative (under 0.01 % for the few hundred positions
    of a crop); the clamp guards against u * count rounding up to count.
    """
    return jnp.minimum(jnp.floor(u * count).astype(jnp.int32), count - 1)


def _check_range(name: str, r) -> tuple[float, float]:
    lo, hi = (float(v) for v in r)
    if lo > hi:
        raise ValueError(f"{name} should be (min, max), got {r}")
    return lo, hi


def random_resized_crop_params(key, batch: int, height: int, width: int,
                               scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """Per-image crop boxes ``(top, left, h, w)``, each an int32 array of shape (batch,).

    ``key``: one key per image, or one key for the batch. Same distribution as
    torchvision's ``RandomResizedCrop.get_params``: up to 10 attempts with an
    area fraction uniform in ``scale`` and an aspect ratio log-uniform in
    ``ratio``; the first crop that fits is placed uniformly; if none fits, a
    center crop clamped to the ratio range.
    """
    return _crop_params(key, int(batch), int(height), int(width), _check_range("scale", scale),
                        _check_range("ratio", ratio))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _crop_params(key, batch, height, width, scale, ratio):
    # All 10 attempts of an image are drawn at once and the first that fits
    # is kept: the same distribution as torchvision's sequential loop, without
    # a data-dependent loop. 10 areas, 10 ratios and the placement: one draw.
    u = _uniform_per_image(key, batch, 2 * _MAX_ATTEMPTS + 2)
    u_area, u_ratio, u_place = u[:, :_MAX_ATTEMPTS], u[:, _MAX_ATTEMPTS:2 * _MAX_ATTEMPTS], u[:, 2 * _MAX_ATTEMPTS:]
    target_area = float(height * width) * _scaled(u_area, *scale)
    aspect = jnp.exp(_scaled(u_ratio, math.log(ratio[0]), math.log(ratio[1])))
    # jnp.round rounds half to even, like Python's round() in torchvision.
    ws = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    hs = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    fits = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(fits, axis=1)[:, None]  # the first attempt that fits (0 when none does)
    found = fits.any(axis=1)

    fb_top, fb_left, fb_h, fb_w = _fallback_crop(height, width, ratio)
    h = jnp.where(found, jnp.take_along_axis(hs, first, axis=1)[:, 0], fb_h)
    w = jnp.where(found, jnp.take_along_axis(ws, first, axis=1)[:, 0], fb_w)
    u_top, u_left = u_place[:, 0], u_place[:, 1]
    top = jnp.where(found, _uniform_index(u_top, height - h + 1), fb_top)
    left = jnp.where(found, _uniform_index(u_left, width - w + 1), fb_left)
    return top, left, h, w


def _axis_weights(start, length, out_size: int, in_size: int):
    """(out_size, in_size) bilinear resampling matrix for the window [start, start + length).

    Follows PyTorch's antialiased bilinear (``interpolate(..., antialias=True,
    align_corners=False)``, itself Pillow's resampler): the triangle filter is
    widened by the downscale factor, pixels outside the window get no weight
    (the crop happens before the resize), and each row is normalised to sum 1.
    When upscaling this reduces to ordinary bilinear with edge clamping.
    """
    scale = length.astype(jnp.float32) / out_size  # input pixels per output pixel
    support = jnp.maximum(scale, 1.0)
    # Coordinates relative to the window, so that they stay small, exact integers + 0.5.
    centers = scale * (jnp.arange(out_size, dtype=jnp.float32) + 0.5)
    pixels = (jnp.arange(in_size) - start).astype(jnp.float32) + 0.5
    weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels[None, :] - centers[:, None]) / support)
    inside = (pixels > 0) & (pixels < length.astype(jnp.float32))
    weights = jnp.where(inside[None, :], weights, 0.0)
    # Every row has weight >= 0.5 on the pixel nearest its center, so the sum is positive.
    return weights / weights.sum(axis=1, keepdims=True)


@functools.partial(jax.jit, static_argnames=("out_size",))
def resized_crop(images, top, left, h, w, out_size: int):
    """Crop each image to its own box and resize it to out_size x out_size (float32).

    ``top``, ``left``, ``h``, ``w``: int arrays of shape (batch,). The resize
    is separable antialiased bilinear, computed as two small matmuls per image
    (rows then columns), so the boxes may differ per image under jit.
    """
    images = jnp.asarray(images).astype(jnp.float32)
    _, height, width, _ = images.shape

    def one(image, t, l, hh, ww):
        wy = _axis_weights(t, hh, out_size, height)
        wx = _axis_weights(l, ww, out_size, width)
        rows = jnp.einsum("iy,yxc->ixc", wy, image, precision=_HIGHEST)
        return jnp.einsum("jx,ixc->ijc", wx, rows, precision=_HIGHEST)

    return jax.vmap(one)(images, top, left, h, w)


def random_resized_crop(key, images, out_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision ``RandomResizedCrop(out_size, scale, ratio, antialias=True)`` per image.

    ``key``: one key per image, or one key for the batch.
    ``images``: NHWC uint8 or float in [0, 255]. Returns float32 NHWC in
    [0, 255] (the filter weights are non-negative and sum to 1, so no clamping
    is needed) at out_size x out_size.
    """
    images = jnp.asarray(images)
    n, height, width, _ = images.shape
    top, left, h, w = random_resized_crop_params(key, n, height, width, scale, ratio)
    return resized_crop(images, top, left, h, w, out_size)


# --------------------------------------------------------------------------- flip


@functools.partial(jax.jit, static_argnames=("p",))
def random_horizontal_flip(key, images, p: float = 0.5):
    """Mirror each image left-right with probability ``p`` (NHWC, dtype kept).

    ``key``: one key per image, or one key for the batch.
    """
    images = jnp.asarray(images)
    flip = _uniform_per_image(key, images.shape[0], 1)[:, 0] < p
    return jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)


# --------------------------------------------------------------------------- colour
# Single-image ops on float RGB HWC in [0, 255]; ``factor`` is a scalar (traced or not).


def _grayscale(image):
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b


def _blend(image, other, factor):
    return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 255.0)


def _brightness(image, factor):
    return jnp.clip(factor * image, 0.0, 255.0)


def _contrast(image, factor):
    return _blend(image, jnp.mean(_grayscale(image)), factor)


def _saturation(image, factor):
    return _blend(image, _grayscale(image)[..., None], factor)


def _rgb_to_hsv(rgb):
    """torchvision's ``_rgb2hsv`` on [0, 1] floats (hue in [0, 1))."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc = jnp.max(rgb, axis=-1)
    minc = jnp.min(rgb, axis=-1)
    gray = maxc == minc
    chroma = maxc - minc
    # Gray pixels have zero chroma: divide by 1 instead so no NaN is ever produced.
    s = chroma / jnp.where(gray, 1.0, maxc)
    safe_chroma = jnp.where(gray, 1.0, chroma)
    rc = (maxc - r) / safe_chroma
    gc = (maxc - g) / safe_chroma
    bc = (maxc - b) / safe_chroma
    h = jnp.where(maxc == r, bc - gc, jnp.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = jnp.fmod(h / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _hsv_to_rgb(h, s, v):
    """torchvision's ``_hsv2rgb``: the hue sextant picks which of v, p, q, t go where."""
    i = jnp.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(jnp.int32) % 6
    p = jnp.clip(v * (1.0 - s), 0.0, 1.0)
    q = jnp.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = jnp.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    sextants = [i == k for k in range(5)]  # i == 5 is the default
    r = jnp.select(sextants, [v, q, p, p, t], v)
    g = jnp.select(sextants, [t, v, v, q, p], p)
    b = jnp.select(sextants, [p, p, t, v, v], q)
    return jnp.stack([r, g, b], axis=-1)


def _hue(image, shift):
    h, s, v = _rgb_to_hsv(image / 255.0)
    h = jnp.mod(h + shift, 1.0)
    return jnp.clip(_hsv_to_rgb(h, s, v) * 255.0, 0.0, 255.0)


_COLOR_OPS = (_brightness, _contrast, _saturation, _hue)


@functools.partial(jax.jit, static_argnums=(0,))
def _per_image(op, images, factors):
    images = jnp.asarray(images).astype(jnp.float32)
    factors = jnp.broadcast_to(jnp.asarray(factors, jnp.float32), images.shape[:1])
    return jax.vmap(op)(images, factors)


def adjust_brightness(images, factors):
    """``F.adjust_brightness`` per image: ``factors`` a scalar or shape (N,); 1 is the identity."""
    return _per_image(_brightness, images, factors)


def adjust_contrast(images, factors):
    """``F.adjust_contrast`` per image: blend with the mean of the image's grayscale."""
    return _per_image(_contrast, images, factors)


def adjust_saturation(images, factors):
    """``F.adjust_saturation`` per image: blend with the image's grayscale."""
    return _per_image(_saturation, images, factors)


def adjust_hue(images, shifts):
    """``F.adjust_hue`` per image: rotate the hue by ``shifts`` (in turns, within [-0.5, 0.5])."""
    return _per_image(_hue, images, shifts)


def _jitter_range(name: str, value: Range, center: float, bound: tuple[float, float],
                  clip_first: bool = True):
    """torchvision ``ColorJitter._check_input``: a number b means [center - b, center + b]."""
    if isinstance(value, numbers.Real):
        if value < 0:
            raise ValueError(f"If {name} is a single number, it must be non negative, got {value}")
        lo, hi = center - value, center + value
        if clip_first:
            lo = max(lo, 0.0)
    else:
        lo, hi = (float(v) for v in value)
    if not bound[0] <= lo <= hi <= bound[1]:
        raise ValueError(f"{name} values should be between {bound}, got ({lo}, {hi})")
    # A zero-width range at the identity factor means "no op": skip it entirely.
    return None if lo == hi == center else (lo, hi)


def color_jitter(key, images, brightness: Range = 0.0, contrast: Range = 0.0,
                 saturation: Range = 0.0, hue: Range = 0.0, random_order: bool = True):
    """torchvision ``ColorJitter`` per image on float RGB NHWC in [0, 255].

    ``key``: one key per image, or one key for the batch. Each of
    ``brightness``, ``contrast``, ``saturation`` is a number b (factor uniform
    in [max(0, 1 - b), 1 + b]) or a (min, max) range; ``hue`` is a number
    h <= 0.5 (shift uniform in [-h, h]) or a range within [-0.5, 0.5]. Ops
    left at 0 are skipped. Every image draws its own factors and, with
    ``random_order`` (torchvision's behaviour), its own order of the active
    ops; under vmap each step then evaluates every active op and selects one,
    so ``random_order=False`` (always brightness, contrast, saturation, hue)
    is cheaper: k active ops cost k evaluations instead of k * k.
    """
    ranges = (
        _jitter_range("brightness", brightness, 1.0, (0.0, math.inf)),
        _jitter_range("contrast", contrast, 1.0, (0.0, math.inf)),
        _jitter_range("saturation", saturation, 1.0, (0.0, math.inf)),
        _jitter_range("hue", hue, 0.0, (-0.5, 0.5), clip_first=False),
    )
    return _color_jitter(key, images, ranges, bool(random_order))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _color_jitter(key, images, ranges, random_order):
    images = jnp.asarray(images).astype(jnp.float32)
    active = [i for i, r in enumerate(ranges) if r is not None]
    if not active:
        return images
    ops = [_COLOR_OPS[i] for i in active]
    lo = jnp.asarray([ranges[i][0] for i in active], jnp.float32)
    hi = jnp.asarray([ranges[i][1] for i in active], jnp.float32)
    u = _uniform_per_image(key, images.shape[0], 2 * len(ops))
    factors = _scaled(u[:, :len(ops)], lo, hi)

    if not random_order or len(ops) == 1:
        def one(image, f):
            for j, op in enumerate(ops):
                image = op(image, f[j])
            return image
        return jax.vmap(one)(images, factors)

    # Ranking i.i.d. uniforms gives a uniformly random permutation per image.
    orders = jnp.argsort(u[:, len(ops):], axis=1)
    branches = [lambda image, f, j=j: ops[j](image, f[j]) for j in range(len(ops))]

    def one_ordered(image, f, order):
        # A loop rather than unrolled steps: the switch is traced and compiled once.
        step = lambda i, x: jax.lax.switch(order[i], branches, x, f)
        return jax.lax.fori_loop(0, len(ops), step, image)

    return jax.vmap(one_ordered)(images, factors, orders)


# --------------------------------------------------------------------------- composition


def train_augment(key, images_uint8, pre: Preprocessing, *, hflip: bool = True,
                  jitter: tuple[Range, Range, Range, Range] = (0.0, 0.0, 0.0, 0.0),
                  scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), jitter_random_order: bool = True,
                  auto=None, erase=None):
    """Random resized crop -> horizontal flip -> colour jitter -> automatic augmentation -> normalise
    -> random erasing (timm's order).

    ``images_uint8``: NHWC from the host (resized and center-cropped to
    ``pre.resize_size``). Returns float32 NHWC at ``pre.input_size``,
    normalised with ``pre.mean`` / ``pre.std``. ``jitter`` is (brightness,
    contrast, saturation, hue) as in :func:`color_jitter`. ``key``: one key
    per image (each image's crop, flip and jitter come from its own key), or
    one key for the batch. ``auto(keys, images)``: automatic augmentation on [0, 255] images (a
    policy of :mod:`jaxtl.data.autoaugment` bound with ``functools.partial``); ``erase(keys,
    images)``: random erasing on the normalised images. Bind everything but ``key`` and ``images``
    with ``functools.partial`` before jitting.
    """
    k_crop, k_flip, k_jitter = _split_each(image_keys(key, images_uint8.shape[0]), 3)
    x = random_resized_crop(k_crop, images_uint8, pre.input_size, scale, ratio)
    if hflip:
        x = random_horizontal_flip(k_flip, x)
    x = color_jitter(k_jitter, x, *jitter, random_order=jitter_random_order)
    # Keys of their own, folded from the crop's, so the draws above stay what they were without them.
    if auto is not None:
        x = auto(jax.vmap(lambda k: jax.random.fold_in(k, 1))(k_crop), x)
    x = normalize(x, pre, xp=jnp)
    if erase is not None:
        x = erase(jax.vmap(lambda k: jax.random.fold_in(k, 2))(k_crop), x)
    return x


def eval_prepare(images_uint8, pre: Preprocessing):
    """Evaluation batches: the host already resized and center-cropped, so only normalise."""
    return normalize(images_uint8, pre, xp=jnp)
