"""Automatic augmentation and random erasing: parsing, op semantics against PIL/timm, keys and jit."""

from __future__ import annotations

import functools
import math
import random
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from jaxtl.data import autoaugment as aa_mod
from jaxtl.data.autoaugment import (
    MAGNITUDE_FREE_OPS, RAND_INCREASING_OPS, RAND_OPS, TRIVIAL_OPS, AutoAugment, auto_augment,
    parse_auto_augment, random_erasing,
)
from jaxtl.errors import ConfigError

N, SIZE = 4, 32


def _uint8_image(h=28, w=36, seed=0, lo=0, hi=256):
    """A uint8 HWC image with smooth structure and noise, values within [lo, hi)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([yy / h, xx / w, 0.5 + 0.4 * np.sin(xx / 5 + yy / 7)], axis=-1)
    values = lo + (hi - 1 - lo) * base + rng.normal(0, 0.08 * (hi - lo), base.shape)
    return np.clip(np.round(values), lo, hi - 1).astype(np.uint8)


def _float_batch(n=N, size=SIZE, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (n, size, size, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted_op(name, kind):
    return jax.jit(functools.partial(aa_mod.apply_op, name=name, kind=kind))


def _op(image, name, magnitude, sign=1.0, kind="rand"):
    return np.asarray(_jitted_op(name, kind)(jnp.asarray(image, jnp.float32), magnitude=magnitude, sign=sign))


@functools.lru_cache(maxsize=None)
def _jitted_augment(aa):
    return jax.jit(functools.partial(auto_augment, aa=aa))


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("spec,expected", [
    ("rand-m9-mstd0.5", dict(magnitude=9, num_ops=2, magnitude_std=0.5, magnitude_max=10, increasing=False,
                             prob=0.5, ops=RAND_OPS)),
    ("rand-m9-n3-mstd0.5-inc1", dict(magnitude=9, num_ops=3, magnitude_std=0.5, magnitude_max=10, increasing=True,
                                     prob=0.5, ops=RAND_INCREASING_OPS)),
    ("rand-m7-mstd0.5-inc1-mmax10", dict(magnitude=7, num_ops=2, magnitude_std=0.5, magnitude_max=10,
                                         increasing=True, prob=0.5, ops=RAND_INCREASING_OPS)),
    ("rand-m9-p0.5", dict(magnitude=9, num_ops=2, magnitude_std=0.0, prob=0.5, ops=RAND_OPS)),
    ("rand-n1-m12-mmax15-p0.25-inc0", dict(magnitude=12, num_ops=1, magnitude_max=15, prob=0.25, increasing=False)),
    ("rand-mstd101", dict(magnitude=10, magnitude_std=math.inf)),  # timm: mstd > 100 means uniform
    ("rand", dict(magnitude=10, num_ops=2, magnitude_std=0.0, prob=0.5)),
])
def test_parse_rand(spec, expected):
    aa = parse_auto_augment(spec)
    assert aa.kind == "rand"
    for field, value in expected.items():
        assert getattr(aa, field) == value, (spec, field)


def test_parse_trivial():
    aa = parse_auto_augment("trivial")
    assert aa.kind == "trivial" and aa.ops == TRIVIAL_OPS
    assert len(TRIVIAL_OPS) == 14 and "Identity" in TRIVIAL_OPS and "Invert" not in TRIVIAL_OPS


@pytest.mark.parametrize("spec", ["foo", "", "rand-x9", "rand-m9-n2.5", "rand-m9-p1.5", "rand-m9-inc2",
                                  "rand-m9-m8", "rand-m9-tweights", "Rand-m9", "trivial-m3", "rand-m",
                                  "rand--m9", "rand-m9-mmax0", "augmix-m5", "v0"])
def test_parse_rejects_with_one_line(spec):
    with pytest.raises(ConfigError) as info:
        parse_auto_augment(spec)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--aa {spec!r}: ")
    assert "expected timm's 'rand-m9-mstd0.5' form" in message and "'trivial'" in message


def test_policy_validation():
    with pytest.raises(ConfigError, match="kind"):
        AutoAugment("autoaug")
    with pytest.raises(ConfigError, match="prob"):
        AutoAugment("rand", prob=2.0)
    with pytest.raises(ConfigError, match="not in the rand list"):
        AutoAugment("rand", ops=("Rotate", "PosterizeIncreasing"))
    assert AutoAugment("rand", ops=("Rotate", "Invert")).ops == ("Rotate", "Invert")
    assert AutoAugment("rand", increasing=True).ops == RAND_INCREASING_OPS
    assert hash(AutoAugment("rand")) == hash(AutoAugment("rand", ops=RAND_OPS))


# --------------------------------------------------------------------------- magnitudes


def _timm_levels():
    """timm's magnitude-to-argument formulas, written out (for when timm is not installed)."""
    return {
        "Posterize": lambda m: int((m / 10) * 4),
        "PosterizeIncreasing": lambda m: 4 - int((m / 10) * 4),
        "Solarize": lambda m: min(256, int((m / 10) * 256)),
        "SolarizeIncreasing": lambda m: 256 - min(256, int((m / 10) * 256)),
        "SolarizeAdd": lambda m: min(128, int((m / 10) * 110)),
        "Color": lambda m: (m / 10) * 1.8 + 0.1,
        "ColorIncreasing": lambda m: max(0.1, 1.0 + (m / 10) * 0.9),
    }


@pytest.mark.parametrize("m", [0, 1, 2.5, 3, 5, 7, 9, 9.5, 10, 13])
def test_level_arguments_match_timm(m):
    for name, ref in _timm_levels().items():
        got = float(aa_mod._RAND[name][1](jnp.float32(m), 1.0, SIZE, SIZE))
        assert got == pytest.approx(ref(m), abs=1e-5), (name, m)
    # Geometric ops: the affine coefficients (sign +1).
    matrix = lambda name: np.asarray(aa_mod._RAND[name][1](jnp.float32(m), 1.0, 20, 40))
    assert matrix("ShearX")[1] == pytest.approx(m / 10 * 0.3, abs=1e-6)
    assert matrix("TranslateXRel")[2] == pytest.approx(m / 10 * 0.45 * 40, abs=1e-4)
    assert matrix("TranslateYRel")[5] == pytest.approx(m / 10 * 0.45 * 20, abs=1e-4)
    angle = math.radians(m / 10 * 30)
    assert matrix("Rotate")[:2] == pytest.approx([math.cos(angle), -math.sin(angle)], abs=1e-6)


@pytest.mark.torch
def test_level_arguments_match_timm_itself():
    from timm.data import auto_augment as timm_aa

    hparams = dict(translate_const=100, img_mean=(124, 116, 104))
    for name in set(RAND_OPS) | set(RAND_INCREASING_OPS):
        level = timm_aa.LEVEL_TO_ARG[name]
        if level is None:
            assert aa_mod._RAND[name][1] is None
            continue
        for m in (0, 3, 5, 9, 10):
            random.seed(0)  # timm draws the sign with random.random() > 0.5
            (ref,) = level(m, hparams)
            random.seed(0)
            sign = -1.0 if random.random() > 0.5 else 1.0
            got = np.asarray(aa_mod._RAND[name][1](jnp.float32(m), sign, 50, 50))
            if got.ndim == 0:
                assert float(got) == pytest.approx(ref, abs=1e-5), (name, m)
            elif name == "Rotate":
                assert got[1] == pytest.approx(math.sin(math.radians(-ref)), abs=1e-6), (name, m)
            elif name.startswith("Shear"):
                assert got[1] + got[3] == pytest.approx(ref, abs=1e-6), (name, m)
            else:  # translate, relative to the image size
                assert (got[2] + got[5]) / 50 == pytest.approx(ref, abs=1e-6), (name, m)


def test_trivial_levels_match_torchvision():
    bins = np.arange(31, dtype=np.float32)
    level = lambda name, b: np.asarray(aa_mod._TRIVIAL[name][1](jnp.float32(b), 1.0, 20, 20))
    posterize = [float(level("Posterize", b)) for b in bins]
    assert posterize == [float(8 - round(b / 5)) for b in range(31)]
    assert posterize[0] == 8 and posterize[-1] == 2
    solarize = [float(level("Solarize", b)) for b in bins]
    np.testing.assert_allclose(solarize, np.linspace(255, 0, 31), atol=1e-4)
    assert float(level("Brightness", 30)) == pytest.approx(1.99, abs=1e-6)
    assert level("ShearY", 30)[3] == pytest.approx(0.99, abs=1e-6)
    assert level("TranslateX", 30)[2] == 32 and level("TranslateX", 1)[2] == 1  # int(32/30) truncates
    assert level("Rotate", 30)[1] == pytest.approx(math.sin(math.radians(-135)), abs=1e-6)


def test_increasing_ops_are_identity_at_zero_magnitude():
    image = _float_batch(1)[0]
    for name in RAND_INCREASING_OPS:
        if name in MAGNITUDE_FREE_OPS:
            continue
        for sign in (1.0, -1.0):
            out = _op(image, name, 0.0, sign)
            if name == "PosterizeIncreasing":
                # timm keeps 4 - int(0) = 4 bits at m = 0: the one increasing op that is not the identity.
                np.testing.assert_array_equal(out, np.floor(np.round(image) / 16) * 16)
            else:
                np.testing.assert_allclose(out, image, atol=1e-4, err_msg=name)


def test_trivial_ops_at_bin_zero():
    image = _uint8_image().astype(np.float32)
    image[0, 0] = 255.0
    for name in TRIVIAL_OPS:
        if name in MAGNITUDE_FREE_OPS:
            continue
        out = _op(image, name, 0.0, -1.0, kind="trivial")
        if name == "Solarize":  # torchvision's threshold 255 still inverts the level 255
            assert out[0, 0, 0] == 0.0 and np.array_equal(out[image < 255], image[image < 255])
        else:
            np.testing.assert_allclose(out, image, atol=1e-4, err_msg=name)


def test_magnitude_free_ops_are_exactly_the_documented_ones():
    line = next(x for x in aa_mod.__doc__.splitlines() if x.startswith("Ops that ignore the magnitude:"))
    documented = set(re.findall(r"[A-Z][A-Za-z]+", line.split(":", 1)[1]))
    assert documented == MAGNITUDE_FREE_OPS
    image = _uint8_image(seed=3, lo=20, hi=230).astype(np.float32)
    for kind, names, magnitudes in (("rand", set(RAND_OPS) | set(RAND_INCREASING_OPS), (0.0, 5.0, 10.0)),
                                    ("trivial", TRIVIAL_OPS, (0.0, 15.0, 30.0))):
        for name in sorted(names):
            outs = [_op(image, name, m, s, kind) for m in magnitudes for s in (1.0, -1.0)]
            constant = all(np.array_equal(outs[0], o) for o in outs[1:])
            assert constant == (name in MAGNITUDE_FREE_OPS), (kind, name)


# --------------------------------------------------------------------------- against PIL


def _check_pil(ours, pil_image):
    theirs = np.asarray(pil_image).astype(np.float32)
    assert ours.shape == theirs.shape
    # PIL rounds (or truncates) to uint8; the float ops keep the fraction.
    assert np.abs(ours - theirs).max() <= 1.0 + 1e-3


@pytest.mark.parametrize("lo,hi", [(0, 256), (40, 190)])
def test_colour_ops_match_pil(lo, hi):
    image = _uint8_image(lo=lo, hi=hi)
    pil = Image.fromarray(image)
    x = jnp.asarray(image, jnp.float32)
    op = lambda f, *args: np.asarray(jax.jit(f)(x, *args))
    _check_pil(op(aa_mod.equalize), ImageOps.equalize(pil))
    _check_pil(op(aa_mod.auto_contrast), ImageOps.autocontrast(pil))
    _check_pil(op(aa_mod.invert), ImageOps.invert(pil))
    for bits in (1, 3, 4, 7, 8):
        _check_pil(op(aa_mod.posterize, bits), ImageOps.posterize(pil, bits))
    for threshold in (0, 100, 128, 200, 256):
        _check_pil(op(aa_mod.solarize, threshold), ImageOps.solarize(pil, threshold))
    for name, enhancer in (("color", ImageEnhance.Color), ("contrast", ImageEnhance.Contrast),
                           ("brightness", ImageEnhance.Brightness), ("sharpness", ImageEnhance.Sharpness)):
        for factor in (0.1, 0.55, 1.0, 1.9):
            _check_pil(op(getattr(aa_mod, name), factor), enhancer(pil).enhance(factor))
    assert not np.array_equal(op(aa_mod.equalize), image)  # the ops did something


def test_solarize_add_and_posterize_zero_bits():
    image = _uint8_image()
    x = jnp.asarray(image, jnp.float32)
    expected = np.where(image < 128, np.minimum(image.astype(np.int32) + 50, 255), image)
    np.testing.assert_array_equal(np.asarray(aa_mod.solarize_add(x, 50.0)), expected)
    np.testing.assert_array_equal(np.asarray(aa_mod.posterize(x, 0)), np.zeros_like(image))


@pytest.mark.parametrize("interpolation,resample", [("nearest", Image.NEAREST), ("bilinear", Image.BILINEAR)])
def test_geometric_ops_match_pil(interpolation, resample):
    image = _uint8_image()
    pil = Image.fromarray(image)
    x = jnp.asarray(image, jnp.float32)
    fill = (124, 116, 104)
    transform = lambda matrix: pil.transform(pil.size, Image.AFFINE, matrix, resample=resample, fillcolor=fill)
    cases = [
        (aa_mod.rotate, 30.0, pil.rotate(30.0, resample=resample, fillcolor=fill)),
        (aa_mod.rotate, -17.0, pil.rotate(-17.0, resample=resample, fillcolor=fill)),
        (aa_mod.shear_x, 0.3, transform((1, 0.3, 0, 0, 1, 0))),
        (aa_mod.shear_y, -0.27, transform((1, 0, 0, -0.27, 1, 0))),
        (aa_mod.translate_x, 5.3, transform((1, 0, 5.3, 0, 1, 0))),
        (aa_mod.translate_y, -4.0, transform((1, 0, 0, 0, 1, -4.0))),
    ]
    for fn, value, ref in cases:
        ours = np.asarray(jax.jit(fn, static_argnums=(2, 3))(x, value, fill, interpolation))
        theirs = np.asarray(ref).astype(np.float32)
        if interpolation == "nearest":  # the same pixels exactly, fill included
            np.testing.assert_array_equal(ours, theirs, err_msg=f"{fn.__name__}({value})")
        else:  # PIL truncates the interpolated value to uint8
            assert np.abs(ours - theirs).max() <= 1.0 + 1e-3, f"{fn.__name__}({value})"


# --------------------------------------------------------------------------- batch augmentation


@pytest.mark.parametrize("spec", ["rand-m9-mstd0.5-inc1", "trivial"])
def test_auto_augment_keys_jit_and_range(spec):
    aa = parse_auto_augment(spec)
    fn = _jitted_augment(aa)
    images = _float_batch()
    keys = jax.random.split(jax.random.key(0), N)
    a = np.asarray(fn(keys, images))
    assert a.shape == images.shape and a.dtype == np.float32
    assert a.min() >= 0.0 and a.max() <= 255.0
    np.testing.assert_array_equal(a, np.asarray(fn(keys, images)))
    b = np.asarray(fn(jax.random.split(jax.random.key(1), N), images))
    assert not np.array_equal(a, b)
    # Image i depends on key i only: permuting images and keys together permutes the output.
    perm = np.array([2, 0, 3, 1])
    np.testing.assert_allclose(np.asarray(fn(keys[perm], images[perm])), a[perm], atol=1e-4)
    # One key for the batch is split into one per image; distinct keys give distinct results.
    one_image = np.repeat(images[:1], 8, axis=0)
    outs = np.asarray(fn(jax.random.key(3), one_image))
    assert len({np.round(o, 2).tobytes() for o in outs}) >= 6


def test_auto_augment_prob_zero_is_identity():
    images = _float_batch(seed=1)
    for aa in (AutoAugment("rand", magnitude=0.0, num_ops=3, prob=0.0),
               AutoAugment("rand", magnitude=9.0, magnitude_std=0.5, increasing=True, prob=0.0)):
        out = np.asarray(_jitted_augment(aa)(jax.random.key(0), images))
        np.testing.assert_array_equal(out, images)


def test_auto_augment_changes_images_with_jaxtl_keys():
    from jaxtl.rng import make_key

    aa = AutoAugment("rand", magnitude=9.0, magnitude_std=0.5, increasing=True, num_ops=2, prob=1.0)
    images = _float_batch(seed=2)
    out = np.asarray(auto_augment(make_key(0), images, aa))
    assert all(not np.allclose(o, i) for o, i in zip(out, images))
    with pytest.raises(ValueError, match="one key per image"):
        auto_augment(jax.random.split(jax.random.key(0), 3), images, aa)


# --------------------------------------------------------------------------- random erasing


def _box(diff):
    """The bounding box of a boolean HxW mask, and whether the mask fills it."""
    rows, cols = np.nonzero(diff)
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    return (bottom - top, right - left), bool(diff[top:bottom, left:right].all())


def test_random_erasing():
    images = np.random.default_rng(0).normal(size=(8, SIZE, 40, 3)).astype(np.float32)
    fn = jax.jit(random_erasing, static_argnums=(2,))
    np.testing.assert_array_equal(np.asarray(fn(jax.random.key(0), images, 0.0)), images)
    keys = jax.random.split(jax.random.key(1), 8)
    out = np.asarray(fn(keys, images, 1.0))
    area = SIZE * 40
    for o, i in zip(out, images):
        diff = (o != i).any(axis=-1)
        (h, w), full = _box(diff)
        assert full, "the erased pixels form one axis-aligned rectangle"
        assert h < SIZE and w < 40
        # h and w are rounded: the area fraction is within [0.02, 1/3] up to that rounding.
        assert (h - 0.5) * (w - 0.5) <= area / 3 and (h + 0.5) * (w + 0.5) >= 0.02 * area
        assert abs(o[diff].mean()) < 0.5 and 0.5 < o[diff].std() < 1.5  # standard-normal fill
    np.testing.assert_array_equal(np.asarray(fn(keys, images, 1.0)), out)
    perm = np.array([7, 2, 5, 0, 1, 3, 6, 4])
    np.testing.assert_array_equal(np.asarray(fn(keys[perm], images[perm], 1.0)), out[perm])
    half = np.asarray(fn(jax.random.key(2), np.repeat(images, 8, axis=0), 0.5))
    erased = (half != np.repeat(images, 8, axis=0)).any(axis=(1, 2, 3)).mean()
    assert 0.3 < erased < 0.7
