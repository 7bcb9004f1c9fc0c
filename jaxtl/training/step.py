"""Per-device train and eval steps: ``(state, batch, ...) -> (state, metrics)``.

Written once, for one device; :mod:`jaxtl.training.parallel` maps them over
all devices. With ``axis_name`` set, gradients and metrics are summed across
devices and BatchNorm statistics are synchronised by the model itself (its
BatchNorm layers were built with the same axis name).

A batch is ``{"image": uint8 NHWC, "label": int32, "weight": float32}``;
``weight`` is 1 for real examples and 0 for padding, so the loss and the
metrics are exact however a batch was padded.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxtl.training.state import TrainState

Prepare = Callable[[jax.Array, jax.Array], jax.Array]  # (rng, uint8 images) -> float32 model input


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0):
    """Per-example loss; the same formula as torch.nn.CrossEntropyLoss(label_smoothing=...)."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if label_smoothing:
        onehot = onehot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)


def _psum(x, axis_name):
    return lax.psum(x, axis_name) if axis_name else x


def stop_frozen_gradients(params: Any, trainable: Any) -> Any:
    """Frozen leaves become constants: JAX then builds no backward pass for them
    (nor for layers whose inputs and parameters are all constant)."""
    return jax.tree.map(lambda p, t: p if t else lax.stop_gradient(p), params, trainable)


Forward = Callable[[Any, Any, jax.Array, jax.Array], tuple[jax.Array, Any]]


def image_forward(model, *, frozen: Sequence[str], prepare: Prepare) -> Forward:
    """Augment/normalise uint8 images on the device, then run the model in train mode.

    ``frozen`` groups run in inference mode (running BatchNorm statistics,
    no dropout); the tuple is static, so each strategy stage compiles once.
    """
    frozen = tuple(frozen)

    def forward(params, batch_stats, images, key):
        aug_key, dropout_key = jax.random.split(key)
        x = prepare(aug_key, images)
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True, frozen=frozen,
                                      mutable=["batch_stats"], rngs={"dropout": dropout_key})
        return logits, updates.get("batch_stats", batch_stats)

    return forward


def head_forward(head_path: Sequence[str], drop_rate: float = 0.0) -> Forward:
    """The classifier alone on cached features (``--cache-features``): dropout + Dense."""

    def forward(params, batch_stats, features, key):
        head = params
        for name in head_path:
            head = head[name]
        x = features.astype(jnp.float32)
        if drop_rate > 0:
            keep = jax.random.bernoulli(key, 1.0 - drop_rate, x.shape)
            x = jnp.where(keep, x / (1.0 - drop_rate), 0.0)
        logits = x @ head["kernel"] + head.get("bias", 0.0)
        return logits, batch_stats

    return forward


def make_train_step(forward: Forward, tx: optax.GradientTransformation, *, trainable: Any, num_classes: int,
                    label_smoothing: float = 0.0, axis_name: str | None = None):
    """The per-device train step for one strategy stage."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        key = jax.random.fold_in(state.key, state.step)
        if axis_name:
            key = jax.random.fold_in(key, lax.axis_index(axis_name))
        labels, weight = batch["label"], batch["weight"].astype(jnp.float32)
        total = jnp.maximum(_psum(jnp.sum(weight), axis_name), 1.0)

        def loss_fn(params):
            params = stop_frozen_gradients(params, trainable)
            logits, batch_stats = forward(params, state.batch_stats, batch["image"], key)
            per_example = cross_entropy(logits, labels, num_classes, label_smoothing)
            # Divide by the global count and sum gradients across devices: exact
            # whatever the number of real examples on each device.
            return jnp.sum(per_example * weight) / total, (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = _psum(grads, axis_name)
        loss = _psum(loss, axis_name)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        opt_updates, opt_state = tx.update(grads, state.opt_state, state.params)
        opt_updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), opt_updates)
        params = optax.apply_updates(state.params, opt_updates)
        new = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state)
        # A non-finite loss or gradient leaves the state untouched (the loop
        # stops or skips the step, as the user asked) - never half-applied.
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1))
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weight)
        metrics = {"loss_sum": loss * total, "correct": _psum(correct, axis_name), "count": total,
                   "grad_norm": grad_norm, "finite": finite}
        return new, metrics

    return train_step


def make_eval_step(apply_logits: Callable[[Any, jax.Array], jax.Array], *, num_classes: int,
                   axis_name: str | None = None, top_k: int = 5):
    """Per-device evaluation: summed loss/top-1/top-k and the per-example predictions.

    ``apply_logits(variables, inputs)`` is the model in eval mode (images) or
    the head alone (cached features).
    """

    def eval_step(variables: dict, batch: dict) -> dict:
        logits = apply_logits(variables, batch["image"])
        labels, weight = batch["label"], batch["weight"].astype(jnp.float32)
        loss = cross_entropy(logits, labels, num_classes)
        pred = jnp.argmax(logits, -1)
        k = min(top_k, num_classes)
        topk = lax.top_k(logits, k)[1]
        in_topk = jnp.any(topk == labels[:, None], axis=-1)
        return {
            "loss_sum": _psum(jnp.sum(loss * weight), axis_name),
            "correct": _psum(jnp.sum((pred == labels) * weight), axis_name),
            "correct_topk": _psum(jnp.sum(in_topk * weight), axis_name),
            "count": _psum(jnp.sum(weight), axis_name),
            "pred": pred,  # per example, for the confusion matrix
        }

    return eval_step
