"""Run as a script with 4 host devices: the same training steps on 1 device
(shard_map), 4 devices (shard_map) and 4 devices (pmap); print JSON.

With randomness on, as in training: the real augmentation (random resized
crop, flip, colour jitter) and a model with stochastic depth and dropout
active (EfficientNet-B0 at half depth, which also has BatchNorm to synchronise). Every draw
comes from the example's position in the global batch, so the devices must
agree with one device to rounding; a draw that depended on the device would
move the results by O(1).

Two comparisons per 4-device mapping:

* ``trajectory``: three steps in a row from the same start, then the
  difference of the two end states relative to how far the 1-device
  trajectory moved (parameters and running statistics apart, over the whole
  tree: ``params_rel``, ``stats_rel``) and the losses' (``loss_rel``). Not
  leaf by leaf: EfficientNet has leaves that are zero in exact arithmetic
  (the bias of a BatchNorm feeding a linear 1x1 conv and BatchNorm, the
  running mean after that conv), whose float32 values are rounding alone;
* ``one_step``: from each state of the 1-device trajectory, one step on the 4
  devices against the 1-device step from the same state: the difference of the
  two updates (parameters, and running statistics apart) over the whole tree,
  relative to the 1-device update (``update_rel``, the worst step).

``--dann``: the domain-adversarial step (source and target batches) instead of
the plain one. Its training dynamics amplify rounding: over three steps in a row
a mere permutation of the batch on one device moved parameters by 2e-3 of their
update on some machines (tests/test_dann.py), so DANN is judged step by step.
"""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from functools import partial  # noqa: E402

import jaxtl  # noqa: E402
from jaxtl.data.augment import train_augment  # noqa: E402
from jaxtl.optim import OptimConfig, make_optimizer, plateau_init  # noqa: E402
from jaxtl.strategies import Strategy, all_labels, label_tree, split_variables, trainable_labels  # noqa: E402
from jaxtl.training.parallel import AXIS, DataParallel  # noqa: E402
from jaxtl.training.state import create_train_state  # noqa: E402
from jaxtl.training.step import image_forward, make_train_step  # noqa: E402
from jaxtl.training.dann import DOMAIN_KEY, ganin_lambda, init_domain_classifier, make_dann_step  # noqa: E402
import jax.numpy as jnp  # noqa: E402

DANN = "--dann" in sys.argv
TOTAL_STEPS = 4  # DANN's lambda over the three steps: 0, 0.85, 0.99

assert jax.device_count() == 4, jax.devices()
NAME = "efficientnet_b0"
# Classifier dropout and stochastic depth. Half the depth (10 blocks, 3 of them residual, where stochastic depth
# acts) compiles in two thirds of the full B0's time and keeps every draw and the BatchNorm sync under test.
DROP = {"drop_rate": 0.3, "drop_path_rate": 0.3, "depth_mult": 0.5}
spec = jaxtl.get_spec(NAME)
model = jaxtl.create_model(NAME, num_classes=4, axis_name=AXIS, **DROP)
variables = jaxtl.init_variables(jaxtl.create_model(NAME, num_classes=4, **DROP), spec, 0)
# The plain step is compared over three steps in a row, at 64 px: at 32 px (BatchNorm over 16
# values on the last stages' 1x1 maps) a rounding difference grew 3-4 times per step at lr 0.01
# (2.8e-5 -> 3.3e-4 of the movement) and 2.5e-5 -> 7e-3 at lr 0.05. DANN is judged step by step.
pre = spec.preprocessing.at_size(32 if DANN else 64)
strategy = Strategy("finetune", freeze_until="stem")   # DANN trains finetune's groups and its domain classifier
extra_keys = (DOMAIN_KEY,) if DANN else ()
# At lr 0.05 the steps diverge on these random images, and diverging dynamics amplify
# summation-order rounding (1e-7) to 1e-2: compare at a stable lr.
cfg = OptimConfig(opt="sgd", lr=0.01, momentum=0.9, weight_decay=1e-4, sched="cosine")
if DANN:
    variables = {"params": {**variables["params"], DOMAIN_KEY: init_domain_classifier(spec.num_features, 0)},
                 "batch_stats": variables["batch_stats"]}
labels = trainable_labels(label_tree(spec, variables["params"], strategy.frozen_groups(spec), extra_keys=extra_keys))
trainable, frozen = split_variables(spec, variables, strategy.frozen_groups(spec), extra_keys)
tx = make_optimizer(cfg, labels, strategy.lr_multipliers(spec), all_labels(spec), 10, 1)
prepare = partial(train_augment, pre=pre, jitter=(0.4, 0.4, 0.4, 0.1))
if DANN:
    # The features (stochastic depth on) go through the model interleaved; the head's dropout is the step's own.
    step = make_dann_step(model, tx, frozen=strategy.frozen_groups(spec), head_path=spec.head_path, num_classes=4,
                          prepare=prepare, total_steps=TOTAL_STEPS, drop_rate=DROP["drop_rate"], axis_name=AXIS)
else:
    step = make_train_step(image_forward(model, frozen=strategy.frozen_groups(spec), prepare=prepare), tx,
                           num_classes=4, axis_name=AXIS)
rng = np.random.default_rng(0)
size = pre.resize_size   # what the host ships; the augmentation crops pre.input_size out of it
batches = [{"image": rng.integers(0, 256, (16, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, 4, 16).astype(np.int32), "weight": np.ones(16, np.float32)} for _ in range(3)]
if DANN:
    for b in batches:
        # A brighter target domain: drawn like the source, the two domains cannot be told apart, and the
        # reversed domain gradient is a near-cancelling sum whose rounding moved whole updates by 5e-4.
        b["target_image"] = rng.integers(128, 256, (16, size, size, 3), dtype=np.uint8)
        b["target_weight"] = np.ones(16, np.float32)


def trajectory(dp, mapped, state):
    """(state, loss) after each batch, starting from ``state``."""
    out = []
    for b in batches:
        state, m = mapped(dp.replicate(state), dp.replicate(frozen), dp.put_batch(b))
        out.append((state, float(m["loss_sum"])))
    return out


def update_rel(new, ref_new, before) -> float:
    """|new - ref_new| / |ref_new - before| over the whole tree (2-norms, float64)."""
    leaves = zip(*(jax.tree.leaves(jax.device_get(t)) for t in (new, ref_new, before)))
    diff = move = 0.0
    for x, y, z in leaves:
        x, y, z = (np.asarray(t, np.float64) for t in (x, y, z))
        diff += float(np.sum((x - y) ** 2))
        move += float(np.sum((y - z) ** 2))
    return float(np.sqrt(diff / max(move, 1e-300)))


one = DataParallel("shard_map", jax.devices()[:1])
start = create_train_state(trainable, tx, 0, plateau_init(cfg))
ref = trajectory(one, one.train_step(step, donate=False), start)
befores = [start] + [s for s, _ in ref[:-1]]
out = {}
for name, dp in (("shard_map_4", DataParallel("shard_map")), ("pmap_4", DataParallel("pmap"))):
    mapped = dp.train_step(step, donate=False)
    run = trajectory(dp, mapped, start)
    params_rel, stats_rel, step_loss_rel = [], [], []
    for before, b, (ref_state, ref_loss) in zip(befores, batches, ref):
        new, m = mapped(dp.replicate(before), dp.replicate(frozen), dp.put_batch(b))
        loss = float(m["loss_sum"])
        params_rel.append(update_rel(new.params, ref_state.params, before.params))
        stats_rel.append(update_rel(new.batch_stats, ref_state.batch_stats, before.batch_stats))
        step_loss_rel.append(abs(loss - ref_loss) / abs(ref_loss))
    final, ref_final = run[-1][0], ref[-1][0]
    out[name] = {
        "trajectory": {"params_rel": update_rel(final.params, ref_final.params, start.params),
                       "stats_rel": update_rel(final.batch_stats, ref_final.batch_stats, start.batch_stats),
                       "loss_rel": max(abs(a[1] - b[1]) / abs(b[1]) for a, b in zip(run, ref))},
        "one_step": {"params_update_rel": max(params_rel), "stats_update_rel": max(stats_rel),
                     "loss_rel": max(step_loss_rel)},
        "one_step_params_update_rel_per_step": params_rel,
    }
out["changed"] = max(float(np.abs(np.asarray(a) - b).max()) for a, b in
                     zip(jax.tree.leaves(jax.device_get(ref[-1][0].params)), jax.tree.leaves(trainable["params"])))
if DANN:
    out["lambda_per_step"] = [float(jax.device_get(ganin_lambda(jnp.float32(i) / TOTAL_STEPS)))
                              for i in range(len(batches))]
print(json.dumps(out))
