"""The timm/fastai recipe: the one-cycle schedule and early stopping do what they say."""

from __future__ import annotations

import json

import numpy as np
import pytest
import optax
from flax import traverse_util

import jaxtl
from jaxtl.optim import OptimConfig, make_schedule
from jaxtl.runtime import NO_COMPILE_CACHE
from jaxtl.training.config import TrainConfig
from jaxtl.training.loop import Trainer, early_stop_reason

SMALL = dict(backbone="resnet18", weights="none", img_size=32, limit_per_class=20, batch_size=16,
             optim=OptimConfig(opt="sgd", lr=0.05), strategy="finetune", progress=False)


def test_onecycle_is_fastais_fit_one_cycle():
    schedule = make_schedule(OptimConfig(sched="onecycle", lr=0.1), steps_per_epoch=10, num_epochs=10)
    lrs = np.array([float(schedule(i)) for i in range(101)])
    assert lrs[0] == pytest.approx(0.1 / 25)
    assert int(np.argmax(lrs)) == 25 and lrs[25] == pytest.approx(0.1)  # the peak after 25 % of the steps
    assert lrs[100] == pytest.approx(0.1 / 1e5, rel=1e-3)
    assert np.all(np.diff(lrs[:26]) > 0) and np.all(np.diff(lrs[25:]) < 0)
    # cosine in both phases, as fastai's SchedCos
    cos_up = 0.1 / 25 + (0.1 - 0.1 / 25) * (1 - np.cos(np.pi * 10 / 25)) / 2
    cos_down = 0.1 / 1e5 + (0.1 - 0.1 / 1e5) * (1 + np.cos(np.pi * 30 / 75)) / 2
    assert lrs[10] == pytest.approx(cos_up, rel=1e-5) and lrs[55] == pytest.approx(cos_down, rel=1e-5)
    warm = make_schedule(OptimConfig(sched="onecycle", lr=0.1, warmup_epochs=1), 10, 10)
    assert float(warm(0)) == 0.0 and float(warm(10)) == pytest.approx(0.1 / 25)


def test_early_stop_reason_counts_epochs_since_the_best():
    rs = [{"epoch": i, "val_loss": v, "val_top1": t} for i, (v, t) in enumerate(
        [(1.0, 0.5), (0.8, 0.6), (0.9, 0.7), (0.85, 0.65)])]
    assert early_stop_reason(rs, 2, "val_loss") is not None and "best 0.8000 after epoch 2" in early_stop_reason(
        rs, 2, "val_loss")
    assert early_stop_reason(rs, 3, "val_loss") is None
    assert early_stop_reason(rs, 1, "val_top1") is not None and early_stop_reason(rs, 2, "val_top1") is None
    assert early_stop_reason(rs, None, "val_loss") is None


def test_early_stopping_stops_when_the_validation_loss_rises_and_exports_the_best(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    monkeypatch.setenv(NO_COMPILE_CACHE, "1")
    # The validation loss the loop sees is scripted (rising after the first epoch), the rest is the real run.
    scripted = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5])
    evaluate = Trainer.evaluate

    def rising(self, variables, loader=None):
        result = evaluate(self, variables, loader)
        if loader is None:
            result["val_loss"] = next(scripted)
        return result

    monkeypatch.setattr(Trainer, "evaluate", rising)
    lines = []
    out = tmp_path / "early"
    result = jaxtl.train(TrainConfig(**SMALL, epochs=6, early_stop=2, output=str(out)), log=lines.append)
    assert [r["epoch"] for r in result.records] == [0, 1, 2]
    said = [line for line in lines if line.startswith("stopping early after epoch 3")]
    assert said and "val_loss has not improved for 2 epochs (best 1.0000 after epoch 1)" in said[0]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["training"]["exported"] == "best" and "val_loss" in meta["training"]["stopped_early"]
    steps_per_epoch = result.records[0]["step"]
    best = ocp.StandardCheckpointer().restore((out / "checkpoints" / str(steps_per_epoch) / "state").resolve())
    exported = traverse_util.flatten_dict(jaxtl.load_model(out)[1])
    for key, value in traverse_util.flatten_dict({"params": best["params"]}).items():
        assert np.array_equal(exported[key], value), key
    # A resume of the stopped run exports again without training.
    again = jaxtl.train(TrainConfig(**SMALL, epochs=6, early_stop=2, output=str(out), resume=True),
                        log=lines.append)
    assert len(again.records) == 3


def test_ece_and_balanced_accuracy_by_hand():
    from jaxtl.training.evaluation import balanced_accuracy, expected_calibration_error

    # Two bins used: 0.95 (2 examples, 1 right) and 0.55 (2 examples, both right).
    confidence, correct = np.array([0.95, 0.95, 0.55, 0.55]), np.array([1, 0, 1, 1])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.5 * 0.45 + 0.5 * 0.45)
    assert expected_calibration_error(np.array([1.0, 1 / 15]), np.array([1, 0])) == pytest.approx(
        0.5 * 0 + 0.5 * (1 / 15))  # the edges fall in the first and last bin
    assert balanced_accuracy(np.array([1.0, 0.5, np.nan])) == pytest.approx(0.75)


def test_evaluate_reports_balanced_accuracy_calibration_and_recall(tmp_path, monkeypatch, capsys):
    from jaxtl.evaluate import main as evaluate

    monkeypatch.setenv(NO_COMPILE_CACHE, "1")
    out = tmp_path / "run"
    jaxtl.train(TrainConfig(backbone="mobilenet_v2", strategy="feature_extract", epochs=2, limit_per_class=10,
                            img_size=32, batch_size=16, output=str(out), progress=False), log=lambda line: None)
    assert evaluate(["--checkpoint", str(out), "--data", "digits", "--json"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    recall = [v for v in got["per_class_top1"].values() if v is not None]
    assert got["balanced_accuracy"] == pytest.approx(np.mean(recall))
    assert 0 <= got["ece"] <= 1 and got["top1"] > 0.15  # above chance (0.1)


# --- Mixup and CutMix -------------------------------------------------------------------------


def _mix_batch(n=8, size=16, classes=5, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.uniform(0, 1, (n, size, size, 3)).astype(np.float32),
            np.eye(classes, dtype=np.float32)[rng.integers(0, classes, n)])


def test_mixed_targets_sum_to_one_and_cutmix_pastes_one_minus_lam_of_the_partner():
    import jax

    from jaxtl.data.mix import MixConfig, draw, mix_images, mix_targets, partner

    images, targets = _mix_batch()
    keys = jax.random.split(jax.random.key(0), 8)
    for cfg in (MixConfig(mixup_alpha=0.8), MixConfig(cutmix_alpha=1.0), MixConfig(0.8, 1.0, prob=0.7)):
        draws = draw(keys, 16, 16, cfg)
        mixed = np.asarray(mix_targets(draws, targets))
        assert np.allclose(mixed.sum(-1), 1.0, atol=1e-6)
        x = np.asarray(mix_images(draws, images))
        other = np.asarray(partner(images))
        for i in np.flatnonzero(np.asarray(draws.cutmix)):  # the pasted box is exactly the partner's share
            from_partner = np.all(x[i] == other[i], -1) & ~np.all(x[i] == images[i], -1)
            assert from_partner.mean() == pytest.approx(1 - float(draws.lam[i]), abs=1e-6)
    draws = draw(keys, 16, 16, MixConfig(0.8, 1.0, prob=0.0))  # nothing mixed: bit for bit
    assert np.array_equal(np.asarray(mix_images(draws, images)), images)
    assert np.array_equal(np.asarray(mix_targets(draws, targets)), targets)


def test_mixup_with_alpha_towards_zero_is_no_mixup():
    """Beta(a, a) with a -> 0 puts lam at 0 or 1: each example is itself or its partner, with the
    partner's label, so the batch loss and gradient are those of no mixing; alpha 0 is mixing off."""
    import jax

    from jaxtl.data.mix import MixConfig
    from jaxtl.optim import plateau_init
    from jaxtl.training.state import create_train_state
    from jaxtl.training.step import image_forward, make_train_step

    class Linear:
        def apply(self, variables, x, **kwargs):
            return x.reshape(x.shape[0], -1) @ variables["params"]["w"], {}

    images, onehot = _mix_batch(size=4)
    batch = {"image": images, "label": onehot.argmax(-1).astype(np.int32), "weight": np.ones(8, np.float32)}
    params = {"w": np.random.default_rng(1).normal(size=(48, 5)).astype(np.float32)}
    tx = optax.sgd(1.0)

    def step_with(mix):
        forward = image_forward(Linear(), frozen=(), prepare=lambda keys, x: x, mix=mix)
        step = jax.jit(make_train_step(forward, tx, num_classes=5, label_smoothing=0.1, mix=mix, mix_size=(4, 4)))
        state = create_train_state({"params": params}, tx, 3, plateau_init(OptimConfig()))
        new, metrics = step(state, {}, batch)
        return np.asarray(new.params["w"]), float(metrics["loss_sum"])

    plain_w, plain_loss = step_with(None)
    tiny_w, tiny_loss = step_with(MixConfig(mixup_alpha=1e-3))
    assert tiny_loss == pytest.approx(plain_loss, rel=1e-3)
    np.testing.assert_allclose(tiny_w, plain_w, atol=1e-3 * np.abs(plain_w - params["w"]).max())
    off_w, off_loss = step_with(MixConfig(mixup_alpha=0.0, cutmix_alpha=0.0))
    assert np.array_equal(off_w, plain_w) and off_loss == plain_loss
    mixed_w, _ = step_with(MixConfig(mixup_alpha=1.0))
    assert not np.allclose(mixed_w, plain_w)  # mixing at alpha 1 does change the step


def test_mixup_cutmix_randaugment_and_erasing_train_together(tmp_path):
    lines = []
    result = jaxtl.train(TrainConfig(**SMALL, epochs=1, mixup=0.2, cutmix=1.0, aa="rand-m9-mstd0.5-inc1",
                                     reprob=0.25, output=str(tmp_path / "mix")), log=lines.append)
    assert np.isfinite(result.final["train_loss"]) and result.final["val_top1"] >= 0
    with pytest.raises(jaxtl.errors.ConfigError, match="add --no-cache-features"):
        TrainConfig(strategy="feature_extract", mixup=0.2).validate()
    with pytest.raises(jaxtl.errors.ConfigError, match="must be even"):
        jaxtl.train(TrainConfig(**{**SMALL, "batch_size": 15}, epochs=1, mixup=0.2, output=str(tmp_path / "odd")),
                    log=lines.append)


# --- EMA of the weights ---------------------------------------------------------------------------


def test_ema_with_decay_zero_is_the_raw_weights_and_both_are_evaluated(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv(NO_COMPILE_CACHE, "1")
    result = jaxtl.train(TrainConfig(**SMALL, epochs=2, model_ema=True, model_ema_decay=0.0, model_ema_warmup=False,
                                     export="ema", output=str(tmp_path / "ema0")), log=lambda line: None)
    raw, ema = jax.device_get(result.state.variables), jax.device_get(result.state.ema)
    for a, b in zip(jax.tree.leaves(raw["params"]), jax.tree.leaves(ema["params"])):
        assert np.array_equal(a, b)
    # The running statistics come out of the forward pass, whose last update XLA fuses once into the
    # state's copy and once into the average's: the two may round apart by float32 rounding.
    for a, b in zip(jax.tree.leaves(raw["batch_stats"]), jax.tree.leaves(ema["batch_stats"])):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6 * np.abs(a).max())
    for r in result.records:
        assert r["ema_val_top1"] == pytest.approx(r["val_top1"], abs=2 / 40)  # an image or two at a boundary
        assert r["ema_val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)
    # With a real decay the average lags the weights, and --export ema exports it.
    result = jaxtl.train(TrainConfig(**SMALL, epochs=2, model_ema=True, model_ema_decay=0.9, export="ema",
                                     output=str(tmp_path / "ema")), log=lambda line: None)
    ema = traverse_util.flatten_dict(jax.device_get(result.state.ema))
    raw = traverse_util.flatten_dict(jax.device_get(result.state.variables))
    assert any(not np.array_equal(ema[k], raw[k]) for k in ema)
    exported = traverse_util.flatten_dict(jaxtl.load_model(tmp_path / "ema")[1])
    assert all(np.array_equal(exported[k], v) for k, v in ema.items())
    assert json.loads((tmp_path / "ema" / "meta.json").read_text())["training"]["exported"] == "ema"
    with pytest.raises(jaxtl.errors.ConfigError, match="add --model-ema"):
        TrainConfig(export="ema").validate()


def test_the_ema_warms_up_like_tensorflows_num_updates():
    import jax.numpy as jnp

    from jaxtl.training.state import EmaConfig

    ema = EmaConfig(decay=0.99, warmup=True)
    first = ema.update({"w": jnp.zeros(())}, {"w": jnp.ones(())}, jnp.asarray(0))["w"]
    assert float(first) == pytest.approx(0.9)  # decay 1/10 at the first update
    late = ema.update({"w": jnp.zeros(())}, {"w": jnp.ones(())}, jnp.asarray(10_000))["w"]
    assert float(late) == pytest.approx(0.01)  # the decay itself once (1 + t) / (10 + t) exceeds it


def test_augmentation_policies_leave_the_other_draws_alone():
    """RandAugment and random erasing draw from keys of their own: switched on with nothing to do
    (probability 0), the crops, flips and jitter are bit for bit those of a run without them."""
    import jax

    from functools import partial

    from jaxtl.data.augment import train_augment
    from jaxtl.data.autoaugment import AutoAugment, auto_augment, random_erasing
    from jaxtl.data.preprocessing import Preprocessing

    pre = Preprocessing(input_size=24, resize_size=28)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 3), dtype=np.uint8)
    key = jax.random.key(3)
    plain = train_augment(key, images, pre, jitter=(0.4, 0.4, 0.4, 0.1))
    idle = train_augment(key, images, pre, jitter=(0.4, 0.4, 0.4, 0.1),
                         auto=partial(auto_augment, aa=AutoAugment("rand", prob=0.0)),
                         erase=partial(random_erasing, prob=0.0))
    busy = train_augment(key, images, pre, jitter=(0.4, 0.4, 0.4, 0.1),
                         auto=partial(auto_augment, aa=AutoAugment("rand", magnitude=9)),
                         erase=partial(random_erasing, prob=1.0))
    assert np.array_equal(np.asarray(plain), np.asarray(idle))
    assert not np.allclose(np.asarray(plain), np.asarray(busy))
    with pytest.raises(jaxtl.errors.ConfigError, match="--aa 'rand-x'"):
        TrainConfig(strategy="finetune", aa="rand-x").validate()
    with pytest.raises(jaxtl.errors.ConfigError, match="would do nothing"):
        TrainConfig(strategy="feature_extract", aa="trivial").validate()


# --- class imbalance ------------------------------------------------------------------------------


def _imbalanced_folder(root, counts=(24, 6)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c, n in enumerate(counts):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_balanced_class_weights_change_the_loss_as_computed_by_hand(tmp_path, monkeypatch):
    import jax

    from jaxtl.optim import plateau_init
    from jaxtl.training.state import create_train_state
    from jaxtl.training.step import cross_entropy, make_train_step

    # The step's loss against the hand-written weighted mean (torch's CrossEntropyLoss(weight=w)).
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    labels = np.array([0, 0, 0, 0, 1, 1], np.int32)
    params = {"w": rng.normal(size=(4, 2)).astype(np.float32)}
    weights = np.array([0.75, 1.5], np.float32)
    forward = lambda v, images, key, axis_name=None: (images @ v["params"]["w"], {})  # noqa: E731
    tx = optax.sgd(0.1)
    state = create_train_state({"params": params}, tx, 0, plateau_init(OptimConfig()))
    batch = {"image": x, "label": labels, "weight": np.ones(6, np.float32)}
    _, weighted = jax.jit(make_train_step(forward, tx, num_classes=2, class_weights=weights))(state, {}, batch)
    _, plain = jax.jit(make_train_step(forward, tx, num_classes=2))(state, {}, batch)
    per_example = np.asarray(cross_entropy(x @ params["w"], labels, 2))
    by_hand = np.sum(weights[labels] * per_example) / np.sum(weights[labels])
    assert float(weighted["loss_sum"]) / 6 == pytest.approx(by_hand, rel=1e-6)
    assert float(plain["loss_sum"]) / 6 == pytest.approx(per_example.mean(), rel=1e-6)
    assert by_hand != pytest.approx(per_example.mean(), rel=1e-3)

    # On an imbalanced folder: weights n / (classes x n_class), and a sampler that evens the classes out.
    monkeypatch.setenv(NO_COMPILE_CACHE, "1")
    folder = _imbalanced_folder(tmp_path / "photos")
    lines = []
    cfg = TrainConfig(**{**SMALL, "limit_per_class": None, "batch_size": 8}, data=str(folder), epochs=1,
                      class_weights="balanced", balanced_sampler=True, output=str(tmp_path / "run"))
    trainer = Trainer(cfg, log=lines.append)
    try:
        counts = np.bincount(trainer.data.train.labels)
        np.testing.assert_allclose(trainer.class_weights, counts.sum() / (2 * counts), rtol=1e-6)
        drawn = np.concatenate([trainer.data.train.labels[trainer.train_loader.order(e)] for e in range(20)])
        assert abs(np.mean(drawn == 0) - 0.5) < 0.05  # the majority class is 80 % of the folder
        assert trainer.train_loader.order(3).tolist() == trainer.train_loader.order(3).tolist()
        result = trainer.run()
    finally:
        trainer.ckpts.close()
    assert np.isfinite(result.final["train_loss"])
    assert any("training images per class from" in line for line in lines)


def test_drop_path_sets_stochastic_depth_where_a_family_has_it(tmp_path, monkeypatch):
    import jax

    monkeypatch.setenv(NO_COMPILE_CACHE, "1")
    base = dict(weights="none", img_size=32, limit_per_class=4, batch_size=8, strategy="finetune", progress=False)
    trainer = Trainer(TrainConfig(backbone="vit_tiny_patch16_224", drop_path=0.5, output=str(tmp_path / "vit"), **base),
                      log=lambda line: None)
    try:
        assert trainer.model.drop_path_rate == 0.5 and trainer.model_kwargs["drop_path_rate"] == 0.5
        x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
        params = {"params": trainer.variables["params"]}
        run = lambda rate: jaxtl.create_model(trainer.spec.name, trainer.num_classes, img_size=32,  # noqa: E731
                                              drop_path_rate=rate).apply(params, x, train=True,
                                                                         rngs={"dropout": jax.random.key(0)})
        assert not np.allclose(run(0.5), run(0.0))  # the rate is live in training
    finally:
        trainer.ckpts.close()
        trainer.lock.release()
    with pytest.raises(jaxtl.errors.ConfigError, match="resnet18 has no stochastic depth"):
        Trainer(TrainConfig(backbone="resnet18", drop_path=0.1, output=str(tmp_path / "r18"), **base),
                log=lambda line: None)


@pytest.mark.parametrize("name, kw", [("resnet18", {}), ("vit_tiny_patch16_224", {"img_size": 64})])
def test_grad_checkpointing_gives_the_same_gradients_in_less_memory(name, kw):
    import jax

    from jaxtl.runtime import remat_compiler_options

    spec = jaxtl.get_spec(name)
    plain = jaxtl.create_model(name, 5, **kw)
    remat = jaxtl.create_model(name, 5, grad_checkpointing=True, **kw)
    variables = jaxtl.init_variables(plain, spec, 0)
    assert jax.tree.structure(jaxtl.init_variables(remat, spec, 0)) == jax.tree.structure(variables)
    x = np.random.default_rng(0).normal(size=(8, 64, 64, 3)).astype(np.float32)

    def grad_fn(model):
        def loss(params):
            out, _ = model.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(0)})
            return (out ** 2).sum()
        return jax.grad(loss)

    # the blocks are rematerialised: the gradient's program holds remat (checkpoint) calls
    traced = lambda model: str(jax.make_jaxpr(grad_fn(model))(variables["params"]))  # noqa: E731
    assert "remat" in traced(remat) and not any(word in traced(plain) for word in ("remat", "checkpoint"))
    compiled = {"plain": jax.jit(grad_fn(plain)).lower(variables["params"]).compile(),
                "remat": jax.jit(grad_fn(remat), compiler_options=remat_compiler_options(jax.devices()[0].platform))
                .lower(variables["params"]).compile()}
    expected, got = (jax.tree.leaves(compiled[k](variables["params"])) for k in ("plain", "remat"))
    scale = max(np.abs(a).max() for a in expected)  # the floor is for leaves whose gradient is 0 (key biases)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max() + 1e-7 * scale)  # float32 rounding
    # the recomputation survives XLA: the step's temporaries (its activations) shrink
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
    assert temp["remat"] < 0.6 * temp["plain"], temp
    with pytest.raises(jaxtl.errors.ConfigError, match="does not offer it"):
        from jaxtl.training.start import starting_point
        starting_point(TrainConfig(backbone="mobilenet_v2", grad_checkpointing=True), jaxtl.get_spec("mobilenet_v2"),
                       "torchvision", 10, None, resume_needs_frozen=lambda: False, log=print)


def test_grad_checkpointing_compiles_the_train_step_with_the_remat_options(tmp_path, monkeypatch):
    import jax

    from jaxtl.runtime import remat_compiler_options
    from jaxtl.training.parallel import DataParallel

    seen, train_step = [], DataParallel.train_step
    monkeypatch.setattr(DataParallel, "train_step", lambda self, step, **kw: seen.append(kw.get("compiler_options"))
                        or train_step(self, step, **kw))
    for flag in (False, True):  # the step is built, not compiled
        trainer = Trainer(TrainConfig(**SMALL, grad_checkpointing=flag, output=str(tmp_path / str(flag))),
                          log=lambda line: None)
        try:
            trainer.compiled(trainer.stages[0])
        finally:
            trainer.ckpts.close()
            trainer.lock.release()
    assert seen == [None, remat_compiler_options(jax.devices()[0].platform)]
    assert remat_compiler_options("cpu") and remat_compiler_options("gpu") is None
    with pytest.raises(jaxtl.errors.ConfigError, match="--mapping pmap cannot compile"):
        DataParallel("pmap").train_step(lambda *a: a, compiler_options={"xla_disable_hlo_passes": "x"})


def test_calibrate_at_export_stores_the_temperature_fitted_on_the_validation_split(tmp_path, monkeypatch):
    from jaxtl.calibration import fit_on_source

    monkeypatch.setenv(NO_COMPILE_CACHE, "1")
    out = tmp_path / "calibrated"
    lines = []
    jaxtl.train(TrainConfig(backbone="mobilenet_v2", strategy="feature_extract", epochs=3, limit_per_class=10,
                            img_size=32, batch_size=16, optim=OptimConfig(opt="sgd", lr=1.0), calibrate=True,
                            output=str(out), progress=False), log=lines.append)
    model, variables, meta = jaxtl.load_model(out)
    assert meta["temperature"] > 0 and any("temperature scaling: T =" in line for line in lines)
    data = jaxtl.data.sources.load_dataset("digits", limit_per_class=10)
    from jaxtl.data.preprocessing import Preprocessing

    again = fit_on_source(model, variables, Preprocessing.from_dict(meta["preprocessing"]), data.val)
    assert again == pytest.approx(meta["temperature"], rel=1e-6)
    assert json.loads((out / "meta.json").read_text())["training"]["hflip"] is False  # digits: no flips
