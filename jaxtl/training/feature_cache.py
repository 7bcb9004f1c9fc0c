"""Features of a frozen backbone, computed once: with feature extraction the head trains on them.

The backbone runs in inference mode on the evaluation preprocessing (no augmentation), once per
image; every epoch after that costs what the head costs (an epoch is one compiled call).
"""

from __future__ import annotations

import time
from typing import Callable, Mapping

import numpy as np

from jaxtl.data.loader import Loader
from jaxtl.data.preprocessing import Preprocessing

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray]   # (features float32, labels, weights), one row per image


def cache_features(model, prepare: Callable, dp, variables: dict, splits: Mapping[str, object], pre: Preprocessing,
                   batch_size: int, loader_kw: dict, *, log: Callable[[str], None],
                   note_bad: Callable) -> dict[str, Arrays]:
    """Pooled features, labels and weights of every image of each split, in the split's order.

    ``prepare`` normalises a device batch of uint8 images; ``dp`` is the run's
    :class:`~jaxtl.training.parallel.DataParallel`; ``note_bad`` is told of each loader's files
    that failed to decode.
    """
    features = dp.map_batch_fn(
        lambda v, batch: model.apply(v, prepare(batch["image"]), train=False, features_only=True))
    variables = dp.replicate(variables)
    cached = {}
    for split, source in splits.items():
        t0 = time.perf_counter()
        loader = Loader(source, pre, batch_size=batch_size, train=False, **loader_kw)
        feats, labels, weight = [], [], []
        for batch in loader.epoch(0):
            feats.append(dp.unshard_per_example(features(variables, batch)))
            labels.append(dp.unshard_per_example(batch["label"]))
            weight.append(dp.unshard_per_example(batch["weight"]))
        n = len(source)
        cached[split] = (np.concatenate(feats)[:n].astype(np.float32), np.concatenate(labels)[:n],
                         np.concatenate(weight)[:n])
        note_bad(loader)
        elapsed = time.perf_counter() - t0
        log(f"cached {split} features: {n} x {cached[split][0].shape[1]} "
            f"[{elapsed:.1f} s, {n / max(elapsed, 1e-9):.0f} images/s]")
    return cached
