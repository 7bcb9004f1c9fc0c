"""Domain shifts of the digits set, for offline domain-adaptation demos and tests.

``digits-shifted`` is scikit-learn's digits built the way MNIST-M is built
from MNIST (Ganin et al. 2016): each image is the absolute difference between
a random colour texture and the digit, ``|texture - digit|``. The stroke keeps
its shape as a contrast edge, while colours and background change from image
to image - the classic setting in which domain-adversarial training helps. It
is split with the same stratified seed as ``digits``, so its validation images
are the shifted versions of digits' validation images: never seen, in any
form, by a run trained on digits.

``digits-inverted`` is the milder shift: colour-inverted and re-tinted - a dark
digit on a background of a random light colour per image, plus pixel noise.
"""

from __future__ import annotations

import numpy as np


def _smooth_textures(rng: np.random.Generator, n: int, h: int, w: int) -> np.ndarray:
    """Per image: a bilinear blend of four random corner colours plus fine noise, in [0, 255]."""
    c = rng.uniform(0, 255, (n, 2, 2, 3))[:, :, :, None, None, :]  # (n, row, col, 1, 1, 3)
    ys = np.linspace(0.0, 1.0, h)[:, None, None]                    # (h, 1, 1)
    xs = np.linspace(0.0, 1.0, w)[None, :, None]                    # (1, w, 1)
    top = c[:, 0, 0] * (1 - xs) + c[:, 0, 1] * xs                   # (n, 1, w, 3)
    bottom = c[:, 1, 0] * (1 - xs) + c[:, 1, 1] * xs
    blend = top * (1 - ys) + bottom * ys                            # (n, h, w, 3)
    return np.clip(blend + rng.normal(0, 8, (n, h, w, 3)), 0, 255)


def shift_digits(images_rgb_uint8: np.ndarray, seed: int = 12345) -> np.ndarray:
    """MNIST-M style: |random colour texture - digit|; deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    n, h, w, _ = images_rgb_uint8.shape
    texture = _smooth_textures(rng, n, h, w)
    return np.abs(texture - images_rgb_uint8.astype(np.float64)).round().astype(np.uint8)


def invert_digits(images_rgb_uint8: np.ndarray, seed: int = 54321) -> np.ndarray:
    """Colour-inverted and re-tinted: ``tint * (1 - digit)`` + noise; deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    n, h, w, _ = images_rgb_uint8.shape
    tint = rng.uniform(96, 255, (n, 1, 1, 3))
    inverted = tint * (1.0 - images_rgb_uint8.astype(np.float64) / 255.0)
    return np.clip(inverted + rng.normal(0, 8, (n, h, w, 3)), 0, 255).round().astype(np.uint8)


SHIFTS = {"digits-shifted": shift_digits, "digits-inverted": invert_digits}
