"""Checkpoints: the optimizer state is stored as its arrays and comes back as the same tree; a run's
checkpoints hold what trains, older whole-model checkpoints still resume, and a resume refuses frozen
weights other than the run's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from jaxtl.errors import CheckpointError
from jaxtl.training.checkpoint import OPT_LAYOUT_KEY, Checkpoints, abstract_like
from jaxtl.training.state import create_train_state


def _state(seed: int = 0, lr: float = 0.1):
    """A train state whose optimizer is a multi_transform over three labels, like a transfer strategy's."""
    rng = np.random.default_rng(seed)
    params = {name: {"kernel": jnp.asarray(rng.standard_normal((4, 3)), jnp.float32),
                     "bias": jnp.asarray(rng.standard_normal(3), jnp.float32)} for name in ("stem", "body", "head")}
    labels = {"stem": {"kernel": "frozen", "bias": "frozen"}, "body": {"kernel": "low", "bias": "low"},
              "head": {"kernel": "high", "bias": "high"}}
    tx = optax.multi_transform({"frozen": optax.set_to_zero(), "low": optax.sgd(lr * 0.1, momentum=0.9),
                                "high": optax.adam(lr)}, labels)
    state = create_train_state({"params": params, "batch_stats": {"bn": {"mean": jnp.ones(3)}}}, tx, seed,
                               {"scale": jnp.float32(1)})
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(2):  # non-zero momentum and Adam moments
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = state.replace(params=optax.apply_updates(state.params, updates), opt_state=opt_state,
                              step=state.step + 1)
    return state


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        assert np.array_equal(np.asarray(x), np.asarray(y))


def test_state_round_trips_bit_identical_with_the_optimizer_tree(tmp_path):
    state = _state()
    ckpts = Checkpoints(tmp_path / "checkpoints")
    record = {"epoch": 1, "batch": 0, "stage": 0}
    ckpts.save(2, state, record, {"val_top1": 0.5})
    restored, got = ckpts.restore(2, abstract_like(_state(seed=1)))  # same structure, other values
    _assert_same(restored, state)
    assert got == record and ckpts.record(2)[OPT_LAYOUT_KEY] == "leaves"
    again, got = ckpts.restore(2, abstract_like(state), ckpts.record(2))  # the record read once by the caller
    _assert_same(again, state)
    assert got == record
    # what is stored: the optimizer's arrays, not one node per (label, parameter) pair
    stored = ocp.StandardCheckpointer().metadata(tmp_path / "checkpoints" / "2" / "state").item_metadata
    arrays = [x for x in jax.tree.leaves(state.opt_state) if hasattr(x, "shape")]
    assert isinstance(stored["opt_state"], list) and len(stored["opt_state"]) == len(arrays)
    # an optimizer state without any array (everything frozen) is an empty list, and round-trips too
    frozen = state.replace(opt_state=optax.set_to_zero().init(state.params))
    ckpts.save(3, frozen, record)
    _assert_same(ckpts.restore(3, abstract_like(frozen))[0], frozen)
    ckpts.close()


def test_a_checkpoint_with_the_whole_optimizer_tree_still_restores(tmp_path):
    """Checkpoints written before the compact layout (no marker in the record) restore as written."""
    state = _state()
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            record=ocp.args.JsonSave({"epoch": 1, "batch": 0, "stage": 0})))
    manager.wait_until_finished()
    manager.close()
    restored, record = Checkpoints(tmp_path / "checkpoints").restore(2, abstract_like(state))
    _assert_same(restored, state)
    assert record == {"epoch": 1, "batch": 0, "stage": 0}


def test_restoring_into_another_optimizer_is_refused_in_one_line(tmp_path):
    ckpts = Checkpoints(tmp_path / "checkpoints")
    ckpts.save(2, _state(), {"epoch": 1, "batch": 0, "stage": 0})
    other = _state().replace(opt_state=optax.sgd(0.1).init(_state().params))  # fewer optimizer arrays
    with pytest.raises(CheckpointError, match="cannot restore checkpoint 2 .*different configuration"):
        ckpts.restore(2, abstract_like(other))
    ckpts.close()


# --- what a run's checkpoints hold, end to end --------------------------------------------------


def _config(out, **kw):
    from jaxtl.optim import OptimConfig
    from jaxtl.strategies import Strategy
    from jaxtl.training.loop import TrainConfig

    base = dict(backbone="resnet18", weights="none", img_size=32, limit_per_class=20, batch_size=16,
                strategy=Strategy("finetune", freeze_until="layer2"), optim=OptimConfig(opt="sgd", lr=0.05),
                epochs=2, keep_checkpoints=2, output=str(out), progress=False)
    return TrainConfig(**{**base, **kw})


def _train(cfg):
    from jaxtl.training.loop import train

    return train(cfg, log=lambda *_: None)


def _same_model_and_records(a, b):
    import json

    import jaxtl
    from flax import traverse_util

    fa, fb = (traverse_util.flatten_dict(jaxtl.load_model(x)[1], sep="/") for x in (a, b))
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)
    strip = lambda d: [{k: v for k, v in json.loads(line).items() if k != "seconds"}  # noqa: E731
                       for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert strip(a) == strip(b)


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    """A random-init ResNet-18 fine-tuned above layer2 for two epochs: its frozen groups are constants read
    from the run's initial_variables.msgpack, its checkpoints hold only what trains."""
    out = tmp_path_factory.mktemp("runs") / "finetuned"
    _train(_config(out))
    return out


@pytest.mark.slow
def test_a_checkpoint_of_the_whole_model_still_resumes_exactly(finetuned, tmp_path):
    """Checkpoints written before train states held only what trains (the whole model's parameters and
    statistics, no frozen reference) resume to the same model and metrics."""
    import shutil

    from jaxtl.training.checkpoint import STATE_LAYOUT_KEY
    from jaxtl.training.loop import Trainer
    from jaxtl.training.state import merge

    trainer = Trainer(_config(finetuned, resume=True), log=lambda *_: None)
    try:
        state, _, record = trainer._restore(12)  # the end of the first epoch
        whole = merge(trainer.variables, jax.device_get(state.variables))
    finally:
        trainer.ckpts.close()
        trainer.lock.release()
    old = state.replace(params=whole["params"], batch_stats=whole["batch_stats"],
                        opt_state=jax.tree.leaves(state.opt_state))  # the compact layout of that time
    old_record = {k: v for k, v in record.items() if k not in ("frozen", STATE_LAYOUT_KEY)}
    legacy = tmp_path / "legacy"
    (legacy / "checkpoints").mkdir(parents=True)
    for name in ("config.json", "metrics.jsonl"):
        shutil.copy(finetuned / name, legacy / name)
    manager = ocp.CheckpointManager(legacy / "checkpoints")
    manager.save(12, args=ocp.args.Composite(state=ocp.args.StandardSave(jax.device_get(old)),
                                             record=ocp.args.JsonSave({**old_record, OPT_LAYOUT_KEY: "leaves"})))
    manager.wait_until_finished()
    manager.close()
    _train(_config(legacy, resume=True))
    _same_model_and_records(legacy, finetuned)


@pytest.mark.slow
def test_a_resume_refuses_frozen_weights_other_than_the_runs(finetuned, tmp_path):
    import shutil

    from jaxtl.export import MODEL_FILE, read_model_file, save_model, write_variables_file
    from jaxtl.strategies import Strategy
    from jaxtl.training.start import INITIAL_FILE

    finetuned = Path(shutil.copytree(finetuned, tmp_path / "finetuned"))  # damaged below; the fixture stays whole
    # a run whose frozen backbone comes from a model folder (the fine-tuned run's export)
    probe = tmp_path / "probe"
    cfg = _config(probe, weights="pretrained", weights_file=str(finetuned), strategy=Strategy("feature_extract"),
                  epochs=1)
    _train(cfg)
    variables, meta = read_model_file(finetuned / MODEL_FILE)
    variables["params"]["layer1_0"]["conv1"]["kernel"] = variables["params"]["layer1_0"]["conv1"]["kernel"] * 1.5
    save_model(finetuned, variables, {k: v for k, v in meta.items() if k != "format"})
    with pytest.raises(CheckpointError, match=r"the frozen layers of this run come from .*model.msgpack \(sha256 .*"
                                              r"pass the run's file with --weights-file"):
        _train(dataclasses.replace(cfg, resume=True))

    # a random-init run's starting variables, changed or gone
    initial = finetuned / INITIAL_FILE
    variables, meta = read_model_file(initial)
    variables["params"]["conv1"]["kernel"] = variables["params"]["conv1"]["kernel"] + 1.0
    write_variables_file(initial, variables, {k: v for k, v in meta.items() if k != "format"})
    for damage in ("changed", "gone"):
        if damage == "gone":
            initial.unlink()
        with pytest.raises(CheckpointError, match="starting variables .* are missing or changed"):
            _train(_config(finetuned, resume=True))
