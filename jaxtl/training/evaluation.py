"""Evaluation shared by the training loop and ``python -m jaxtl.evaluate``: sums of the eval step's
outputs over a split, in batch order, and the metrics they give."""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np

EVAL_SUMS = ("loss_sum", "correct", "correct_topk", "count")


def accumulate(outputs: Iterable[dict], stacked: bool = False,
               predictions: Callable = np.asarray) -> tuple[dict[str, float], np.ndarray]:
    """The eval step's sums over ``outputs`` and their predictions, concatenated.

    ``stacked`` outputs hold one entry per batch (an epoch evaluated in one call);
    they are summed on the host in batch order, as unstacked ones are, so both
    give the same floats. ``predictions`` brings an output's ``pred`` to the host.
    """
    sums = dict.fromkeys(EVAL_SUMS, 0.0)
    preds = []
    for out in outputs:
        if stacked:
            host = jax.device_get({k: out[k] for k in EVAL_SUMS})
            for i in range(len(host["count"])):
                for k in EVAL_SUMS:
                    sums[k] += float(host[k][i])
        else:
            for k in EVAL_SUMS:
                sums[k] += float(out[k])
        preds.append(predictions(out["pred"]))
    return sums, np.concatenate(preds) if preds else np.zeros(0, np.int32)


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """ECE (Guo et al., ICML 2017): over ``bins`` equal-width confidence bins, the example-weighted mean
    of |accuracy - mean confidence|. ``confidence`` is each example's top softmax probability."""
    confidence, correct = np.asarray(confidence, np.float64), np.asarray(correct, np.float64)
    if confidence.size == 0:
        return float("nan")
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)  # (0, 1/bins] is bin 0
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / confidence.size)


def balanced_accuracy(per_class_recall: np.ndarray) -> float:
    """The mean recall over the classes that have examples (scikit-learn's balanced_accuracy_score)."""
    recall = np.asarray(per_class_recall, np.float64)
    return float(np.nanmean(recall)) if np.any(~np.isnan(recall)) else float("nan")


def metrics(sums: dict[str, float]) -> dict:
    """Mean loss, top-1 and top-5 over the counted (unpadded, readable) examples."""
    count = max(sums["count"], 1.0)
    return {"loss": sums["loss_sum"] / count, "top1": sums["correct"] / count,
            "top5": sums["correct_topk"] / count, "count": int(sums["count"])}
