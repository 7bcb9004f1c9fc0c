"""What every registered backbone owes the rest of jaxtl, checked once for all of them.

Strategies freeze and relabel whole layer groups, so every parameter must sit in
exactly one group and no group may be empty; head replacement needs the head group
to be exactly the classifier at ``spec.head_path``; conversion needs every leaf to
have its own PyTorch key in every source; the trainer relies on float32 parameters
under a bfloat16 compute dtype and on ``features_only`` giving ``num_features``.
Family-specific structure (block order, transitions, layer scale) stays in the
family's own test file. Shapes only (``jax.eval_shape``): nothing is computed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

import jaxtl
from jaxtl.models import abstract_variables, create_model, input_size_of

NUM_CLASSES = 7


@pytest.mark.parametrize("name", jaxtl.list_models())
def test_backbone_honours_the_registry_contract(name):
    spec = jaxtl.get_spec(name)
    model = create_model(name, num_classes=NUM_CLASSES, dtype="bfloat16")
    variables = abstract_variables(model, spec)
    flat = traverse_util.flatten_dict(variables)
    assert {a.dtype for a in flat.values()} == {jnp.dtype("float32")}   # bfloat16 compute, float32 state

    params = [p[1:] for p in flat if p[0] == "params"]
    by_group: dict[str, list] = {}
    for path in params:
        hits = [g for g, prefixes in spec.layer_groups for prefix in prefixes if path[:len(prefix)] == prefix]
        assert len(hits) == 1, (path, hits)
        assert spec.group_of(path) == hits[0]
        by_group.setdefault(hits[0], []).append(path)
    assert tuple(g for g in spec.group_names if g in by_group) == spec.group_names   # no empty group
    assert sorted(by_group[spec.head_group]) == [(*spec.head_path, "bias"), (*spec.head_path, "kernel")]
    assert flat[("params", *spec.head_path, "kernel")].shape == (spec.num_features, NUM_CLASSES)

    # Every leaf (BatchNorm statistics too) reads its own PyTorch tensor, or its own slice of a fused
    # one (ViT's q, k, v from one qkv tensor come with a slicing transform; the parity tests check the slices).
    for source_name, source in spec.sources.items():
        readers: dict[str, list] = {}
        for path in flat:
            mapped = source.key_map(path)
            key, sliced = (mapped[0], True) if isinstance(mapped, tuple) else (mapped, False)
            readers.setdefault(key, []).append(sliced)
        shared = {k: v for k, v in readers.items() if len(v) > 1}
        assert all(all(v) for v in shared.values()), (source_name, sorted(shared)[:4])

    # Convolutional backbones take any size, not only square ones; a ViT is built for one size.
    height, width = (input_size_of(model, spec),) * 2 if getattr(model, "img_size", None) else (64, 80)
    x = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
    feats = jax.eval_shape(lambda v, x: model.apply(v, x, features_only=True), variables, x)
    assert feats.shape == (2, spec.num_features) and feats.dtype == jnp.float32
    logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
    assert logits.shape == (2, NUM_CLASSES) and logits.dtype == jnp.float32
