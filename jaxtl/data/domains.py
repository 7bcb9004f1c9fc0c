"""A domain shift for offline domain-adaptation demos and tests.

``digits-shifted`` is scikit-learn's digits, inverted (light digit on dark
becomes dark on light), tinted with a random colour per image and overlaid
with Gaussian noise: the same classes, a different look, the classic setting
of MNIST -> MNIST-M. It is split with the same stratified seed as ``digits``,
so its validation images are the shifted versions of digits' validation
images: never seen, in any form, by a run trained on digits.
"""

from __future__ import annotations

import numpy as np


def shift_digits(images_rgb_uint8: np.ndarray, seed: int = 12345) -> np.ndarray:
    """Invert, tint per image, add noise; deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    x = 255.0 - images_rgb_uint8.astype(np.float64)
    n = len(x)
    tint = rng.uniform(0.25, 1.0, (n, 1, 1, 3))
    offset = rng.uniform(0.0, 60.0, (n, 1, 1, 3))
    noise = rng.normal(0.0, 25.0, x.shape)
    return np.clip(x * tint + offset + noise, 0, 255).round().astype(np.uint8)
