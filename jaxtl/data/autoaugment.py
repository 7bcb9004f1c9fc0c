"""Automatic augmentation (timm's RandAugment, torchvision's TrivialAugmentWide) and random erasing.

Pure, jittable functions of (keys, batch), with the conventions of
:mod:`jaxtl.data.augment`: one key per image (or one key, split into one per
image), image i's draws come from key i alone, float32 NHWC images in
[0, 255] (after the crop), static configuration bound before ``jax.jit``.

Policies (:class:`AutoAugment`, usually from :func:`parse_auto_augment`):

* ``rand`` (timm's ``rand_augment_transform``, e.g. ``rand-m9-mstd0.5-inc1``):
  each image applies ``num_ops`` ops picked uniformly with replacement from
  ``ops``; each applies with probability ``prob``. The magnitude m is
  ``magnitude`` (on timm's 0-10 scale, ``_LEVEL_DENOM`` = 10), with gaussian
  noise of std ``magnitude_std`` drawn per op application (above 100:
  uniform in [0, magnitude]), then clipped to [0, ``magnitude_max``].
* ``trivial`` (torchvision's ``TrivialAugmentWide``, 31 magnitude bins):
  each image applies one op picked uniformly from ``ops``, at a magnitude
  bin b picked uniformly from 0..30. The rand-only fields are ignored.

Signed ops take a random sign per application (timm's ``_randomly_negate``,
torchvision's coin flip). Ranges, for m in [0, 10] (rand) and b in 0..30 (trivial):

=====================  ===========================================  ======================================
op                     rand (timm)                                  trivial (torchvision)
=====================  ===========================================  ======================================
Identity               --                                           no change
AutoContrast           per-channel min/max stretched to 0..255      same
Equalize               per-channel histogram equalisation (PIL)     same
Invert                 255 - x                                      --
Rotate                 +-30 m/10 degrees about the centre           +-135 b/30 degrees
ShearX, ShearY         +-0.3 m/10 (about the top-left corner)       +-0.99 b/30
TranslateXRel, YRel    +-0.45 m/10 of the width / height            --
TranslateX, Y          --                                           +-int(32 b/30) pixels
Posterize              keep floor(4 m/10) bits (0 bits: black)      keep 8 - round(b/5) bits
Solarize               invert >= min(256, floor(256 m/10))          invert >= 255 - 255 b/30
SolarizeAdd            +min(128, floor(110 m/10)) below 128         --
Enhance ops (*)        PIL enhance factor 0.1 + 1.8 m/10            factor 1 +- 0.99 b/30
=====================  ===========================================  ======================================

(*) Color, Contrast, Brightness and Sharpness: PIL's ``ImageEnhance`` blends
with grayscale, the mean gray, black and the SMOOTH-filtered image.

With ``increasing`` (timm's ``inc1``, ``_RAND_INCREASING_TRANSFORMS``) the
distortion grows with m: PosterizeIncreasing keeps 4 - floor(4 m/10) bits
(4 bits at m = 0, so it is not the identity there), SolarizeIncreasing
inverts >= 256 - min(256, floor(256 m/10)), and ColorIncreasing,
ContrastIncreasing, BrightnessIncreasing, SharpnessIncreasing use the factor
max(0.1, 1 +- 0.9 m/10); every other increasing op is the identity at m = 0.
Above m = 10 (``magnitude_max`` > 10) the formulas extrapolate as timm's do.

Ops that ignore the magnitude: AutoContrast, Equalize, Invert, Identity.

Geometric ops resample like PIL's ``Image.transform(AFFINE)``/``rotate``
(output pixel centres mapped through the inverse affine map; sample points
outside the image take the fill value): nearest gives PIL's pixels, bilinear
PIL's within 1 (PIL truncates to uint8). rand uses bilinear resampling
(timm's default picks bilinear or bicubic at random per op; bicubic is not
offered); trivial uses nearest (torchvision's default). The fill is timm's ``img_mean``
for rand (ImageNet mean x 255, rounded: (124, 116, 104); see :func:`mean_fill`)
and 0 for trivial (torchvision's ``fill=None``); both can be overridden.

Differences from PIL-based timm/torchvision: images stay float between ops
(PIL rounds to uint8 after every op). Ops defined on integer levels look at
the values rounded to integers: Posterize (whose output is integer), the
Solarize and SolarizeAdd thresholds, Equalize (integer output) and the
AutoContrast range; Color and Contrast use PIL's integer luma and rounded
mean, Sharpness PIL's SMOOTH kernel with a rounded result and the 1-pixel
border kept. On uint8-valued input every colour op then matches PIL within
1 (PIL truncates where these keep the fraction). Posterize to 0 bits gives
black, as older Pillow did (current Pillow refuses it). Under ``jax.vmap`` a
per-image ``lax.switch`` evaluates every branch and selects one, so an op
step costs about the sum of the distinct op kinds in ``ops`` (all geometric
ops share one resampling branch). Random numbers come from JAX keys, so the
draws follow timm's/torchvision's distributions, not their streams.

:func:`random_erasing` is timm's ``RandomErasing(mode='pixel')`` with one
rectangle per image, on normalised images.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from jaxtl.data.augment import _blend, _brightness, _split_each, _uniform_index, image_keys
from jaxtl.errors import ConfigError

LEVEL_DENOM = 10.0  # timm's _LEVEL_DENOM: magnitude m means the fraction m / 10 of each op's range
TRIVIAL_BINS = 31  # torchvision's TrivialAugmentWide num_magnitude_bins
IMAGENET_FILL = (124.0, 116.0, 104.0)  # timm's img_mean for ImageNet's mean: round(255 * mean)

RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
    "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
    "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
TRIVIAL_OPS = (
    "Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
    "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize",
)
MAGNITUDE_FREE_OPS = frozenset({"AutoContrast", "Equalize", "Invert", "Identity"})

_HIGHEST = jax.lax.Precision.HIGHEST


def mean_fill(mean: Sequence[float]) -> tuple[float, ...]:
    """timm's ``img_mean`` fill for a normalisation mean in [0, 1]: ``min(255, round(255 * m))``."""
    return tuple(float(min(255, round(255 * m))) for m in mean)


# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class AutoAugment:
    """An automatic augmentation policy: static configuration, hashable (bind it before jit).

    ``ops`` left empty means the policy's full list: :data:`RAND_OPS`,
    :data:`RAND_INCREASING_OPS` (``increasing``) or :data:`TRIVIAL_OPS`; a
    subset of that list restricts the choice. ``kind='trivial'`` ignores the
    other fields.
    """

    kind: str
    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.0
    magnitude_max: float = 10.0
    increasing: bool = False
    prob: float = 0.5
    ops: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in ("rand", "trivial"):
            raise ConfigError(f"auto-augment kind {self.kind!r}: expected 'rand' or 'trivial'")
        checks = (
            (self.magnitude >= 0, f"magnitude {self.magnitude} must be >= 0"),
            (self.num_ops >= 0 and int(self.num_ops) == self.num_ops,
             f"num_ops {self.num_ops} must be an integer >= 0"),
            (self.magnitude_std >= 0, f"magnitude_std {self.magnitude_std} must be >= 0"),
            (self.magnitude_max > 0, f"magnitude_max {self.magnitude_max} must be > 0"),
            (0.0 <= self.prob <= 1.0, f"prob {self.prob} must be within [0, 1]"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"auto-augment: {message}")
        allowed = _default_ops(self.kind, self.increasing)
        ops = tuple(self.ops) or allowed
        unknown = [op for op in ops if op not in allowed]
        if unknown:
            raise ConfigError(f"auto-augment ops {unknown} are not in the {self.kind} list {list(allowed)}")
        object.__setattr__(self, "ops", ops)
        object.__setattr__(self, "num_ops", int(self.num_ops))


def _default_ops(kind: str, increasing: bool) -> tuple[str, ...]:
    if kind == "trivial":
        return TRIVIAL_OPS
    return RAND_INCREASING_OPS if increasing else RAND_OPS


_SPEC_HINT = ("expected timm's 'rand-m9-mstd0.5' form (m: magnitude 0-10, n: ops, mstd, inc1, mmax, p) "
              "or 'trivial'")
_SECTION = re.compile(r"(mstd|mmax|inc|m|n|p)(\d+(?:\.\d*)?|\.\d+)")


def parse_auto_augment(spec: str) -> AutoAugment:
    """timm's ``--aa`` strings: ``rand-m9-mstd0.5``, ``rand-m9-n3-mstd0.5-inc1``, ``rand-m7-mstd0.5-inc1-mmax10``,
    ``rand-m9-p0.5``, ...; and ``trivial``. Sections may come in any order; absent ones take timm's
    defaults (m 10, n 2, mstd 0, mmax 10, p 0.5). Raises :class:`ConfigError` with one line otherwise.

    Stricter than timm, which ignores sections without digits and reads ``inc0`` as increasing:
    here unknown or repeated sections are errors and ``inc0`` means not increasing.
    """
    def fail(why: str):
        raise ConfigError(f"--aa {spec!r}: {why}; {_SPEC_HINT}")

    if not isinstance(spec, str):
        fail("not a string")
    if spec == "trivial":
        return AutoAugment(kind="trivial", num_ops=1, prob=1.0)
    parts = spec.split("-")
    if parts[0] != "rand":
        fail(f"unknown policy {parts[0]!r}")
    values: dict[str, float] = {}
    for part in parts[1:]:
        match = _SECTION.fullmatch(part)
        if match is None:
            fail(f"unknown section {part!r}")
        name, number = match.group(1), float(match.group(2))
        if name in values:
            fail(f"section {name!r} given twice")
        values[name] = number
    if "n" in values and values["n"] != int(values["n"]):
        fail(f"n must be an integer, got {values['n']}")
    if values.get("inc", 0.0) not in (0.0, 1.0):
        fail(f"inc must be 0 or 1, got {values['inc']}")
    if not 0.0 <= values.get("p", 0.5) <= 1.0:
        fail(f"p must be within [0, 1], got {values['p']}")
    if values.get("mmax", 1.0) <= 0:
        fail(f"mmax must be > 0, got {values['mmax']}")
    mstd = values.get("mstd", 0.0)
    return AutoAugment(
        kind="rand",
        magnitude=values.get("m", LEVEL_DENOM),
        num_ops=int(values.get("n", 2)),
        magnitude_std=math.inf if mstd > 100 else mstd,  # timm: above 100 means uniform magnitudes
        magnitude_max=values.get("mmax", LEVEL_DENOM),
        increasing=values.get("inc", 0.0) == 1.0,
        prob=values.get("p", 0.5),
    )


# --------------------------------------------------------------------------- single-image ops
# Every op takes one float32 HWC RGB image in [0, 255] and returns one; the scalar arguments
# may be traced. They inline into the callers' jit; jit them yourself for eager use.


def _levels(image):
    """The values as PIL sees them: rounded to integers in [0, 255]."""
    return jnp.clip(jnp.round(image), 0.0, 255.0)


def _pil_luma(image):
    """PIL's ``convert('L')``: (19595 R + 38470 G + 7471 B + 2**15) >> 16, exact in float32 on uint8 values."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return jnp.floor((19595.0 * r + 38470.0 * g + 7471.0 * b + 32768.0) / 65536.0)


def invert(image):
    """``ImageOps.invert``: 255 - x."""
    return 255.0 - image


def auto_contrast(image):
    """``ImageOps.autocontrast`` (cutoff 0): each channel's [lowest, highest] level stretched to [0, 255];
    a channel with a single level is left as it is."""
    v = _levels(image)
    lo = jnp.min(v, axis=(0, 1))
    hi = jnp.max(v, axis=(0, 1))
    scale = 255.0 / jnp.where(hi > lo, hi - lo, 1.0)
    return jnp.where(hi > lo, jnp.clip((image - lo) * scale, 0.0, 255.0), image)


def _equalize_channel(x):
    v = _levels(x).astype(jnp.int32)
    hist = jnp.zeros(256, jnp.int32).at[v].add(1)
    last = 255 - jnp.argmax(hist[::-1] > 0)  # the highest level present
    step = (x.size - hist[last]) // 255
    ok = (jnp.sum(hist > 0) > 1) & (step > 0)
    safe_step = jnp.maximum(step, 1)
    lut = (safe_step // 2 + jnp.cumsum(hist) - hist) // safe_step
    lut = jnp.minimum(lut, 255).astype(jnp.float32)
    return jnp.where(ok, lut[v], x)


def equalize(image):
    """``ImageOps.equalize`` per channel: PIL's lookup table (step = (pixels - count of the top level) // 255)
    on the rounded levels; a channel PIL leaves alone (one level, or step 0) is returned as it is."""
    return jax.vmap(_equalize_channel, in_axes=2, out_axes=2)(image)


def posterize(image, bits):
    """``ImageOps.posterize``: keep the top ``bits`` bits of the rounded levels; bits >= 8 returns the
    image unchanged (timm), bits <= 0 gives black (older Pillow's mask)."""
    q = jnp.exp2(jnp.clip(8.0 - jnp.asarray(bits, jnp.float32), 0.0, 8.0))
    return jnp.where(bits >= 8, image, jnp.floor(_levels(image) / q) * q)


def solarize(image, threshold):
    """``ImageOps.solarize``: invert the pixels whose rounded level is >= ``threshold`` (256: identity)."""
    return jnp.where(_levels(image) < threshold, image, 255.0 - image)


def solarize_add(image, add, threshold=128.0):
    """timm's ``solarize_add``: add ``add`` (capped at 255) to the pixels whose rounded level is below
    ``threshold``."""
    return jnp.where(_levels(image) < threshold, jnp.minimum(image + add, 255.0), image)


def color(image, factor):
    """``ImageEnhance.Color``: blend with PIL's (integer) luma; 1 is the identity, 0 is grayscale."""
    return _blend(image, _pil_luma(image)[..., None], factor)


def contrast(image, factor):
    """``ImageEnhance.Contrast``: blend with the rounded mean of PIL's luma."""
    mean = jnp.floor(jnp.mean(_pil_luma(image)) + 0.5)
    return _blend(image, mean, factor)


def brightness(image, factor):
    """``ImageEnhance.Brightness``: blend with black (factor x image, clipped)."""
    return _brightness(image, factor)


def _smooth(image):
    """PIL's ``ImageFilter.SMOOTH`` (3x3 kernel 1 1 1 / 1 5 1 / 1 1 1, divided by 13), rounded; the
    1-pixel border keeps the input, as PIL's 3x3 filter does."""
    h, w = image.shape[:2]
    total = 4.0 * image[1:-1, 1:-1]  # the centre weighs 5: 4 here and 1 in the loop
    for dy in range(3):
        for dx in range(3):
            total = total + image[dy:h - 2 + dy, dx:w - 2 + dx]
    return image.at[1:-1, 1:-1].set(jnp.round(total / 13.0))


def sharpness(image, factor):
    """``ImageEnhance.Sharpness``: blend with the SMOOTH-filtered image (factor 0 blurs, 2 sharpens)."""
    return _blend(image, _smooth(image), factor)


def affine(image, matrix, fill=IMAGENET_FILL, interpolation="bilinear"):
    """PIL's ``Image.transform(size, AFFINE, matrix)``: output pixel (x, y), centre (x + .5, y + .5), samples
    the input at (a x + b y + c, d x + e y + f) for ``matrix`` = (a, b, c, d, e, f) in pixel units.

    Sample points outside [0, W) x [0, H) take ``fill`` (one value per channel). ``interpolation``
    (static): 'nearest' takes the pixel containing the point; 'bilinear' weighs the 4 nearest pixel
    centres, with the neighbours clamped to the image (PIL's edge handling).
    """
    h, w = image.shape[:2]
    a, b, c, d, e, f = (matrix[i] for i in range(6))
    ys = jnp.arange(h, dtype=jnp.float32)[:, None] + 0.5
    xs = jnp.arange(w, dtype=jnp.float32)[None, :] + 0.5
    x_in = a * xs + b * ys + c
    y_in = d * xs + e * ys + f
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    if interpolation == "nearest":
        xi = jnp.clip(jnp.floor(x_in), 0, w - 1).astype(jnp.int32)
        yi = jnp.clip(jnp.floor(y_in), 0, h - 1).astype(jnp.int32)
        out = image[yi, xi]
    elif interpolation == "bilinear":
        xf, yf = x_in - 0.5, y_in - 0.5
        x0, y0 = jnp.floor(xf), jnp.floor(yf)
        dx, dy = (xf - x0)[..., None], (yf - y0)[..., None]
        x0i = jnp.clip(x0, 0, w - 1).astype(jnp.int32)
        x1i = jnp.clip(x0 + 1, 0, w - 1).astype(jnp.int32)
        y0i = jnp.clip(y0, 0, h - 1).astype(jnp.int32)
        y1i = jnp.clip(y0 + 1, 0, h - 1).astype(jnp.int32)
        top = (1.0 - dx) * image[y0i, x0i] + dx * image[y0i, x1i]
        bottom = (1.0 - dx) * image[y1i, x0i] + dx * image[y1i, x1i]
        out = (1.0 - dy) * top + dy * bottom
    else:
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    return jnp.where(inside[..., None], out, jnp.asarray(fill, jnp.float32))


def _matrix(*coefficients):
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in coefficients])


def _rotate_matrix(degrees, height: int, width: int):
    """PIL's ``Image.rotate`` (counter-clockwise by ``degrees``, about (W / 2, H / 2), no expansion)."""
    angle = -jnp.deg2rad(jnp.asarray(degrees, jnp.float32))
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    cx, cy = width / 2.0, height / 2.0
    return _matrix(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)


def rotate(image, degrees, fill=IMAGENET_FILL, interpolation="bilinear"):
    """``img.rotate(degrees)``: counter-clockwise about the image centre, corners filled."""
    return affine(image, _rotate_matrix(degrees, *image.shape[:2]), fill, interpolation)


def shear_x(image, factor, fill=IMAGENET_FILL, interpolation="bilinear"):
    """timm's ``shear_x``: the affine map (1, factor, 0, 0, 1, 0), about the top-left corner."""
    return affine(image, _matrix(1.0, factor, 0.0, 0.0, 1.0, 0.0), fill, interpolation)


def shear_y(image, factor, fill=IMAGENET_FILL, interpolation="bilinear"):
    """timm's ``shear_y``: the affine map (1, 0, 0, factor, 1, 0)."""
    return affine(image, _matrix(1.0, 0.0, 0.0, factor, 1.0, 0.0), fill, interpolation)


def translate_x(image, pixels, fill=IMAGENET_FILL, interpolation="bilinear"):
    """timm's ``translate_x_abs``: the content moves ``pixels`` to the left (fractions resampled)."""
    return affine(image, _matrix(1.0, 0.0, pixels, 0.0, 1.0, 0.0), fill, interpolation)


def translate_y(image, pixels, fill=IMAGENET_FILL, interpolation="bilinear"):
    """timm's ``translate_y_abs``: the content moves ``pixels`` up."""
    return affine(image, _matrix(1.0, 0.0, 0.0, 0.0, 1.0, pixels), fill, interpolation)


# --------------------------------------------------------------------------- op tables
# Each op name maps to (family, level): the family is the image transform, the level turns
# (magnitude, sign, height, width) into the family's arguments. Geometric ops share the
# "affine" family, so a vmapped switch resamples once per step, not once per geometric op.

_FAMILIES = {
    "identity": lambda image, p, fill, interp: image,
    "affine": lambda image, p, fill, interp: affine(image, p, fill, interp),
    "auto_contrast": lambda image, p, fill, interp: auto_contrast(image),
    "equalize": lambda image, p, fill, interp: equalize(image),
    "invert": lambda image, p, fill, interp: invert(image),
    "posterize": lambda image, p, fill, interp: posterize(image, p[0]),
    "solarize": lambda image, p, fill, interp: solarize(image, p[0]),
    "solarize_add": lambda image, p, fill, interp: solarize_add(image, p[0]),
    "color": lambda image, p, fill, interp: color(image, p[0]),
    "contrast": lambda image, p, fill, interp: contrast(image, p[0]),
    "brightness": lambda image, p, fill, interp: brightness(image, p[0]),
    "sharpness": lambda image, p, fill, interp: sharpness(image, p[0]),
}


def _frac(m, scale):
    """timm's (m / _LEVEL_DENOM) * scale, multiplied first so integer results stay exact."""
    return m * scale / LEVEL_DENOM


def _enhance(m, s, h, w):
    return _frac(m, 1.8) + 0.1


def _enhance_increasing(m, s, h, w):
    return jnp.maximum(0.1, 1.0 + s * _frac(m, 0.9))


_RAND = {
    "AutoContrast": ("auto_contrast", None),
    "Equalize": ("equalize", None),
    "Invert": ("invert", None),
    "Rotate": ("affine", lambda m, s, h, w: _rotate_matrix(s * _frac(m, 30.0), h, w)),
    "Posterize": ("posterize", lambda m, s, h, w: jnp.floor(_frac(m, 4.0))),
    "PosterizeIncreasing": ("posterize", lambda m, s, h, w: 4.0 - jnp.floor(_frac(m, 4.0))),
    "Solarize": ("solarize", lambda m, s, h, w: jnp.minimum(256.0, jnp.floor(_frac(m, 256.0)))),
    "SolarizeIncreasing": ("solarize", lambda m, s, h, w: 256.0 - jnp.minimum(256.0, jnp.floor(_frac(m, 256.0)))),
    "SolarizeAdd": ("solarize_add", lambda m, s, h, w: jnp.minimum(128.0, jnp.floor(_frac(m, 110.0)))),
    "Color": ("color", _enhance),
    "ColorIncreasing": ("color", _enhance_increasing),
    "Contrast": ("contrast", _enhance),
    "ContrastIncreasing": ("contrast", _enhance_increasing),
    "Brightness": ("brightness", _enhance),
    "BrightnessIncreasing": ("brightness", _enhance_increasing),
    "Sharpness": ("sharpness", _enhance),
    "SharpnessIncreasing": ("sharpness", _enhance_increasing),
    "ShearX": ("affine", lambda m, s, h, w: _matrix(1.0, s * _frac(m, 0.3), 0.0, 0.0, 1.0, 0.0)),
    "ShearY": ("affine", lambda m, s, h, w: _matrix(1.0, 0.0, 0.0, s * _frac(m, 0.3), 1.0, 0.0)),
    "TranslateXRel": ("affine", lambda m, s, h, w: _matrix(1.0, 0.0, s * _frac(m, 0.45) * w, 0.0, 1.0, 0.0)),
    "TranslateYRel": ("affine", lambda m, s, h, w: _matrix(1.0, 0.0, 0.0, 0.0, 1.0, s * _frac(m, 0.45) * h)),
}


def _bin(b, top):
    """torchvision's ``linspace(0, top, 31)[b]``."""
    return b * top / (TRIVIAL_BINS - 1)


def _trivial_enhance(b, s, h, w):
    return 1.0 + s * _bin(b, 0.99)


_TRIVIAL = {
    "Identity": ("identity", None),
    "ShearX": ("affine", lambda b, s, h, w: _matrix(1.0, s * _bin(b, 0.99), 0.0, 0.0, 1.0, 0.0)),
    "ShearY": ("affine", lambda b, s, h, w: _matrix(1.0, 0.0, 0.0, s * _bin(b, 0.99), 1.0, 0.0)),
    # torchvision translates by int(magnitude) pixels: truncated towards zero.
    "TranslateX": ("affine", lambda b, s, h, w: _matrix(1.0, 0.0, s * jnp.floor(_bin(b, 32.0)), 0.0, 1.0, 0.0)),
    "TranslateY": ("affine", lambda b, s, h, w: _matrix(1.0, 0.0, 0.0, 0.0, 1.0, s * jnp.floor(_bin(b, 32.0)))),
    "Rotate": ("affine", lambda b, s, h, w: _rotate_matrix(s * _bin(b, 135.0), h, w)),
    "Brightness": ("brightness", _trivial_enhance),
    "Color": ("color", _trivial_enhance),
    "Contrast": ("contrast", _trivial_enhance),
    "Sharpness": ("sharpness", _trivial_enhance),
    "Posterize": ("posterize", lambda b, s, h, w: 8.0 - jnp.round(b / ((TRIVIAL_BINS - 1) / 6))),
    "Solarize": ("solarize", lambda b, s, h, w: 255.0 - _bin(b, 255.0)),
    "AutoContrast": ("auto_contrast", None),
    "Equalize": ("equalize", None),
}

_TABLES = {"rand": _RAND, "trivial": _TRIVIAL}
_DEFAULTS = {"rand": (IMAGENET_FILL, "bilinear"), "trivial": ((0.0, 0.0, 0.0), "nearest")}


def _params(level, height: int, width: int):
    """A level function as a switch branch: (m, s) -> a (6,) float32 argument vector."""
    def branch(m, s):
        if level is None:
            return jnp.zeros(6, jnp.float32)
        value = jnp.asarray(level(m, s, height, width), jnp.float32)
        return value if value.shape == (6,) else jnp.zeros(6, jnp.float32).at[0].set(value)
    return branch


def _make_apply(kind: str, ops: tuple[str, ...], height: int, width: int, fill, interpolation: str):
    """(image, op index into ``ops``, magnitude, sign) -> image, one ``lax.switch`` over the op families."""
    table = _TABLES[kind]
    levels = [_params(table[name][1], height, width) for name in ops]
    families = sorted({table[name][0] for name in ops})
    family_of = jnp.asarray([families.index(table[name][0]) for name in ops], jnp.int32)
    branches = [functools.partial(_FAMILIES[f], fill=fill, interp=interpolation) for f in families]

    def apply(image, op, magnitude, sign):
        p = jax.lax.switch(op, levels, jnp.asarray(magnitude, jnp.float32), jnp.asarray(sign, jnp.float32))
        return jax.lax.switch(family_of[op], branches, image, p)

    return apply


def _resolve(kind: str, fill, interpolation):
    default_fill, default_interp = _DEFAULTS[kind]
    fill = tuple(float(v) for v in (default_fill if fill is None else fill))
    interpolation = default_interp if interpolation is None else str(interpolation)
    if interpolation not in ("nearest", "bilinear"):
        raise ValueError(f"interpolation must be 'nearest' or 'bilinear', got {interpolation!r}")
    return fill, interpolation


def apply_op(image, name: str, magnitude, sign=1.0, *, kind: str = "rand", fill=None,
             interpolation: Optional[str] = None):
    """One op by its (timm / torchvision) name on one HWC float image in [0, 255].

    ``magnitude``: timm's m for ``kind='rand'`` (any name of :data:`RAND_OPS` or
    :data:`RAND_INCREASING_OPS`), the bin 0..30 for ``kind='trivial'``; ``sign``: +1 or -1 for
    signed ops. ``fill`` and ``interpolation`` default to the kind's (see the module docstring).
    """
    table = _TABLES[kind]
    if name not in table:
        raise ValueError(f"unknown {kind} op {name!r}; known: {sorted(table)}")
    fill, interpolation = _resolve(kind, fill, interpolation)
    image = jnp.asarray(image, jnp.float32)
    apply = _make_apply(kind, (name,), image.shape[0], image.shape[1], fill, interpolation)
    return apply(image, 0, magnitude, sign)


# --------------------------------------------------------------------------- batch


def auto_augment(key, images, aa: AutoAugment, fill=None, interpolation: Optional[str] = None):
    """Apply the policy ``aa`` to each image: float32 NHWC RGB in [0, 255] -> same shape, in [0, 255].

    ``key``: one key per image, or one key for the batch. ``fill`` (one value per channel, e.g.
    ``mean_fill(pre.mean)``) and ``interpolation`` ('bilinear' or 'nearest') default to the
    kind's (see the module docstring). Bind ``aa`` (and ``fill``) with ``functools.partial``
    before jitting a composition.
    """
    if not isinstance(aa, AutoAugment):
        raise TypeError(f"aa must be an AutoAugment (see parse_auto_augment), got {type(aa).__name__}")
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
    fill, interpolation = _resolve(aa.kind, fill, interpolation)
    return _auto_augment(key, images, aa, fill, interpolation)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _auto_augment(key, images, aa, fill, interpolation):
    images = images.astype(jnp.float32)
    n, height, width, _ = images.shape
    keys = image_keys(key, n)
    apply = _make_apply(aa.kind, aa.ops, height, width, fill, interpolation)
    num = len(aa.ops)

    if aa.kind == "trivial":
        def one_trivial(image, k):
            u = jax.random.uniform(k, (3,), jnp.float32)
            sign = jnp.where(u[2] < 0.5, 1.0, -1.0)
            return apply(image, _uniform_index(u[0], num), _uniform_index(u[1], TRIVIAL_BINS), sign)
        return jax.vmap(one_trivial)(images, keys)

    if aa.num_ops == 0:
        return images
    k_draw, k_magnitude = _split_each(keys, 2)

    def one_rand(image, k, km):
        u = jax.random.uniform(k, (aa.num_ops, 3), jnp.float32)
        ops = _uniform_index(u[:, 0], num)
        applied = u[:, 1] < aa.prob  # timm skips an op when random() > prob
        signs = jnp.where(u[:, 2] < 0.5, 1.0, -1.0)  # timm negates when random() > 0.5
        if aa.magnitude_std == 0:
            mags = jnp.full((aa.num_ops,), aa.magnitude, jnp.float32)
        elif math.isinf(aa.magnitude_std):
            mags = jax.random.uniform(km, (aa.num_ops,), jnp.float32, 0.0, aa.magnitude)
        else:
            mags = aa.magnitude + aa.magnitude_std * jax.random.normal(km, (aa.num_ops,), jnp.float32)
        mags = jnp.clip(mags, 0.0, aa.magnitude_max)

        def step(i, x):
            # A loop rather than unrolled steps: the switch is traced and compiled once.
            return jnp.where(applied[i], apply(x, ops[i], mags[i], signs[i]), x)

        return jax.lax.fori_loop(0, aa.num_ops, step, image)

    return jax.vmap(one_rand)(images, k_draw, k_magnitude)


# --------------------------------------------------------------------------- random erasing


def random_erasing(key, images, prob: float, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3)),
                   max_attempts: int = 10):
    """timm ``RandomErasing(probability=prob, mode='pixel')`` with one rectangle, per image.

    ``images``: NORMALISED float NHWC (after mean/std). Each image, with probability ``prob``,
    gets one rectangle filled with per-pixel standard-normal values. As timm: up to
    ``max_attempts`` tries of an area fraction uniform in ``area`` and an aspect ratio r
    log-uniform in ``log_ratio``, h = round(sqrt(A r)), w = round(sqrt(A / r)); the first with
    h < H and w < W is placed uniformly; if none fits, the image is left alone. ``key``: one key
    per image, or one key for the batch. Returns the images' shape and dtype.
    """
    lo, hi = (float(v) for v in area)
    rlo, rhi = (float(v) for v in log_ratio)
    if not (0.0 <= lo <= hi and rlo <= rhi and 0.0 <= prob <= 1.0 and max_attempts >= 1):
        raise ValueError(f"random_erasing: bad prob {prob}, area {area}, log_ratio {log_ratio} "
                         f"or max_attempts {max_attempts}")
    return _random_erasing(key, jnp.asarray(images), float(prob), (lo, hi), (rlo, rhi), int(max_attempts))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _random_erasing(key, images, prob, area, log_ratio, attempts):
    n, height, width, channels = images.shape
    k_box, k_noise = _split_each(image_keys(key, n), 2)

    def one(image, kb, kn):
        # All attempts are drawn at once and the first that fits is kept: the same distribution
        # as timm's sequential loop, without a data-dependent loop.
        u = jax.random.uniform(kb, (2 * attempts + 3,), jnp.float32)
        target = height * width * (area[0] + (area[1] - area[0]) * u[:attempts])
        aspect = jnp.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[attempts:2 * attempts])
        hs = jnp.round(jnp.sqrt(target * aspect)).astype(jnp.int32)
        ws = jnp.round(jnp.sqrt(target / aspect)).astype(jnp.int32)
        fits = (hs < height) & (ws < width)
        first = jnp.argmax(fits)
        h, w = hs[first], ws[first]
        top = _uniform_index(u[2 * attempts], height - h + 1)
        left = _uniform_index(u[2 * attempts + 1], width - w + 1)
        erase = fits.any() & (u[2 * attempts + 2] < prob)
        rows = jnp.arange(height)[:, None]
        cols = jnp.arange(width)[None, :]
        box = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w) & erase
        noise = jax.random.normal(kn, (height, width, channels), jnp.float32).astype(image.dtype)
        return jnp.where(box[..., None], noise, image)

    return jax.vmap(one)(images, k_box, k_noise)
