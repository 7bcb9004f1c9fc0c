"""Test-time augmentation (``--tta N``): class probabilities averaged over several views of each image.

The views of a batch (uint8 or float NHWC), as timm's ``validate.py --tta`` and torchvision's
``FiveCrop`` / ``TenCrop``:

* ``N = 1``: the centre crop at ``input_size`` - the plain evaluation, unchanged;
* ``N = 2``: the centre crop and its horizontal mirror;
* ``N = 5``: the centre crop and the four corner crops at ``input_size`` of the ``resize_size`` image
  (FiveCrop);
* ``N = 10``: those five and their mirrors (TenCrop).

The model's softmax probabilities are averaged over the views (the mean of probabilities, not of
logits, as timm does), the prediction is their argmax and the loss is the cross-entropy of the
averaged probabilities. The crops of ``N = 5, 10`` come from the centre square of the resized image
(the loader ships that square, :func:`loader_preprocessing`), not from the whole resized image as
torchvision's FiveCrop after ``Resize``: the same for square images, and the corners of a long image
lie a little further in.

Flips are refused (:func:`check_views`) for a model trained without them on data whose class changes
with a mirror image (digits): a mirrored view there is a different image, not the same one seen again.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxtl.data.preprocessing import Preprocessing
from jaxtl.errors import ConfigError

ALLOWED = (1, 2, 5, 10)
FLIPPED = (2, 10)           # the view sets that contain mirror images
CROPPED = (5, 10)           # the view sets that need the larger image
VIEW_NAMES = {1: "centre crop", 2: "centre crop and its mirror", 5: "centre and four corner crops",
              10: "centre and four corner crops and their mirrors"}


def check_views(n: int, flips_ok: bool = True, why: str = "") -> int:
    """``n`` when it is an allowed number of views (and, with flips, when the model may see them);
    otherwise one :class:`ConfigError` line."""
    if n not in ALLOWED:
        raise ConfigError(f"--tta {n}: choose 1 (no TTA), 2 (+ horizontal flip), 5 (five crops) or 10 "
                          "(five crops and their flips)")
    if n in FLIPPED and not flips_ok:
        raise ConfigError(f"--tta {n} averages over horizontal flips, but {why or 'this model'} was trained "
                          "without flips (a mirror image changes the class); use --tta 5 (crops without flips)")
    return n


def loader_preprocessing(pre: Preprocessing, n: int) -> Preprocessing:
    """What the host loader must ship for ``n`` views: the model's own centre crop for 1 and 2 views,
    the un-cropped ``resize_size`` centre square (a crop of side ``max(resize_size, input_size)``) for
    the five crops."""
    if n not in CROPPED:
        return pre
    side = max(pre.resize_size, pre.input_size)
    return Preprocessing(side, pre.resize_size, pre.mean, pre.std, pre.interpolation)


def _crop(images, top: int, left: int, size: int):
    return images[:, top:top + size, left:left + size, :]


def centre_crop(images, size: int):
    """The centre ``size`` square of NHWC images, offsets rounded as torchvision's ``CenterCrop``."""
    h, w = images.shape[1], images.shape[2]
    if (h, w) == (size, size):
        return images
    return _crop(images, int(round((h - size) / 2.0)), int(round((w - size) / 2.0)), size)


def five_crops(images, size: int):
    """(5, N, size, size, C): centre, top-left, top-right, bottom-left, bottom-right crops of NHWC images."""
    h, w = images.shape[1], images.shape[2]
    if h < size or w < size:
        raise ValueError(f"five crops of {size} need images of at least {size}x{size}, got {h}x{w}")
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size)]
    return jnp.stack([centre_crop(images, size)] + [_crop(images, t, left, size) for t, left in corners])


def hflip(images):
    """Horizontal mirror of (..., H, W, C) images."""
    return images[..., ::-1, :]


def views(images, input_size: int, n: int):
    """(n, N, input_size, input_size, C): the ``n`` views of a batch (see the module's docstring).

    View 0 is always the centre crop, the plain evaluation's input. Pure and jittable; the sizes
    and ``n`` are static.
    """
    check_views(n)
    base = five_crops(images, input_size) if n in CROPPED else centre_crop(images, input_size)[None]
    return jnp.concatenate([base, hflip(base)]) if n in FLIPPED else base


def _divided(view_logits, temperature: float | None):
    """float32 logits, divided by ``temperature`` when there is one."""
    logits = view_logits.astype(jnp.float32)
    return logits if temperature is None else logits / jnp.float32(temperature)


def log_mean_probabilities(view_logits, temperature: float | None = None):
    """The log of the softmax probabilities (of the logits divided by ``temperature``) averaged over the
    leading views axis: (V, N, C) -> (N, C), float32. In log space, so the loss of a confidently wrong
    example stays exact where its probability underflows float32."""
    logits = _divided(view_logits, temperature)
    return jax.nn.logsumexp(jax.nn.log_softmax(logits, axis=-1), axis=0) - jnp.log(jnp.float32(logits.shape[0]))


def mean_probabilities(view_logits, temperature: float | None = None):
    """Softmax probabilities (of the logits divided by ``temperature``) averaged over the leading
    views axis: (V, N, C) -> (N, C), float32."""
    return jnp.mean(jax.nn.softmax(_divided(view_logits, temperature), axis=-1), axis=0)


def view_logits(apply_logits: Callable[[Any, jax.Array], jax.Array], variables, images, input_size: int, n: int):
    """(V, N, C) logits of the ``n`` views, one view at a time (the memory of one batch, not ``n``)."""
    return lax.map(lambda x: apply_logits(variables, x), views(images, input_size, n))


def make_tta_eval_step(apply_logits: Callable[[Any, jax.Array], jax.Array], *, num_classes: int, n: int,
                       input_size: int, top_k: int = 5, with_logits: bool = False):
    """An eval step with :func:`jaxtl.training.step.make_eval_step`'s outputs (loss_sum, correct,
    correct_topk, count, pred, confidence) over ``n`` views, so ``accumulate``/``metrics`` work as before.

    ``n = 1`` is ``make_eval_step`` itself. ``with_logits`` adds ``logits``, (N, V, C) per example, for
    temperature scaling (:mod:`jaxtl.calibration`).
    """
    from jaxtl.training.step import make_eval_step

    check_views(n)
    if n == 1 and not with_logits:
        return make_eval_step(apply_logits, num_classes=num_classes, top_k=top_k)
    if n == 1:  # the plain step on the logits, so its outputs stay those of the plain evaluation
        plain = make_eval_step(lambda _, logits: logits, num_classes=num_classes, top_k=top_k)

        def step_one(variables: dict, batch: dict) -> dict:
            logits = apply_logits(variables, centre_crop(batch["image"], input_size))
            return {**plain(None, {**batch, "image": logits}), "logits": logits[:, None]}

        return step_one

    def step(variables: dict, batch: dict) -> dict:
        per_view = view_logits(apply_logits, variables, batch["image"], input_size, n)
        probs = mean_probabilities(per_view)
        labels, weight = batch["label"], batch["weight"].astype(jnp.float32)
        loss = -jnp.take_along_axis(log_mean_probabilities(per_view), labels[:, None], -1)[:, 0]
        pred = jnp.argmax(probs, -1)
        topk = lax.top_k(probs, min(top_k, num_classes))[1]
        out = {
            "loss_sum": jnp.sum(loss * weight),
            "correct": jnp.sum((pred == labels) * weight),
            "correct_topk": jnp.sum(jnp.any(topk == labels[:, None], axis=-1) * weight),
            "count": jnp.sum(weight),
            "pred": pred,
            "confidence": jnp.max(probs, -1),
        }
        if with_logits:
            out["logits"] = jnp.swapaxes(per_view, 0, 1)
        return out

    return step


def flips_allowed(run_config: dict, meta: dict, data=None) -> bool:
    """Whether the model may be shown mirror images: as its training flipped - the run's explicit
    ``hflip`` (meta's ``training.hflip`` or config.json's), else the data's own default."""
    explicit = meta.get("training", {}).get("hflip", run_config.get("hflip"))
    if explicit is not None:
        return bool(explicit)
    if data is not None:
        return bool(data.flip_invariant)
    from jaxtl.data.sources import mirror_changes_class

    return not mirror_changes_class(run_config.get("data"))
