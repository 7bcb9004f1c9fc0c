"""ResNet-18...152 against torchvision and timm (random weights, randomised BatchNorm)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxtl
from parity import check_parity

DEPTHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
SLOW = {"resnet101", "resnet152"}


@pytest.mark.torch
@pytest.mark.parametrize("source", ["torchvision", "timm"])
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow, pytest.mark.variants]) if n in SLOW else n
                                  for n in DEPTHS])
def test_parity_eval_and_train(name, source, record_property):
    result = check_parity(name, source, seed=DEPTHS.index(name) + (0 if source == "torchvision" else 100))
    record_property("parity", str(result))
    print(f"{name} {source}: {result}")
    result.assert_ok()


def test_registry_entries_complete():
    for name in DEPTHS:
        spec = jaxtl.get_spec(name)
        assert spec.group_names == ("stem", "layer1", "layer2", "layer3", "layer4", "head")
        assert set(spec.sources) == {"torchvision", "timm"}
        assert spec.head_path == ("fc",)
        pre = spec.preprocessing
        assert pre.input_size == 224 and pre.mean == (0.485, 0.456, 0.406)
        assert spec.sources["torchvision"].default_weights().sha256_prefix is not None


def test_train_mode_updates_batch_stats_and_eval_does_not():
    model = jaxtl.create_model("resnet18", num_classes=3)
    variables = jaxtl.init_variables(model, jaxtl.get_spec("resnet18"))
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    # jitted: an eager apply compiles every primitive on its own (several seconds for a ResNet)
    train_step = jax.jit(lambda v, x, frozen=(): model.apply(v, x, train=True, frozen=frozen, mutable=["batch_stats"]),
                         static_argnames="frozen")
    _, updates = train_step(variables, x)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), updates["batch_stats"], variables["batch_stats"])
    assert all(jax.tree.leaves(changed))
    # A frozen group keeps its statistics even in train mode.
    _, updates = train_step(variables, x, frozen=("stem", "layer1"))
    for group in ("bn1", "layer1_0"):
        same = jax.tree.map(lambda a, b: bool(jnp.all(a == b)), updates["batch_stats"][group],
                            variables["batch_stats"][group])
        assert all(jax.tree.leaves(same)), group
    assert not np.allclose(updates["batch_stats"]["layer2_0"]["bn1"]["mean"],
                           variables["batch_stats"]["layer2_0"]["bn1"]["mean"])


def test_bfloat16_compute_keeps_float32_params():
    model = jaxtl.create_model("resnet18", num_classes=5, dtype="bfloat16")
    variables = jaxtl.init_variables(model, jaxtl.get_spec("resnet18"))
    assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    x = jnp.ones((1, 32, 32, 3))
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    assert out.dtype == jnp.float32 and out.shape == (1, 5)
    f32_model = jaxtl.create_model("resnet18", num_classes=5)
    f32 = jax.jit(lambda v, x: f32_model.apply(v, x, train=False))(variables, x)
    np.testing.assert_allclose(np.asarray(out), np.asarray(f32), rtol=0.1, atol=0.1)


def test_features_only_returns_pooled_features():
    model = jaxtl.create_model("resnet50", num_classes=4)
    spec = jaxtl.get_spec("resnet50")
    variables = jaxtl.init_variables(model, spec)
    feats = jax.jit(lambda v, x: model.apply(v, x, features_only=True))(variables, jnp.ones((2, 64, 64, 3)))
    assert feats.shape == (2, spec.num_features)
