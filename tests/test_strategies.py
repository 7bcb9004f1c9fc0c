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
from jaxtl.strategies import FROZEN, Strategy, all_labels, check_label_tree, label_tree, trainable_mask
from jaxtl.training.state import create_train_state
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
    spec, model, variables, _ = setup()
    frozen = strategy.frozen_groups(spec, epoch)
    labels = label_tree(spec, variables["params"], frozen)
    tx = make_optimizer(cfg, labels, strategy.lr_multipliers(spec), all_labels(spec), steps_per_epoch, num_epochs)
    forward = image_forward(model, frozen=frozen, prepare=prepare)
    step = jax.jit(make_train_step(forward, tx, trainable=trainable_mask(labels), num_classes=NUM_CLASSES))
    return frozen, labels, tx, step


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
    strategies = [Strategy("feature_extract"), Strategy("finetune"),
                  Strategy("finetune", freeze_until=spec.group_names[1]), Strategy("progressive")]
    for strategy in strategies:
        for stage in strategy.stages(spec, len(spec.group_names) + 1):
            labels = label_tree(spec, params, stage.frozen)
            check_label_tree(labels, params)
            flat = traverse_util.flatten_dict(labels)
            assert {spec.group_of(p) for p, lab in flat.items() if lab == FROZEN} == set(stage.frozen)
        check_label_tree(labels, freeze(params))  # FrozenDict vs dict is not a mismatch
        # optax accepts the last stage's tree (structure checked by tracing init)
        tx = make_optimizer(OptimConfig(opt="adam"), labels, strategy.lr_multipliers(spec), all_labels(spec), 1, 1)
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
    _, labels, tx, step = build(strategy, cfg)
    state = create_train_state(variables, tx, 0, plateau_init(cfg))
    new, _ = step(state, batch)
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
def test_frozen_groups_are_bit_identical_after_several_steps(strategy):
    spec, _, variables, batch = setup()
    cfg = OptimConfig(opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3)
    frozen, _, tx, step = build(strategy, cfg)
    state = create_train_state(variables, tx, 0, plateau_init(cfg))
    for i in range(3):
        state, metrics = step(state, {**batch, "label": (batch["label"] + i) % NUM_CLASSES})
        assert bool(metrics["finite"])
    p0, p1 = by_group(variables["params"], spec), by_group(state.params, spec)
    s0, s1 = by_group(variables["batch_stats"], spec), by_group(state.batch_stats, spec)
    for group in spec.group_names:
        if group in frozen:
            assert same(p0[group], p1[group]), f"params of frozen {group} changed"
            if group in s0:
                assert same(s0[group], s1[group]), f"batch_stats of frozen {group} changed"
        else:
            assert not same(p0[group], p1[group]), f"params of trainable {group} did not change"
            if group in s0:
                assert not same(s0[group], s1[group]), f"batch_stats of trainable {group} did not change"


def test_frozen_groups_hold_no_optimizer_state():
    spec, _, variables, _ = setup()
    params = variables["params"]
    nbytes = {g: sum(a.nbytes for a in leaves) for g, leaves in by_group(params, spec).items()}
    cfg = OptimConfig(opt="adam")  # two moments per trainable parameter
    results = {}
    for strategy in (Strategy("feature_extract"), Strategy("finetune", freeze_until="layer3"), Strategy("finetune")):
        frozen = strategy.frozen_groups(spec)
        labels = label_tree(spec, params, frozen)
        tx = make_optimizer(cfg, labels, strategy.lr_multipliers(spec), all_labels(spec), 1, 1)
        n_leaves, n_bytes = count_state_bytes(tx.init(params))
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
    state = create_train_state(variables, tx0, 0, plateau_init(cfg))
    for _ in range(2):
        state, _ = step0(state, batch)
    frozen1, labels1, tx1, step1 = build(strategy, cfg, epoch=1)
    assert set(frozen0) - set(frozen1) == {"layer4"}
    carried = carry_over(state.opt_state, tx1.init(state.params), labels0, labels1)

    partition = lambda st: next(x for x in st if isinstance(x, optax.PartitionState))  # noqa: E731
    count = lambda st: next(x for x in st if isinstance(x, optax.ScaleByScheduleState)).count  # noqa: E731
    old_inner, new_inner = partition(state.opt_state).inner_states, partition(carried).inner_states
    for label in ("head", "head/no_decay"):  # momentum of the head carried over bit for bit
        assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), old_inner[label], new_inner[label]))
    layer4 = [np.asarray(x) for x in jax.tree.leaves(new_inner["layer4"])]
    assert layer4 and all(not x.any() for x in layer4)  # fresh momentum for the newly unfrozen group
    assert int(count(carried)) == int(count(state.opt_state)) == 2  # the schedule's global count goes on

    state = state.replace(opt_state=carried)
    new, _ = step1(state, batch)
    p0, p1 = by_group(state.params, spec), by_group(new.params, spec)
    assert not same(p0["layer4"], p1["layer4"]) and same(p0["layer3"], p1["layer3"])


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
    _, _, tx, step = build(Strategy("finetune", backbone_lr_mult=1.0), cfg)
    state = create_train_state(variables, tx, 0, plateau_init(cfg))
    new, metrics = step(state, batch)
    assert float(metrics["grad_norm"]) > 0.01
    delta = jax.tree.map(lambda a, b: a - b, new.params, state.params)
    assert float(optax.tree.norm(delta)) == pytest.approx(0.01, rel=1e-4)


def test_gradient_accumulation_equals_the_big_batch():
    """Feature extraction (BatchNorm on running stats): two half batches accumulated = one full batch."""
    spec, _, variables, batch = setup()
    big = OptimConfig(opt="sgd", lr=0.1, momentum=0.9, sched="constant")
    acc = OptimConfig(opt="sgd", lr=0.1, momentum=0.9, sched="constant", accum_steps=2)
    _, _, tx_big, step_big = build(Strategy("feature_extract"), big)
    _, _, tx_acc, step_acc = build(Strategy("feature_extract"), acc, steps_per_epoch=20)
    s_big, _ = step_big(create_train_state(variables, tx_big, 0, plateau_init(big)), batch)
    s_acc = create_train_state(variables, tx_acc, 0, plateau_init(acc))
    half = lambda sl: {k: v[sl] for k, v in batch.items()}  # noqa: E731
    s_acc, _ = step_acc(s_acc, half(slice(0, 4)))
    mid = s_acc.params
    s_acc, _ = step_acc(s_acc, half(slice(4, 8)))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), mid, variables["params"]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), s_acc.params, s_big.params)
