"""Per-device train and eval steps: ``(state, frozen, batch) -> (state, metrics)``.

Written once, for one device; :mod:`jaxtl.training.parallel` maps them over
all devices. With ``axis_name`` set, gradients and metrics are summed across
devices and BatchNorm statistics are synchronised by the model itself (its
BatchNorm layers were built with the same axis name).

A batch is ``{"image": uint8 NHWC, "label": int32, "weight": float32}``;
``weight`` is 1 for real examples and 0 for padding, so the loss and the
metrics are exact however a batch was padded.

Randomness does not depend on the number of devices: a step's key is the
run's root key folded with the step, and every per-example draw
(augmentation, dropout, stochastic depth) comes from that key folded with the
example's position in the global batch (:func:`example_keys`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxtl.data.mix import MixConfig, draw, mix_images, mix_keys, mix_targets
from jaxtl.models.layers import example_bernoulli, example_keys
from jaxtl.training.state import EmaConfig, TrainState, merge, select_like

# (one key per image, uint8 images) -> float32 model input
Prepare = Callable[[jax.Array, jax.Array], jax.Array]


def smoothed_targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
    """One-hot targets, label-smoothed as torch.nn.CrossEntropyLoss(label_smoothing=...) does."""
    onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return onehot * (1.0 - label_smoothing) + label_smoothing / num_classes if label_smoothing else onehot


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float = 0.0):
    """Per-example loss; the same formula as torch.nn.CrossEntropyLoss(label_smoothing=...)."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), smoothed_targets(labels, num_classes,
                                                                                    label_smoothing))


def _psum(x, axis_name):
    return lax.psum(x, axis_name) if axis_name else x


def step_key(state: TrainState) -> jax.Array:
    """This step's key: the run's root key folded with the step, the same on every device
    (per-example draws fold in the example's global position: :func:`example_keys`)."""
    return jax.random.fold_in(state.key, state.step)


def apply_gradients(state: TrainState, grads: Any, loss: jax.Array, batch_stats: Any,
                    tx: optax.GradientTransformation, axis_name: str | None, ema: EmaConfig | None = None):
    """The update every objective shares: sum over devices, optimizer, plateau scale, non-finite guard.

    ``grads`` and ``loss`` are this device's; returns ``(new state, global loss, gradient norm, finite)``.
    A non-finite loss or gradient leaves the state as it was (the loop stops or skips the step, as
    the user asked) - never half-applied. The guard selects between two trees of trainable leaves
    only: the frozen variables are not part of the state.
    """
    grads = _psum(grads, axis_name)
    loss = _psum(loss, axis_name)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
    if ema is not None and state.ema is not None:  # the average of the weights this step produced
        new = new.replace(ema=ema.update(state.ema, select_like(new.variables, state.ema), state.step))
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state.replace(step=state.step + 1))
    return new, loss, grad_norm, finite


# (variables, inputs, step key[, axis name]) -> (logits, the model's batch statistics after the pass).
# The train step passes its axis name, from which per-example draws find their global positions.
Forward = Callable[..., tuple[jax.Array, Any]]


# (variables, key) -> the variables the model runs with (LoRA's factors folded into their kernels)
Reparam = Callable[[dict, jax.Array], dict]


def image_forward(model, *, frozen: Sequence[str], prepare: Prepare, reparam: Reparam | None = None,
                  mix: MixConfig | None = None) -> Forward:
    """Augment/normalise uint8 images on the device, then run the model in train mode.

    ``frozen`` groups run in inference mode (running BatchNorm statistics,
    no dropout); the tuple is static, so each strategy stage compiles once.
    Each image is augmented with its own key (:func:`example_keys`); the
    model draws its dropout masks per example itself (it was built with the
    same ``axis_name``). ``reparam`` turns the variables into the model's
    (adapters folded in) inside the differentiated function; ``mix`` mixes the
    prepared images (:mod:`jaxtl.data.mix`; the loss mixes the targets alike).
    """
    frozen = tuple(frozen)

    def forward(variables, images, key, axis_name=None):
        aug_key, dropout_key = jax.random.split(key)
        if reparam is not None:
            variables = reparam(variables, jax.random.fold_in(dropout_key, 1))
        x = prepare(example_keys(aug_key, images.shape[0], axis_name), images)
        if mix is not None and mix.enabled:
            x = mix_images(draw(example_keys(mix_keys(key), x.shape[0], axis_name), x.shape[1], x.shape[2], mix), x)
        logits, updates = model.apply(variables, x, train=True, frozen=frozen, mutable=["batch_stats"],
                                      rngs={"dropout": dropout_key})
        return logits, updates.get("batch_stats", variables.get("batch_stats", {}))

    return forward


def head_logits(head: dict, features: jax.Array, key: jax.Array | None = None, drop_rate: float = 0.0,
                axis_name: str | None = None):
    """The classifier on pooled features: dropout (in training, with ``key``; a mask per example
    from its position in the global batch, :func:`example_bernoulli`) + Dense."""
    x = features.astype(jnp.float32)
    if key is not None and drop_rate > 0:
        keep = example_bernoulli(key, 1.0 - drop_rate, x.shape, axis_name)
        x = jnp.where(keep, x / (1.0 - drop_rate), 0.0)
    return x @ head["kernel"] + head.get("bias", 0.0)


def head_params(params: dict, head_path: Sequence[str]) -> dict:
    for name in head_path:
        params = params[name]
    return params


def head_forward(head_path: Sequence[str], drop_rate: float = 0.0) -> Forward:
    """The classifier alone on cached features (``--cache-features``): dropout + Dense."""

    def forward(variables, features, key, axis_name=None):
        logits = head_logits(head_params(variables["params"], head_path), features, key, drop_rate, axis_name)
        return logits, variables.get("batch_stats", {})

    return forward


# The key of the step's constants that holds L2-SP's reference (the pretrained values of the
# backbone parameters that train), beside the frozen groups' variables.
L2SP_REFERENCE = "l2sp_reference"


def l2sp_penalty(params: Any, reference: Any) -> jax.Array:
    """L2-SP (Li et al., ICML 2018): ||w - w0||^2 / 2 over the parameters that have a pretrained value in
    ``reference`` (a subtree of ``params``)."""
    pairs = zip(jax.tree.leaves(select_like(params, reference)), jax.tree.leaves(reference))
    return 0.5 * sum((jnp.sum(jnp.square(p.astype(jnp.float32) - r.astype(jnp.float32))) for p, r in pairs),
                     jnp.zeros((), jnp.float32))


def make_train_step(forward: Forward, tx: optax.GradientTransformation, *, num_classes: int,
                    label_smoothing: float = 0.0, l2sp: float = 0.0, mix: MixConfig | None = None,
                    mix_size: tuple[int, int] | None = None, ema: EmaConfig | None = None,
                    class_weights: Any = None, axis_name: str | None = None):
    """The per-device train step for one strategy stage: ``(state, frozen, batch) -> (state, metrics)``.

    ``frozen`` holds the frozen groups' variables (:func:`jaxtl.strategies.split_variables`):
    constants here, so neither a gradient nor an update is computed for them, and XLA drops
    the backward pass of every layer whose inputs and parameters are all constant. With ``l2sp``,
    ``frozen[L2SP_REFERENCE]`` holds the pretrained values the trainable backbone is pulled
    towards: a constant of the step too, not a copy in the optimizer state. The reported loss is
    the cross-entropy alone. With ``mix`` (the same as the forward's), the targets are mixed with
    the draws the forward pass made for images of ``mix_size`` (height, width). With
    ``class_weights`` (one per class), the loss is the weighted mean of torch's
    ``CrossEntropyLoss(weight=...)``: sum(w[y] * loss) / sum(w[y]) over the global batch.
    """

    def train_step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        key = step_key(state)
        labels, weight = batch["label"], batch["weight"].astype(jnp.float32)
        total = jnp.maximum(_psum(jnp.sum(weight), axis_name), 1.0)
        loss_weight, loss_total = weight, total
        if class_weights is not None:
            loss_weight = weight * jnp.asarray(class_weights, jnp.float32)[labels]
            loss_total = jnp.maximum(_psum(jnp.sum(loss_weight), axis_name), 1e-12)
        frozen = dict(frozen)
        reference = frozen.pop(L2SP_REFERENCE, None)

        def loss_fn(params):
            variables = merge(frozen, {"params": params, "batch_stats": state.batch_stats})
            logits, batch_stats = forward(variables, batch["image"], key, axis_name)
            if mix is not None and mix.enabled:
                draws = draw(example_keys(mix_keys(key), labels.shape[0], axis_name), *mix_size, mix)
                targets = mix_targets(draws, smoothed_targets(labels, num_classes, label_smoothing))
                per_example = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
            else:
                per_example = cross_entropy(logits, labels, num_classes, label_smoothing)
            # Divide by the global count and sum gradients across devices: exact
            # whatever the number of real examples on each device.
            loss = jnp.sum(per_example * loss_weight) / loss_total
            objective = loss
            if l2sp and reference is not None:  # every device adds its share: the sum over devices is one penalty
                devices = _psum(jnp.ones((), jnp.float32), axis_name)
                objective = loss + l2sp * l2sp_penalty(params, reference) / devices
            return objective, (loss, logits, select_like(batch_stats, state.batch_stats))

        (_, (loss, logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new, loss, grad_norm, finite = apply_gradients(state, grads, loss, batch_stats, tx, axis_name, ema)
        correct = jnp.sum((jnp.argmax(logits, -1) == labels) * weight)
        metrics = {"loss_sum": loss * total, "correct": _psum(correct, axis_name), "count": total,
                   "grad_norm": grad_norm, "finite": finite}
        return new, metrics

    return train_step


# The metrics every train step returns (an objective may add its own after them).
TRAIN_METRICS = ("loss_sum", "correct", "count", "grad_norm", "finite")


def pack_metrics(train_step, names: Sequence[str]):
    """The step with its metrics as one float32 vector in the order of ``names``: one transfer to the
    host per step instead of one per metric. :func:`unpack_metrics` turns it back into a dict."""
    names = tuple(names)

    def step(state: TrainState, frozen: dict, batch: dict):
        state, metrics = train_step(state, frozen, batch)
        return state, jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names], axis=-1)

    return step


def unpack_metrics(vector, names: Sequence[str]) -> dict:
    """A host copy of :func:`pack_metrics`' vector (or a stack of them) -> ``{name: value(s)}``."""
    return {k: vector[..., i] for i, k in enumerate(names)}


def scan_steps(train_step):
    """Several train steps in one call: ``(state, frozen, batches) -> (state, metrics per step)``.

    ``batches`` stack the steps' batches on a leading axis. Used where a step is too small to be
    worth a dispatch from the host (the head on cached features: an epoch is one call).
    """

    def steps(state: TrainState, frozen: dict, batches: dict):
        return lax.scan(lambda s, batch: train_step(s, frozen, batch), state, batches)

    return steps


def map_eval(eval_step):
    """Several evaluation batches in one call: ``(variables, batches) -> outputs per batch``."""

    def evaluate(variables: dict, batches: dict) -> dict:
        return lax.map(lambda batch: eval_step(variables, batch), batches)

    return evaluate


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
            "confidence": jnp.max(jax.nn.softmax(logits.astype(jnp.float32), -1), -1),  # per example, for the ECE
        }

    return eval_step
