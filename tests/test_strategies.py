"""Transfer strategies: label trees, multipliers, frozen-means-frozen, progressive stages, schedules."""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.core import freeze

import jaxtl
from jaxtl.errors import ConfigError
from jaxtl.models import abstract_variables
from jaxtl.optim import (OptimConfig, carry_over, count_state_bytes, make_optimizer, make_schedule, plateau_init,
                         plateau_update)
from jaxtl.strategies import (FROZEN, Strategy, all_labels, check_label_tree, label_tree, split_variables,
                              trainable_labels)
from jaxtl.training.state import create_train_state, merge
from jaxtl.training.step import cross_entropy, image_forward, make_train_step

NAME = "resnet18"
NUM_CLASSES = 5


def prepare(key, images):
    return images  # tests feed float images directly


@lru_cache(maxsize=None)
def setup():
    spec = jaxtl.get_spec(NAME)
    model = jaxtl.create_model(NAME, num_classes=NUM_CLASSES)
    variables = jaxtl.init_variables(model, spec, 0)
    # Non-trivial running statistics so "unchanged" is a real claim.
    variables = {"params": variables["params"],
                 "batch_stats": jax.tree.map(lambda x: x + 0.1, variables["batch_stats"])}
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.standard_normal((8, 32, 32, 3)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, NUM_CLASSES, 8), jnp.int32), "weight": jnp.ones(8)}
    return spec, model, variables, batch


def build(strategy: Strategy, cfg: OptimConfig, epoch: int = 0, steps_per_epoch: int = 10, num_epochs: int = 5):
    """(frozen groups, label tree of what trains, optimizer, jitted step) of one strategy stage."""
    spec, model, variables, _ = setup()
    frozen = strategy.frozen_groups(spec, epoch)
    labels = trainable_labels(label_tree(spec, variables["params"], frozen))
    tx = make_optimizer(cfg, labels, strategy.lr_multipliers(spec), all_labels(spec), steps_per_epoch, num_epochs)
    forward = image_forward(model, frozen=frozen, prepare=prepare)
    step = jax.jit(make_train_step(forward, tx, num_classes=NUM_CLASSES))
    return frozen, labels, tx, step


def start(frozen_groups, tx, cfg: OptimConfig, variables=None):
    """(first train state, frozen variables): the state holds only what trains."""
    spec, _, initial, _ = setup()
    trainable, constants = split_variables(spec, initial if variables is None else variables, frozen_groups)
    return create_train_state(trainable, tx, 0, plateau_init(cfg)), constants


def by_group(tree, spec):
    out = {}
    for path, leaf in traverse_util.flatten_dict(tree).items():
        out.setdefault(spec.group_of(path), []).append(np.asarray(leaf))
    return out


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


# --- label trees -------------------------------------------------------------------


@pytest.mark.parametrize("name", jaxtl.list_models())
def test_label_trees_match_params_for_every_backbone_and_strategy(name):
    spec = jaxtl.get_spec(name)
    model = jaxtl.create_model(name, num_classes=3)
    params = abstract_variables(model, spec)["params"]
    partly_frozen = Strategy("finetune", freeze_until=spec.group_names[1])
    strategies = [Strategy("feature_extract"), Strategy("finetune"), partly_frozen, Strategy("progressive")]
    for strategy in strategies:
        for stage in strategy.stages(spec, len(spec.group_names) + 1):
            labels = label_tree(spec, params, stage.frozen)
            check_label_tree(labels, params)
            flat = traverse_util.flatten_dict(labels)
            assert {spec.group_of(p) for p, lab in flat.items() if lab == FROZEN} == set(stage.frozen)
        check_label_tree(labels, freeze(params))  # FrozenDict vs dict is not a mismatch
        if strategy is partly_frozen:
            # optax accepts a tree with frozen and trained groups (structure checked by tracing init); the
            # other strategies' trees have the same structure, and tracing a large model's init takes seconds
            tx = make_optimizer(OptimConfig(opt="adam"), labels, strategy.lr_multipliers(spec), all_labels(spec),
                                1, 1)
            jax.eval_shape(tx.init, params)


def test_label_tree_mismatch_names_the_path():
    spec, _, variables, _ = setup()
    labels = traverse_util.flatten_dict(label_tree(spec, variables["params"], ()))
    del labels[("layer3_1", "bn2", "scale")]
    with pytest.raises(ConfigError, match="no label for parameter layer3_1/bn2/scale"):
        check_label_tree(traverse_util.unflatten_dict(labels), variables["params"])
    labels[("layer3_1", "bn2", "scale")] = "layer3"
    labels[("extra", "kernel")] = "head"
    with pytest.raises(ConfigError, match="labels extra/kernel, which is not a parameter"):
        check_label_tree(traverse_util.unflatten_dict(labels), variables["params"])


def test_weight_decay_never_on_norms_or_biases():
    spec, _, variables, _ = setup()
    flat = traverse_util.flatten_dict(label_tree(spec, variables["params"], ()))
    for path, label in flat.items():
        assert label.endswith("/no_decay") == (path[-1] != "kernel"), path


def test_vit_tokens_and_embeddings_are_not_decayed():
    names = jaxtl.list_models("vit_*")
    if not names:
        pytest.skip("no ViT registered")
    spec = jaxtl.get_spec(names[0])
    params = abstract_variables(jaxtl.create_model(names[0], num_classes=3), spec)["params"]
    flat = traverse_util.flatten_dict(label_tree(spec, params, ()))
    token_like = [p for p in flat if any(s in p[-1] for s in ("cls", "pos", "token"))]
    assert token_like and all(flat[p].endswith("/no_decay") for p in token_like)


# --- which groups train when ---------------------------------------------------------


def test_feature_extract_and_finetune_groups():
    spec = jaxtl.get_spec(NAME)
    assert Strategy("feature_extract").trainable_groups(spec) == ("head",)
    assert Strategy("finetune").trainable_groups(spec) == spec.group_names
    assert Strategy("finetune", freeze_until="layer2").frozen_groups(spec) == ("stem", "layer1", "layer2")
    with pytest.raises(ConfigError, match="not a backbone group.*layer4"):
        Strategy("finetune", freeze_until="layer9").frozen_groups(spec)


def test_progressive_unfreezes_top_down_on_schedule():
    spec = jaxtl.get_spec(NAME)
    s = Strategy("progressive", unfreeze_every=2)
    expected = {0: ("head",), 1: ("head",), 2: ("layer4", "head"), 3: ("layer4", "head"),
                4: ("layer3", "layer4", "head"), 9: ("layer1", "layer2", "layer3", "layer4", "head"),
                10: ("stem", "layer1", "layer2", "layer3", "layer4", "head")}
    for epoch, groups in expected.items():
        assert s.trainable_groups(spec, epoch) == groups, epoch
    stages = s.stages(spec, 7)
    assert [(st.start_epoch, st.end_epoch) for st in stages] == [(0, 2), (2, 4), (4, 6), (6, 7)]
    explicit = Strategy("progressive", unfreeze_at=((1, "layer4"), (3, "layer2")))
    assert explicit.trainable_groups(spec, 0) == ("head",)
    assert explicit.trainable_groups(spec, 3) == ("layer2", "layer4", "head")
    floor = Strategy("progressive", unfreeze_every=1, freeze_until="layer2")
    assert floor.trainable_groups(spec, 99) == ("layer3", "layer4", "head")
    with pytest.raises(ConfigError, match="not an unfreezable backbone group"):
        Strategy("progressive", unfreeze_at=((1, "head"),)).trainable_groups(spec, 0)


# --- learning-rate multipliers -------------------------------------------------------------


def test_multipliers():
    spec = jaxtl.get_spec(NAME)  # stem, layer1..4, head
    assert Strategy("finetune").lr_multipliers(spec) == {**{g: 0.1 for g in spec.group_names[:-1]}, "head": 1.0,
                                                         "domain": 1.0}
    decay = Strategy("finetune", layer_decay=0.5).lr_multipliers(spec)
    assert decay == {"stem": 0.0625, "layer1": 0.125, "layer2": 0.25, "layer3": 0.5, "layer4": 1.0, "head": 1.0,
                     "domain": 1.0}
    spread = Strategy("finetune", lr_spread=0.01).lr_multipliers(spec)
    assert spread["stem"] == pytest.approx(0.01) and spread["head"] == 1.0
    ratios = [spread[b] / spread[a] for a, b in zip(spec.group_names, spec.group_names[1:])]
    assert np.allclose(ratios, ratios[0])  # geometric
    explicit = Strategy("finetune", lr_mults={"layer4": 0.5, "head": 2.0}).lr_multipliers(spec)
    assert explicit["layer4"] == 0.5 and explicit["head"] == 2.0 and explicit["stem"] == 0.1
    with pytest.raises(ConfigError, match="unknown group"):
        Strategy("finetune", lr_mults={"layer7": 1.0}).lr_multipliers(spec)
    with pytest.raises(ConfigError, match="at most one"):
        Strategy("finetune", layer_decay=0.7, lr_spread=0.1)


def test_vit_layer_decay_matches_timm():
    """timm: block i gets decay**(depth - i), the embedding decay**(depth + 1), norm and head 1."""
    names = jaxtl.list_models("vit_tiny*")
    if not names:
        pytest.skip("no ViT registered")
    spec = jaxtl.get_spec(names[0])
    mults = Strategy("finetune", layer_decay=0.75).lr_multipliers(spec)
    depth = sum(g.startswith("block") for g in spec.group_names)
    assert mults["head"] == mults["norm"] == 1.0
    assert mults["block0"] == pytest.approx(0.75 ** depth)
    assert mults[f"block{depth - 1}"] == pytest.approx(0.75)
    assert mults["embed"] == pytest.approx(0.75 ** (depth + 1))


@lru_cache(maxsize=None)
def plain_gradients() -> dict:
    """The loss gradient of every parameter on setup()'s batch, written out without jaxtl's step."""
    _, model, variables, batch = setup()

    def loss_fn(params):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, batch["image"],
                                train=True, mutable=["batch_stats"])
        return jnp.mean(cross_entropy(logits, batch["label"], NUM_CLASSES))

    return traverse_util.flatten_dict(jax.jit(jax.grad(loss_fn))(variables["params"]))


@pytest.mark.parametrize("strategy", [Strategy("finetune", backbone_lr_mult=0.1),
                                      Strategy("finetune", layer_decay=0.5),
                                      Strategy("finetune", lr_mults={"stem": 0.3, "layer2": 0.0, "head": 2.0})])
def test_one_sgd_step_is_lr_times_multiplier_times_gradient(strategy):
    spec, model, variables, batch = setup()
    lr = 0.05
    cfg = OptimConfig(opt="sgd", lr=lr, momentum=0.0, sched="constant")
    frozen, labels, tx, step = build(strategy, cfg)
    state, constants = start(frozen, tx, cfg)
    new, _ = step(state, constants, batch)
    grads = plain_gradients()
    before = traverse_util.flatten_dict(variables["params"])
    after = traverse_util.flatten_dict(new.params)
    mults = strategy.lr_multipliers(spec)
    for path, g in grads.items():
        expected = -lr * mults[spec.group_of(path)] * np.asarray(g)
        got = np.asarray(after[path]) - np.asarray(before[path])
        # after - before loses digits to the parameter's own float32 rounding.
        ulp = 4 * np.finfo(np.float32).eps * np.abs(np.asarray(before[path])).max()
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=ulp, err_msg="/".join(path))


# --- frozen means frozen ----------------------------------------------------------------


@pytest.mark.parametrize("strategy", [Strategy("feature_extract"), Strategy("finetune", freeze_until="layer2")])
def test_the_state_holds_what_trains_and_the_frozen_groups_stay_bit_identical(strategy):
    spec, _, variables, batch = setup()
    cfg = OptimConfig(opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
    frozen, _, tx, step = build(strategy, cfg)
    state, constants = start(frozen, tx, cfg)
    # the state is what trains: the trainable groups' parameters and statistics, nothing frozen
    assert set(by_group(state.params, spec)) == set(strategy.trainable_groups(spec))
    assert set(by_group(constants["params"], spec)) == set(frozen)
    assert set(by_group(state.batch_stats, spec)) | set(by_group(constants["batch_stats"], spec)) \
        == set(by_group(variables["batch_stats"], spec))
    for i in range(3):
        state, metrics = step(state, constants, {**batch, "label": (batch["label"] + i) % NUM_CLASSES})
        assert bool(metrics["finite"])
    model_after = merge(constants, state.variables)  # what the model runs with after the steps
    p0, p1 = by_group(variables["params"], spec), by_group(model_after["params"], spec)
    s0, s1 = by_group(variables["batch_stats"], spec), by_group(model_after["batch_stats"], spec)
    for group in spec.group_names:
        if group in frozen:
            assert same(p0[group], p1[group]), f"params of frozen {group} changed"
            if group in s0:
                assert same(s0[group], s1[group]), f"batch_stats of frozen {group} changed"
        else:
            assert not same(p0[group], p1[group]), f"params of trainable {group} did not change"
            if group in s0:
                assert not same(s0[group], s1[group]), f"batch_stats of trainable {group} did not change"


def test_the_frozen_step_matches_the_whole_model_step_with_stopped_gradients():
    """Frozen groups as constants compute what a step over the whole tree with zero updates for frozen
    leaves computes (the formulation before the split): same trainable parameters, statistics, loss."""
    spec, model, variables, batch = setup()
    strategy = Strategy("finetune", freeze_until="layer2")
    cfg = OptimConfig(opt="adam", lr=1e-3, weight_decay=1e-4, clip_grad_norm=1.0)
    frozen, labels, tx, step = build(strategy, cfg)
    state, constants = start(frozen, tx, cfg)
    whole_labels = label_tree(spec, variables["params"], frozen)
    whole_tx = make_optimizer(cfg, whole_labels, strategy.lr_multipliers(spec), all_labels(spec), 10, 5)
    trains = jax.tree.map(lambda label: label != FROZEN, whole_labels)

    @jax.jit
    def whole_step(params, batch_stats, opt_state, batch):
        def loss_fn(p):
            p = jax.tree.map(lambda x, t: x if t else jax.lax.stop_gradient(x), p, trains)
            logits, upd = model.apply({"params": p, "batch_stats": batch_stats}, batch["image"], train=True,
                                      frozen=frozen, mutable=["batch_stats"])
            return jnp.mean(cross_entropy(logits, batch["label"], NUM_CLASSES)), upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = whole_tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), stats, opt_state, loss

    params, stats, opt_state = variables["params"], variables["batch_stats"], whole_tx.init(variables["params"])
    for i in range(2):
        b = {**batch, "label": (batch["label"] + i) % NUM_CLASSES}
        params, stats, opt_state, loss = whole_step(params, stats, opt_state, b)
        state, metrics = step(state, constants, b)
        np.testing.assert_allclose(float(metrics["loss_sum"]) / 8, float(loss), rtol=1e-6)
    got = traverse_util.flatten_dict(merge(constants, state.variables))
    want = traverse_util.flatten_dict({"params": params, "batch_stats": stats})
    assert got.keys() == want.keys()
    for path, value in want.items():
        np.testing.assert_allclose(np.asarray(got[path]), np.asarray(value), rtol=1e-5, atol=1e-7,
                                   err_msg="/".join(path))


def test_frozen_groups_hold_no_optimizer_state():
    spec, _, variables, _ = setup()
    params = variables["params"]
    nbytes = {g: sum(a.nbytes for a in leaves) for g, leaves in by_group(params, spec).items()}
    cfg = OptimConfig(opt="adam")  # two moments per trainable parameter
    results = {}
    for strategy in (Strategy("feature_extract"), Strategy("finetune", freeze_until="layer3"), Strategy("finetune")):
        frozen = strategy.frozen_groups(spec)
        labels = trainable_labels(label_tree(spec, params, frozen))
        tx = make_optimizer(cfg, labels, strategy.lr_multipliers(spec), all_labels(spec), 1, 1)
        trainable, _ = split_variables(spec, variables, frozen)
        n_leaves, n_bytes = count_state_bytes(tx.init(trainable["params"]))
        trainable_bytes = sum(b for g, b in nbytes.items() if g not in frozen)
        counts = n_bytes - 2 * trainable_bytes  # what is left are scalar step counts
        assert 0 <= counts < 1024, (strategy.kind, n_bytes, trainable_bytes)
        results[strategy.kind + str(strategy.freeze_until)] = n_bytes
    assert results["feature_extractNone"] < results["finetunelayer3"] < results["finetuneNone"]


# --- progressive: state carried across stages -----------------------------------------------


def test_progressive_carries_optimizer_state_and_starts_new_groups_fresh():
    spec, _, variables, batch = setup()
    strategy = Strategy("progressive", unfreeze_every=1)
    cfg = OptimConfig(opt="sgd", lr=0.1, momentum=0.9, sched="cosine", warmup_epochs=1)
    frozen0, labels0, tx0, step0 = build(strategy, cfg, epoch=0)
    state, constants0 = start(frozen0, tx0, cfg)
    for _ in range(2):
        state, _ = step0(state, constants0, batch)
    frozen1, labels1, tx1, step1 = build(strategy, cfg, epoch=1)
    assert set(frozen0) - set(frozen1) == {"layer4"}
    # layer4 moves from the constants into the state, with its (unchanged) starting values
    trainable1, constants1 = split_variables(spec, merge(constants0, state.variables), frozen1)
    carried = carry_over(state.opt_state, tx1.init(trainable1["params"]), labels0, labels1)

    partition = lambda st: next(x for x in st if isinstance(x, optax.PartitionState))  # noqa: E731
    count = lambda st: next(x for x in st if isinstance(x, optax.ScaleByScheduleState)).count  # noqa: E731
    old_inner, new_inner = partition(state.opt_state).inner_states, partition(carried).inner_states
    carried_head = []
    for label in ("head", "head/no_decay"):  # momentum of the head carried over bit for bit
        old_leaves, new_leaves = jax.tree.leaves(old_inner[label]), jax.tree.leaves(new_inner[label])
        assert old_leaves and len(old_leaves) == len(new_leaves)
        assert all(np.array_equal(a, b) for a, b in zip(old_leaves, new_leaves))
        carried_head += new_leaves
    assert any(np.asarray(x).any() for x in carried_head)  # a real momentum, not zeros either way
    layer4 = [np.asarray(x) for x in jax.tree.leaves(new_inner["layer4"])]
    assert layer4 and all(not x.any() for x in layer4)  # fresh momentum for the newly unfrozen group
    assert int(count(carried)) == int(count(state.opt_state)) == 2  # the schedule's global count goes on

    state = state.replace(params=trainable1["params"], batch_stats=trainable1["batch_stats"], opt_state=carried)
    new, _ = step1(state, constants1, batch)
    p0, p1 = by_group(state.params, spec), by_group(new.params, spec)
    assert not same(p0["layer4"], p1["layer4"]) and "layer3" not in p1


# --- schedules, plateau, clipping, accumulation ---------------------------------------------


def test_schedules():
    spe, epochs = 10, 10
    cos = make_schedule(OptimConfig(lr=1.0, sched="cosine", warmup_epochs=2), spe, epochs)
    assert float(cos(0)) == 0.0 and float(cos(10)) == pytest.approx(0.5) and float(cos(20)) == pytest.approx(1.0)
    assert float(cos(60)) == pytest.approx(0.5, abs=1e-6) and float(cos(100)) == pytest.approx(0.0, abs=1e-6)
    step = make_schedule(OptimConfig(lr=1.0, sched="step", step_epochs=3, gamma=0.1), spe, epochs)
    assert [round(float(step(e * spe)), 6) for e in (0, 2, 3, 6, 9)] == [1.0, 1.0, 0.1, 0.01, 0.001]
    multi = make_schedule(OptimConfig(lr=1.0, sched="multistep", milestones=(4, 7), gamma=0.5), spe, epochs)
    assert [float(multi(e * spe)) for e in (3, 4, 6, 7)] == [1.0, 0.5, 0.5, 0.25]
    sgdr = make_schedule(OptimConfig(lr=1.0, sched="sgdr", sgdr_period=2), spe, epochs)
    assert float(sgdr(0)) == 1.0 and float(sgdr(19)) < 0.01 and float(sgdr(20)) == pytest.approx(1.0)
    assert float(make_schedule(OptimConfig(lr=0.3, sched="constant"), spe, epochs)(77)) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="unknown schedule 'linear'"):
        OptimConfig(sched="linear")
    with pytest.raises(ConfigError, match="unknown optimizer 'lamb'"):
        OptimConfig(opt="lamb")


def test_reduce_on_plateau_fed_once_per_epoch():
    cfg = OptimConfig(sched="plateau", plateau_patience=2, plateau_factor=0.5)
    state = plateau_init(cfg)
    scales = []
    for val_loss in (1.0, 0.9, 0.95, 0.95, 0.95, 0.95, 0.95):
        state = plateau_update(cfg, state, val_loss)
        scales.append(float(state.scale))
    assert scales[:3] == [1.0, 1.0, 1.0] and scales[-1] < 1.0 and min(scales) >= cfg.plateau_min_scale


def test_gradient_clipping_bounds_the_update():
    spec, _, variables, batch = setup()
    cfg = OptimConfig(opt="sgd", lr=1.0, momentum=0.0, sched="constant", clip_grad_norm=0.01)
    frozen, _, tx, step = build(Strategy("finetune", backbone_lr_mult=1.0), cfg)
    state, constants = start(frozen, tx, cfg)
    new, metrics = step(state, constants, batch)
    assert float(metrics["grad_norm"]) > 0.01
    delta = jax.tree.map(lambda a, b: a - b, new.params, state.params)
    assert float(optax.tree.norm(delta)) == pytest.approx(0.01, rel=1e-4)


def test_gradient_accumulation_equals_the_big_batch():
    """Feature extraction (BatchNorm on running stats): two half batches accumulated = one full batch."""
    spec, _, variables, batch = setup()
    big = OptimConfig(opt="sgd", lr=0.1, momentum=0.9, sched="constant")
    acc = OptimConfig(opt="sgd", lr=0.1, momentum=0.9, sched="constant", accum_steps=2)
    frozen, _, tx_big, step_big = build(Strategy("feature_extract"), big)
    _, _, tx_acc, step_acc = build(Strategy("feature_extract"), acc, steps_per_epoch=20)
    s_big, constants = start(frozen, tx_big, big)
    s_big, _ = step_big(s_big, constants, batch)
    s_acc, _ = start(frozen, tx_acc, acc)
    start_params = jax.tree.map(np.array, s_acc.params)
    half = lambda sl: {k: v[sl] for k, v in batch.items()}  # noqa: E731
    s_acc, _ = step_acc(s_acc, constants, half(slice(0, 4)))
    mid = s_acc.params
    s_acc, _ = step_acc(s_acc, constants, half(slice(4, 8)))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), mid, start_params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s_acc.params, s_big.params)


def test_an_epoch_in_one_call_equals_its_steps_one_by_one():
    """Cached features: the trainer runs an epoch as one call (``scan_steps``); it is the same steps."""
    from jaxtl.training.parallel import AXIS, DataParallel
    from jaxtl.training.step import TRAIN_METRICS, head_forward, pack_metrics, scan_steps, unpack_metrics

    rng = np.random.default_rng(0)
    steps, batch, features = 5, 8, 16
    params = {"fc": {"kernel": jnp.asarray(rng.standard_normal((features, NUM_CLASSES)), jnp.float32),
                     "bias": jnp.zeros(NUM_CLASSES, jnp.float32)}}
    labels = {"fc": {"kernel": "head", "bias": "head/no_decay"}}
    cfg = OptimConfig(opt="adam", lr=1e-2, weight_decay=1e-3, sched="cosine")
    spec = jaxtl.get_spec(NAME)
    tx = make_optimizer(cfg, labels, Strategy("feature_extract").lr_multipliers(spec), all_labels(spec), steps, 2)
    step = pack_metrics(make_train_step(head_forward(("fc",), drop_rate=0.5), tx, num_classes=NUM_CLASSES,
                                        label_smoothing=0.1, axis_name=AXIS), TRAIN_METRICS)
    batches = [{"image": rng.standard_normal((batch, features)).astype(np.float32),
                "label": rng.integers(0, NUM_CLASSES, batch).astype(np.int32),
                "weight": (rng.random(batch) > 0.2).astype(np.float32)} for _ in range(steps)]
    dp = DataParallel("shard_map", jax.devices()[:1])
    frozen = dp.replicate({"params": {}, "batch_stats": {}})
    first = lambda: dp.replicate(create_train_state({"params": jax.tree.map(jnp.copy, params),  # noqa: E731
                                                     "batch_stats": {}}, tx, 0, plateau_init(cfg)))
    one_by_one, state = [], first()
    mapped = dp.train_step(step)
    for b in batches:
        state, m = mapped(state, frozen, dp.put_batch(b))
        one_by_one.append(unpack_metrics(np.asarray(m), TRAIN_METRICS))
    stacked_batches = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
    epoch_state, stacked = dp.train_step(scan_steps(step), stacked=True)(first(), frozen,
                                                                         dp.put_batches(stacked_batches))
    stacked = unpack_metrics(np.asarray(stacked), TRAIN_METRICS)
    assert int(epoch_state.step) == int(state.step) == steps
    for k in TRAIN_METRICS:
        np.testing.assert_allclose(stacked[k], [m[k] for m in one_by_one], rtol=1e-6, err_msg=k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), epoch_state.params, state.params)
    assert not np.array_equal(np.asarray(epoch_state.params["fc"]["kernel"]), params["fc"]["kernel"])
