"""On-device augmentation: determinism, jit, and agreement with torchvision's tensor transforms."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.data import augment
from jaxtl.data.transforms import normalize
from jaxtl.data.preprocessing import Preprocessing

PRE = Preprocessing(input_size=48, resize_size=64)
JITTER = (0.4, 0.4, 0.4, 0.1)


def _uint8_batch(n=4, h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _smooth_float_image(h, w, seed=0):
    """A float HWC image in [0, 255] with both smooth gradients and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([255 * yy / h, 255 * xx / w, 127.5 + 100 * np.sin(xx / 5 + yy / 7)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted_train_augment():
    return jax.jit(functools.partial(augment.train_augment, pre=PRE, jitter=JITTER))


# --------------------------------------------------------------------------- composition


def test_train_augment_shape_dtype_range_and_determinism():
    fn = _jitted_train_augment()
    images = _uint8_batch()
    a = np.asarray(fn(jax.random.key(0), images))
    b = np.asarray(fn(jax.random.key(0), images))
    c = np.asarray(fn(jax.random.key(1), images))
    assert a.shape == (4, PRE.input_size, PRE.input_size, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    # Undo the normalisation: the augmented pixels must lie in [0, 255].
    pixels = a * np.asarray(PRE.std, np.float32) * 255 + np.asarray(PRE.mean, np.float32) * 255
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3


def test_train_augment_draws_each_image_from_its_own_key():
    # The train step's keys (one per image, from its position in the global batch): an image
    # comes out the same alone as in a batch, whatever the other images and their keys.
    from jaxtl.models.layers import example_keys
    from jaxtl.rng import make_key

    fn = _jitted_train_augment()
    images = _uint8_batch(n=6)
    keys = example_keys(make_key(0), 6)
    batch = np.asarray(fn(keys, images))
    others = np.asarray(fn(jnp.concatenate([keys[:2], example_keys(make_key(1), 4)]),
                           np.concatenate([images[:2], _uint8_batch(n=4, seed=1)])))
    np.testing.assert_allclose(others[:2], batch[:2], atol=1e-5)
    for i in (0, 3, 5):
        np.testing.assert_allclose(np.asarray(fn(keys[i:i + 1], images[i:i + 1]))[0], batch[i], atol=1e-5)
    # Distinct keys, distinct augmentations of one image.
    same_image = np.asarray(fn(keys, np.repeat(images[:1], 6, axis=0)))
    assert len({np.round(x, 3).tobytes() for x in same_image}) == 6
    with pytest.raises(ValueError, match="one key per image"):
        fn(keys[:5], images)


def test_train_augment_identity_settings_is_resize_and_normalise():
    # Full-image crop of a resize_size square, no flip, no jitter: a plain resize.
    images = _uint8_batch(n=2)
    out = augment.train_augment(jax.random.key(0), images, PRE, hflip=False, scale=(1.0, 1.0),
                                ratio=(1.0, 1.0))
    top = jnp.zeros(2, jnp.int32)
    size = jnp.full(2, 64, jnp.int32)
    expected = normalize(augment.resized_crop(images, top, top, size, size, PRE.input_size), PRE, xp=jnp)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5)


def test_eval_prepare_only_normalises():
    images = _uint8_batch(n=2, h=PRE.input_size, w=PRE.input_size)
    out = augment.eval_prepare(images, PRE)
    assert out.dtype == jnp.float32 and out.shape == images.shape
    np.testing.assert_allclose(np.asarray(out), normalize(images, PRE), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- crop


def test_crop_params_valid_and_deterministic():
    # The same call as the torchvision statistics test below, so it compiles once.
    key = jax.random.key(0)
    top, left, h, w = (np.asarray(a) for a in augment.random_resized_crop_params(key, 2000, 200, 300))
    assert ((h > 0) & (w > 0) & (top >= 0) & (left >= 0)).all()
    assert ((top + h <= 200) & (left + w <= 300)).all()
    assert len(np.unique(h)) > 50 and len(np.unique(top)) > 50
    again = augment.random_resized_crop_params(key, 2000, 200, 300)
    for x, y in zip((top, left, h, w), again):
        np.testing.assert_array_equal(x, np.asarray(y))


def test_identity_crop_returns_image():
    images = _uint8_batch()
    out = augment.random_resized_crop(jax.random.key(0), images, 64, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), images.astype(np.float32), atol=1e-3)


def test_random_resized_crop_jit_and_range():
    fn = jax.jit(functools.partial(augment.random_resized_crop, out_size=24))
    out = np.asarray(fn(jax.random.key(5), _uint8_batch(n=8, h=50, w=70)))
    assert out.shape == (8, 24, 24, 3) and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 255.0 + 1e-3


@pytest.mark.torch
@pytest.mark.parametrize("height,width", [(256, 256), (200, 300)])
def test_crop_param_statistics_match_torchvision(height, width):
    import torch
    from torchvision.transforms import RandomResizedCrop

    n = 2000
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    top, left, h, w = (np.asarray(a, np.float64)
                       for a in augment.random_resized_crop_params(jax.random.key(0), n, height, width,
                                                                   scale, ratio))
    torch.manual_seed(0)
    dummy = torch.empty(3, height, width)
    ref = np.array([RandomResizedCrop.get_params(dummy, list(scale), list(ratio)) for _ in range(n)],
                   np.float64)
    t_top, t_left, t_h, t_w = ref.T
    area, t_area = h * w / (height * width), t_h * t_w / (height * width)
    # Two independent samples of 2000: the area means differ by ~1.6 % (one sigma) by chance alone.
    assert abs(area.mean() - t_area.mean()) < 0.05 * t_area.mean()
    assert abs(np.log(w / h).mean() - np.log(t_w / t_h).mean()) < 0.03
    assert abs((w / h).mean() - (t_w / t_h).mean()) < 0.03 * (t_w / t_h).mean()
    # Placement is uniform over the free space: the relative offset averages 1/2.
    rel_top = top / np.maximum(height - h, 1)
    assert abs(rel_top[h < height].mean() - 0.5) < 0.03


@pytest.mark.torch
def test_fallback_crop_matches_torchvision():
    import torch
    from torchvision.transforms import RandomResizedCrop

    # An area fraction above 1 never fits, so every draw falls back to the center crop.
    scale = (2.0, 3.0)
    configs = [(64, 64, (2.0, 3.0)), (64, 64, (0.3, 0.5)), (40, 100, (3 / 4, 4 / 3)),
               (100, 40, (3 / 4, 4 / 3)), (64, 64, (3 / 4, 4 / 3)), (33, 97, (0.5, 2.5))]
    for height, width, ratio in configs:
        expected = RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
        assert augment._fallback_crop(height, width, ratio) == expected, (height, width, ratio)
    # And the sampler really takes it when nothing fits.
    height, width, ratio = configs[0]
    got = augment.random_resized_crop_params(jax.random.key(0), 16, height, width, scale, ratio)
    expected = RandomResizedCrop.get_params(torch.empty(3, height, width), list(scale), list(ratio))
    for value, column in zip(expected, got):
        assert (np.asarray(column) == value).all()


@pytest.mark.torch
@pytest.mark.parametrize("out_size", [40, 150])
def test_full_image_crop_equals_torchvision_resize(out_size):
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    height, width = 90, 120
    image = _smooth_float_image(height, width)
    # Area fraction 1 at the image's own aspect ratio: the crop is the whole image.
    r = width / height
    out = augment.random_resized_crop(jax.random.key(0), image[None], out_size, scale=(1.0, 1.0),
                                      ratio=(r, r))
    ref = F.resize(torch.from_numpy(image).permute(2, 0, 1), [out_size, out_size],
                   InterpolationMode.BILINEAR, antialias=True).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(np.asarray(out[0]), ref, atol=2e-2)


@pytest.mark.torch
def test_resized_crop_matches_torchvision():
    import torch
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    height, width, out_size = 80, 96, 48
    image = _smooth_float_image(height, width, seed=1)
    n = 12
    top, left, h, w = augment.random_resized_crop_params(jax.random.key(7), n, height, width)
    out = np.asarray(augment.resized_crop(np.repeat(image[None], n, 0), top, left, h, w, out_size))
    chw = torch.from_numpy(image).permute(2, 0, 1)
    for i in range(n):
        ref = F.resized_crop(chw, int(top[i]), int(left[i]), int(h[i]), int(w[i]), [out_size, out_size],
                             InterpolationMode.BILINEAR, antialias=True).permute(1, 2, 0).numpy()
        np.testing.assert_allclose(out[i], ref, atol=2e-2, err_msg=f"crop {i}")


# --------------------------------------------------------------------------- flip


def test_horizontal_flip():
    images = _uint8_batch(n=64, h=8, w=8)
    np.testing.assert_array_equal(np.asarray(augment.random_horizontal_flip(jax.random.key(0), images, p=1.0)),
                                  images[:, :, ::-1])
    np.testing.assert_array_equal(np.asarray(augment.random_horizontal_flip(jax.random.key(0), images, p=0.0)),
                                  images)
    out = np.asarray(jax.jit(augment.random_horizontal_flip)(jax.random.key(1), images))
    flipped = np.array([np.array_equal(o, x[:, ::-1]) for o, x in zip(out, images)])
    kept = np.array([np.array_equal(o, x) for o, x in zip(out, images)])
    assert (flipped | kept).all() and flipped.any() and kept.any()


# --------------------------------------------------------------------------- colour


def _float_batch(n=3, h=24, w=32, seed=0):
    return np.stack([_smooth_float_image(h, w, seed + i) for i in range(n)])


def test_color_ops_identity():
    x = _float_batch()
    for fn in (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation):
        np.testing.assert_allclose(np.asarray(fn(x, 1.0)), x, atol=1e-4, err_msg=fn.__name__)
    np.testing.assert_allclose(np.asarray(augment.adjust_hue(x, 0.0)), x, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(augment.color_jitter(jax.random.key(0), x)), x)


@pytest.mark.torch
@pytest.mark.parametrize("name,factors", [
    ("brightness", (0.6, 1.4, 2.0)),
    ("contrast", (0.0, 0.6, 1.7)),
    ("saturation", (0.0, 0.5, 1.8)),
    ("hue", (-0.5, -0.2, 0.35)),
])
def test_color_ops_match_torchvision(name, factors):
    import torch
    from torchvision.transforms import functional as F

    x = _float_batch(n=len(factors))
    ours = np.asarray(getattr(augment, f"adjust_{name}")(x, jnp.asarray(factors)))
    reference = getattr(F, f"adjust_{name}")
    for i, factor in enumerate(factors):
        chw = torch.from_numpy(x[i] / 255.0).permute(2, 0, 1)
        ref = reference(chw, factor).permute(1, 2, 0).numpy() * 255.0
        np.testing.assert_allclose(ours[i], ref, atol=1.0, err_msg=f"{name}={factor}")
        # Typical agreement is far tighter than the 1-unit tolerance.
        assert np.abs(ours[i] - ref).mean() < 0.05


def test_color_jitter_samples_factors_per_image():
    x = np.full((16, 4, 4, 3), 100.0, np.float32)
    out = np.asarray(augment.color_jitter(jax.random.key(0), x, brightness=0.5))
    ratio = out[:, 0, 0, 0] / 100.0
    np.testing.assert_allclose(out, ratio[:, None, None, None] * x, rtol=1e-5)
    assert (ratio >= 0.5).all() and (ratio <= 1.5).all() and len(np.unique(ratio)) == 16


def test_color_jitter_random_order_per_image():
    # Fixed factors, so only the order varies; clamping makes the two orders differ.
    x = np.repeat(_float_batch(n=1), 32, axis=0)
    out = np.asarray(augment.color_jitter(jax.random.key(0), x, brightness=(1.8, 1.8), contrast=(0.5, 0.5)))
    b_then_c = np.asarray(augment.adjust_contrast(augment.adjust_brightness(x[:1], 1.8), 0.5))[0]
    c_then_b = np.asarray(augment.adjust_brightness(augment.adjust_contrast(x[:1], 0.5), 1.8))[0]
    assert not np.allclose(b_then_c, c_then_b, atol=1e-2)
    first = np.array([np.allclose(o, b_then_c, atol=1e-3) for o in out])
    second = np.array([np.allclose(o, c_then_b, atol=1e-3) for o in out])
    assert (first | second).all() and first.any() and second.any()
    fixed = np.asarray(augment.color_jitter(jax.random.key(0), x, brightness=(1.8, 1.8), contrast=(0.5, 0.5),
                                            random_order=False))
    np.testing.assert_allclose(fixed, np.broadcast_to(b_then_c, fixed.shape), atol=1e-3)


def test_color_jitter_validates_ranges():
    x = _float_batch(n=1)
    with pytest.raises(ValueError):
        augment.color_jitter(jax.random.key(0), x, hue=0.6)
    with pytest.raises(ValueError):
        augment.color_jitter(jax.random.key(0), x, brightness=-0.1)
    with pytest.raises(ValueError):
        augment.random_resized_crop_params(jax.random.key(0), 1, 8, 8, scale=(1.0, 0.5))
