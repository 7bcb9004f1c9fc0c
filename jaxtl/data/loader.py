"""The host-side loader: decode and resize in background threads, prefetch to the devices.

* Training batches: each image's shorter side is resized to the backbone's
  ``resize_size`` and the centre square is kept (uint8, e.g. 256x256); the
  random resized crop, flip and colour jitter then run jitted on the device
  (:mod:`jaxtl.data.augment`). The random resized crop therefore samples from
  the centre square rather than the whole image (torchvision samples from the
  whole image); for the near-square photos of classification sets this is
  close, and it keeps host work to one resize.
* Evaluation batches: resize shorter side + centre crop exactly as torchvision's
  eval transform (:mod:`jaxtl.data.transforms`).

Shuffling is a permutation drawn from ``(seed, epoch)``, so the same seed gives
the same batches, also after a resume. Training drops the last partial batch
(``drop_last``); evaluation pads it and masks the padding (``weight`` 0), so
every example is counted exactly once. In a multi-host run each process loads
its own slice of every global batch.

Pillow releases the GIL while decoding and resizing, so threads give real
parallelism without pickling images between processes. A file that turns out
to be unreadable while loading (a truncated JPEG that passed the header check)
gets weight 0 and is reported in ``loader.bad``; its slot is filled with a copy
of another image of the batch so BatchNorm statistics never see a blank image.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

import numpy as np

from jaxtl.data.decode import BadImageError
from jaxtl.data.sources import Source
from jaxtl.data.transforms import center_crop, eval_crop, resize_shorter_side
from jaxtl.errors import ConfigError
from jaxtl.data.preprocessing import Preprocessing

_DONE = object()


def train_image_size(pre: Preprocessing) -> int:
    """Side of the square the host ships for training (the device crops from it)."""
    return max(pre.resize_size, pre.input_size)


class BatchPlan:
    """Which examples form each batch of an epoch (shared by images and cached features)."""

    def __init__(self, n: int, batch_size: int, *, train: bool, seed: int = 0, shuffle: bool | None = None,
                 drop_last: bool | None = None, process_index: int = 0, process_count: int = 1,
                 sample_weights: np.ndarray | None = None):
        if batch_size < 1:
            raise ConfigError(f"batch size must be >= 1, got {batch_size}")
        if batch_size % process_count:
            raise ConfigError(f"batch size {batch_size} is not divisible by the {process_count} processes")
        self.n, self.batch_size, self.train, self.seed = n, batch_size, train, seed
        self.shuffle = train if shuffle is None else shuffle
        self.drop_last = train if drop_last is None else drop_last
        self.process_index, self.process_count = process_index, process_count
        # With weights, an epoch is n draws with replacement, as torch's WeightedRandomSampler.
        self.sample_weights = None if sample_weights is None else np.asarray(sample_weights, np.float64)
        if self.drop_last and n < batch_size:
            raise ConfigError(f"the training set has {n} images, fewer than one batch of {batch_size}; "
                              "lower --batch-size")

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    @property
    def local_batch_size(self) -> int:
        return self.batch_size // self.process_count

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        if self.sample_weights is not None:
            p = self.sample_weights / self.sample_weights.sum()
            return np.random.default_rng([self.seed, epoch]).choice(self.n, size=self.n, replace=True, p=p)
        return np.random.default_rng([self.seed, epoch]).permutation(self.n)

    def local_slices(self, epoch: int) -> Iterator[tuple[np.ndarray, int]]:
        """(this process's indices, how many of them are real) for every batch."""
        order = self.order(epoch)
        lb = self.local_batch_size
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            n_real_global = len(idx)
            if n_real_global < self.batch_size:  # evaluation: pad the last batch
                idx = np.concatenate([idx, np.zeros(self.batch_size - n_real_global, idx.dtype)])
            lo = self.process_index * lb
            yield idx[lo:lo + lb], int(np.clip(n_real_global - lo, 0, lb))


def prefetch(batches: Iterator[Any], size: int) -> Iterator[Any]:
    """Run ``batches`` in a background thread, ``size`` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=max(size, 1))
    stop = threading.Event()

    def produce():
        try:
            for item in batches:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)
            return
        q.put(_DONE)

    thread = threading.Thread(target=produce, daemon=True, name="jaxtl-loader")
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                pass
            thread.join(timeout=0.05)


class Loader(BatchPlan):
    """Decoded, resized uint8 image batches of a source."""

    def __init__(self, source: Source, pre: Preprocessing, *, batch_size: int, train: bool, seed: int = 0,
                 shuffle: bool | None = None, drop_last: bool | None = None, workers: int = 2, prefetch: int = 2,
                 process_index: int = 0, process_count: int = 1, put: Callable[[dict], Any] | None = None,
                 sample_weights: np.ndarray | None = None):
        super().__init__(len(source), batch_size, train=train, seed=seed, shuffle=shuffle, drop_last=drop_last,
                         process_index=process_index, process_count=process_count, sample_weights=sample_weights)
        self.source, self.pre = source, pre
        self.workers, self.prefetch = max(1, workers), max(1, prefetch)
        self.put = put or (lambda b: b)
        self.size = train_image_size(pre) if train else pre.input_size
        self.bad: dict[str, str] = {}

    def _load_one(self, index: int) -> np.ndarray:
        im = self.source.image(index)
        if self.train:
            im = center_crop(resize_shorter_side(im, self.size, self.pre.interpolation), self.size)
            return np.asarray(im, np.uint8)
        return eval_crop(im, self.pre)

    def _batch(self, pool: ThreadPoolExecutor, indices: np.ndarray, n_real: int) -> dict:
        """Decode one local batch; ``indices`` beyond ``n_real`` are padding."""
        b = len(indices)
        images = np.zeros((b, self.size, self.size, 3), np.uint8)
        labels = np.zeros((b,), np.int32)
        weight = np.zeros((b,), np.float32)
        real = [i for i in range(b) if i < n_real]
        futures = {i: pool.submit(self._load_one, int(indices[i])) for i in real}
        good = []
        for i in real:
            try:
                images[i] = futures[i].result()
                weight[i] = 1.0
                good.append(i)
            except BadImageError as e:
                self.bad[self.source.describe(int(indices[i]))] = str(e)
            labels[i] = self.source.labels[int(indices[i])]
        if good:  # padding and bad slots repeat real images (weight 0): BatchNorm sees no blanks
            for i in range(b):
                if weight[i] == 0:
                    images[i] = images[good[i % len(good)]]
                    labels[i] = labels[good[i % len(good)]]
        return {"image": images, "label": labels, "weight": weight}

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Any]:
        """Batches of one epoch (from ``start_batch``, for resuming), decoded in the background."""

        def batches():
            with ThreadPoolExecutor(max_workers=self.workers) as pool:
                for b, (idx, n_real) in enumerate(self.local_slices(epoch)):
                    if b >= start_batch:
                        yield self.put(self._batch(pool, idx, n_real))

        return prefetch(batches(), self.prefetch)


class ArrayLoader(BatchPlan):
    """Batches of in-memory arrays (cached features), with the same order as :class:`Loader`."""

    def __init__(self, inputs: np.ndarray, labels: np.ndarray, weight: np.ndarray, *, batch_size: int, train: bool,
                 seed: int = 0, process_index: int = 0, process_count: int = 1,
                 put: Callable[[dict], Any] | None = None, sample_weights: np.ndarray | None = None):
        super().__init__(len(inputs), batch_size, train=train, seed=seed, process_index=process_index,
                         process_count=process_count, sample_weights=sample_weights)
        self.inputs, self.labels, self.weight = inputs, labels, weight
        self.put = put or (lambda b: b)

    def epoch(self, epoch: int = 0, start_batch: int = 0) -> Iterator[Any]:
        for b, (idx, n_real) in enumerate(self.local_slices(epoch)):
            if b < start_batch:
                continue
            weight = self.weight[idx].copy()
            weight[n_real:] = 0.0
            yield self.put({"image": self.inputs[idx], "label": self.labels[idx], "weight": weight})

    def stacked(self, epoch: int = 0, start_batch: int = 0) -> dict | None:
        """The batches of :meth:`epoch` stacked on a leading steps axis (one gather, not one per
        batch), for a step that takes them all at once; None when no batch is left."""
        slices = list(self.local_slices(epoch))[start_batch:]
        if not slices:
            return None
        idx = np.stack([i for i, _ in slices])
        real = np.arange(idx.shape[1])[None, :] < np.array([n for _, n in slices])[:, None]
        return {"image": self.inputs[idx], "label": self.labels[idx],
                "weight": np.where(real, self.weight[idx], np.float32(0.0)).astype(np.float32)}
