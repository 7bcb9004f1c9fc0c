"""Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", ICML 2017).

One scalar ``T > 0`` divides every logit: ``softmax(logits / T)``. ``T`` is the one that minimises the
negative log-likelihood of held-out labels (the validation split, never the images it is then
reported on, or the numbers are optimistic). It leaves the argmax - the accuracy - unchanged and
makes the confidences match the accuracy better (a lower expected calibration error).

:func:`fit_temperature` searches ``log T`` in ``[log 1e-2, log 1e2]`` by golden-section search (the
NLL of one model's logits is convex in ``1 / T``, so unimodal in ``log T``): deterministic, no
learning rate, no gradients, ~60 evaluations of the NLL on the host in float64. Logits of shape
(N, V, C) hold V test-time views per example (:mod:`jaxtl.tta`); their probabilities are averaged
after the temperature, as the evaluation does. Averaging views already softens the probabilities, so a
temperature fitted on single views over-softens TTA's: ``--calibrate --tta N`` fits one for N views
(reported, not stored: the meta's temperature is the single-view one predictions use by default).

The exported model keeps ``T`` in its meta (key ``"temperature"``); ``python -m jaxtl.predict``
divides the logits by it, ``python -m jaxtl.evaluate`` reports the metrics with and without it, and
``python -m jaxtl.evaluate --calibrate --write`` fits and stores it.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from jaxtl.errors import ConfigError, DataError

T_RANGE = (1e-2, 1e2)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_LOG_TOL = 1e-7  # stop when the bracket on log T is narrower: T to ~1e-7 relative


def apply_temperature(logits, temperature: float):
    """``logits / temperature`` (numpy or JAX arrays alike)."""
    if not temperature > 0:
        raise ConfigError(f"a temperature must be positive, got {temperature}")
    return logits / temperature


def _as_views(logits) -> np.ndarray:
    """(N, C) or (N, V, C) -> float64 (N, V, C)."""
    z = np.asarray(logits, np.float64)
    if z.ndim == 2:
        z = z[:, None, :]
    if z.ndim != 3:
        raise ValueError(f"logits must be (N, C) or (N, views, C), got shape {z.shape}")
    return z


def log_probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """float64 log of softmax(logits / T) averaged over the views of (N, V, C) logits: (N, C). In log
    space, so a confidently wrong example's NLL stays exact where its probability underflows."""
    z = _as_views(logits) / temperature
    m = z.max(-1, keepdims=True)
    log_p = z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))
    top = log_p.max(1, keepdims=True)
    return (top + np.log(np.exp(log_p - top).mean(1, keepdims=True)))[:, 0]


def probabilities(logits, temperature: float = 1.0) -> np.ndarray:
    """float64 softmax(logits / T), averaged over the views of (N, V, C) logits: (N, C)."""
    return np.exp(log_probabilities(logits, temperature))


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under :func:`probabilities`."""
    labels = np.asarray(labels, np.int64)
    return float(-log_probabilities(logits, temperature)[np.arange(len(labels)), labels].mean())


def _check(logits, labels) -> tuple[np.ndarray, np.ndarray]:
    z, labels = _as_views(logits), np.asarray(labels, np.int64)
    if len(z) == 0:
        raise DataError("no examples to fit a temperature on")
    if labels.shape != (len(z),):
        raise ValueError(f"{len(z)} logits but labels of shape {labels.shape}")
    if labels.min() < 0 or labels.max() >= z.shape[-1]:
        raise DataError(f"labels must be in [0, {z.shape[-1]}) to fit a temperature")
    if not np.all(np.isfinite(z)):
        raise DataError("the logits are not all finite; a temperature cannot be fitted")
    return z, labels


def fit_temperature(logits, labels, bounds: tuple[float, float] = T_RANGE) -> float:
    """The ``T`` in ``bounds`` minimising :func:`nll` of ``softmax(logits / T)`` (golden-section search
    on ``log T``). A result at a bound means the optimum lies beyond it (e.g. every example right with
    a margin: the NLL keeps falling as T -> 0)."""
    z, labels = _check(logits, labels)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    f = {}

    def loss(log_t: float) -> float:
        if log_t not in f:
            f[log_t] = nll(z, labels, math.exp(log_t))
        return f[log_t]

    a, b = lo, hi
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    while b - a > _LOG_TOL:
        if loss(c) <= loss(d):
            b, d = d, c
            c = b - _GOLDEN * (b - a)
        else:
            a, c = c, d
            d = a + _GOLDEN * (b - a)
    best = min((lo, hi, (a + b) / 2), key=loss)  # the bounds too: a monotone NLL ends there
    return float(math.exp(best))


def at_bound(temperature: float, bounds: tuple[float, float] = T_RANGE) -> bool:
    return not bounds[0] * 1.001 < temperature < bounds[1] / 1.001


def report(logits, labels, temperature: float) -> dict[str, Any]:
    """NLL, ECE (15 bins) and top-1 before (T = 1) and after dividing the logits by ``temperature``."""
    from jaxtl.training.evaluation import expected_calibration_error

    labels = np.asarray(labels, np.int64)
    out: dict[str, Any] = {"temperature": float(temperature)}
    for when, t in (("before", 1.0), ("after", float(temperature))):
        p = probabilities(logits, t)
        pred = p.argmax(-1)
        out[f"nll_{when}"] = nll(logits, labels, t)
        out[f"ece_{when}"] = expected_calibration_error(p.max(-1), pred == labels)
        out[f"top1_{when}"] = float(np.mean(pred == labels)) if len(labels) else float("nan")
    return out


def collect_logits(apply_logits, variables, batches: Iterable[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) of the real examples (``weight`` > 0) of eval ``batches``.

    ``apply_logits(variables, images) -> logits`` is any jitted eval forward: the model on images, or
    the head on cached features (the training loop's own). Logits come back as float32 (N, C).
    """
    logits, labels = [], []
    for batch in batches:
        keep = np.asarray(batch["weight"]) > 0
        logits.append(np.asarray(apply_logits(variables, batch["image"]), np.float32)[keep])
        labels.append(np.asarray(batch["label"])[keep])
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def fit_on_source(model, variables, pre, source, *, batch_size: int = 64, workers: int = 2) -> float:
    """The temperature of ``model`` on an image source (e.g. ``data.val``): its logits in eval mode
    (the evaluation's preprocessing, one view), then :func:`fit_temperature`."""
    import jax

    from jaxtl.data.augment import eval_prepare
    from jaxtl.data.loader import Loader

    forward = jax.jit(lambda v, x: model.apply(v, eval_prepare(x, pre), train=False))
    loader = Loader(source, pre, batch_size=batch_size, train=False, workers=workers)
    logits, labels = collect_logits(forward, variables, loader.epoch(0))
    return fit_temperature(logits, labels)


def stored_temperature(meta: dict) -> float | None:
    """The temperature an exported model's meta holds, or None."""
    t = meta.get("temperature")
    if t is None:
        return None
    if not (isinstance(t, (int, float)) and t > 0 and math.isfinite(t)):
        raise ConfigError(f"the model's meta holds temperature {t!r}; it must be a positive number "
                          "(fit it again with python -m jaxtl.evaluate --calibrate --write)")
    return float(t)


def write_temperature(checkpoint, temperature: float | None) -> Any:
    """Store ``temperature`` (None removes it) in an exported model's meta: model.msgpack's and
    meta.json's, each written atomically. Returns the model file's path."""
    from pathlib import Path

    from jaxtl.export import MODEL_FILE, read_model_file, save_model, write_variables_file

    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    model_file = folder / MODEL_FILE if path.is_dir() else path
    variables, meta = read_model_file(model_file)
    meta = {k: v for k, v in meta.items() if k != "format"}  # save_model writes the format itself
    if temperature is None:
        meta.pop("temperature", None)
    else:
        meta["temperature"] = float(temperature)
    if model_file.name == MODEL_FILE:
        return save_model(folder, variables, meta)
    write_variables_file(model_file, variables, meta)  # a model file of another name has no meta.json beside it
    return model_file
