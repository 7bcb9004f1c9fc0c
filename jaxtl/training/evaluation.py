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


def metrics(sums: dict[str, float]) -> dict:
    """Mean loss, top-1 and top-5 over the counted (unpadded, readable) examples."""
    count = max(sums["count"], 1.0)
    return {"loss": sums["loss_sum"] / count, "top1": sums["correct"] / count,
            "top5": sums["correct_topk"] / count, "count": int(sums["count"])}
