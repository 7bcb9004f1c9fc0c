"""Checkpoints: the optimizer state is stored as its arrays and comes back as the same tree."""

from __future__ import annotations

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
