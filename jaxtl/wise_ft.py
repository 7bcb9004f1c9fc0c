"""WiSE-FT (Wortsman et al., CVPR 2022): the fine-tuned model interpolated in weight space with the
pretrained one it started from, ``(1 - alpha) * pretrained + alpha * fine-tuned``.

Every parameter and BatchNorm statistic of the backbone is interpolated; the classifier is kept
as it was fine-tuned, since these backbones come without a zero-shot head (CLIP's text tower is
not part of jaxtl) and a new head starts from random values. ``alpha = 0`` is the pretrained
backbone and ``alpha = 1`` the fine-tuned model, exactly.

``python -m jaxtl.train ... --wise-ft 0.5`` exports the interpolated model;
``python -m jaxtl.evaluate --checkpoint RUN --wise-ft-sweep`` evaluates a sweep of ``alpha``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from flax import traverse_util

from jaxtl.errors import CheckpointError, ConfigError

SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
HEAD_KEPT = "fine-tuned (no zero-shot head)"


def lerp(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) * a + alpha * b`` in float64, cast back; the endpoints are ``a`` and ``b`` themselves."""
    if alpha == 0:
        return np.array(a, copy=True)
    if alpha == 1:
        return np.array(b, copy=True)
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((1.0 - alpha) * a64 + alpha * b64).astype(np.asarray(a).dtype)


def interpolate(pretrained: Mapping[str, Any], finetuned: Mapping[str, Any], alpha: float,
                keep: Sequence[str] = ()) -> dict:
    """Variables ``(1 - alpha) * pretrained + alpha * finetuned`` leaf by leaf; the subtree at params path
    ``keep`` (the head) is ``finetuned``'s. Both trees must hold the same paths and shapes."""
    pre = traverse_util.flatten_dict(dict(pretrained))
    fin = traverse_util.flatten_dict(dict(finetuned))
    if pre.keys() != fin.keys():
        odd = sorted("/".join(k) for k in pre.keys() ^ fin.keys())
        raise CheckpointError(f"WiSE-FT: the pretrained and the fine-tuned model differ in their variables "
                              f"({', '.join(odd[:3])}); they must be the same backbone")
    kept = ("params", *keep)
    out = {}
    for path, value in fin.items():
        if np.shape(pre[path]) != np.shape(value):
            raise CheckpointError(f"WiSE-FT: {'/'.join(path)} has shape {np.shape(pre[path])} pretrained and "
                                  f"{np.shape(value)} fine-tuned; they must be the same backbone")
        if keep and path[:len(kept)] == kept:
            out[path] = np.array(value, copy=True)
        elif np.issubdtype(np.asarray(value).dtype, np.floating):
            out[path] = lerp(pre[path], value, alpha)
        else:
            out[path] = np.array(value, copy=True)
    return traverse_util.unflatten_dict(out)


def parse_alphas(text: str | None) -> tuple[float, ...]:
    """``"0,0.5,1"`` -> (0.0, 0.5, 1.0); None -> :data:`SWEEP`."""
    if text is None:
        return SWEEP
    try:
        alphas = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--wise-ft-sweep: expected mixing coefficients like 0,0.5,1, got {text!r}") from None
    if not alphas or any(not 0 <= a <= 1 for a in alphas):
        raise ConfigError(f"--wise-ft-sweep: every coefficient must be in [0, 1], got {text!r}")
    return alphas
