"""VGG-11...19 (with and without BatchNorm) against torchvision, and the adaptive pooling it needs."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxtl
from jaxtl.errors import ConfigError, ConversionError
from jaxtl.models import abstract_variables, create_model
from jaxtl.models.vgg import _bin_edges, adaptive_avg_pool
from parity import check_parity, randomize_biases, rel_err

NAMES = ["vgg11", "vgg13", "vgg16", "vgg19", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]
QUICK = {"vgg11", "vgg11_bn"}
GROUPS = ("block1", "block2", "block3", "block4", "block5", "fc", "head")
# Dropout is switched off on both sides so train mode is deterministic.
NO_DROPOUT = {"drop_rate": 0.0}


@pytest.mark.torch
@pytest.mark.parametrize("name", [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_parity_eval_and_train(name, record_property):
    """32 px: the features end as a 1x1 map that the adaptive pool copies to 7x7."""
    result = check_parity(name, "torchvision", size=32, seed=20 + NAMES.index(name), jax_kwargs=NO_DROPOUT,
                          prepare=partial(randomize_biases, scale=0.1))
    record_property("parity", str(result))
    print(f"{name} 32 px: {result}")
    result.assert_ok()


@pytest.mark.torch
@pytest.mark.parametrize("name,size", [
    ("vgg11_bn", 100),                                        # 3x3 map -> 7x7: overlapping bins
    pytest.param("vgg16", 224, marks=pytest.mark.slow),       # 7x7: the pool is the identity
    pytest.param("vgg16_bn", 264, marks=pytest.mark.slow),    # 8x8 -> 7x7: overlapping bins, downsampling
])
def test_parity_at_other_input_sizes(name, size, record_property):
    result = check_parity(name, "torchvision", size=size, seed=40 + size, jax_kwargs=NO_DROPOUT,
                          prepare=partial(randomize_biases, scale=0.1))
    record_property("parity", str(result))
    print(f"{name} {size} px: {result}")
    result.assert_ok()


@pytest.mark.torch
@pytest.mark.parametrize("in_hw", [(1, 1), (2, 3), (3, 3), (4, 7), (6, 9), (7, 7), (8, 8), (10, 13), (14, 14),
                                   (15, 22)])
def test_adaptive_avg_pool_matches_torch(in_hw):
    import torch

    x = np.random.default_rng(in_hw[0] * 31 + in_hw[1]).standard_normal((2, *in_hw, 5)).astype(np.float32)
    ref = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), (7, 7))
    out = jax.jit(lambda x: adaptive_avg_pool(x, 7))(jnp.asarray(x))
    assert out.shape == (2, 7, 7, 5)
    np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_adaptive_pool_bins():
    assert _bin_edges(1, 7) == [(0, 1)] * 7
    assert _bin_edges(3, 7) == [(0, 1), (0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 3)]
    assert _bin_edges(8, 7) == [(0, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7), (6, 8)]
    assert _bin_edges(14, 7) == [(2 * i, 2 * i + 2) for i in range(7)]


# ---------------------------------------------------------------------------
# Registry, groups, names.


def test_registry_entries_complete():
    depths = {"vgg11": 8, "vgg13": 10, "vgg16": 13, "vgg19": 16}
    for name in NAMES:
        spec = jaxtl.get_spec(name)
        assert spec.family == "vgg" and spec.group_names == GROUPS
        assert spec.head_path == ("classifier_6",) and spec.num_features == 4096
        assert set(spec.sources) == {"torchvision"} and spec.default_source == "torchvision"
        assert spec.description.startswith(f"VGG-{depths[name.removesuffix('_bn')] + 3} ")
        (w,) = spec.sources["torchvision"].weights
        assert w.tag == "IMAGENET1K_V1" and w.url == "https://download.pytorch.org/models/" + w.filename
        assert w.filename.startswith(name + "-") and w.sha256_prefix
        assert spec.preprocessing == w.preprocessing
        assert (w.preprocessing.input_size, w.preprocessing.resize_size, w.preprocessing.interpolation) == \
            (224, 256, "bilinear")


@pytest.mark.torch
def test_weights_match_torchvision_metadata():
    import torchvision.models as tvm

    for name in NAMES:
        enum = getattr(tvm, name.upper() + "_Weights")
        (w,) = jaxtl.get_spec(name).sources["torchvision"].weights
        tw = enum[w.tag]
        assert tw is enum.DEFAULT and tw.url == w.url
        t = tw.transforms()
        pre = w.preprocessing
        assert (pre.input_size, pre.resize_size) == (t.crop_size[0], t.resize_size[0])
        assert pre.interpolation == t.interpolation.value
        assert pre.mean == tuple(t.mean) and pre.std == tuple(t.std)


@pytest.mark.parametrize("name", ["vgg11", "vgg19_bn"])
def test_each_block_holds_its_convolutions(name):
    # Groups, head, keys and shapes of every backbone: tests/test_registry_contract.py.
    spec = jaxtl.get_spec(name)
    variables = abstract_variables(create_model(name, num_classes=7, axis_name=None), spec)
    assert ("batch_stats" in variables) == name.endswith("_bn")
    params = list(traverse_util.flatten_dict(variables["params"]))
    convs_per_block = {"vgg11": (1, 1, 2, 2, 2), "vgg19_bn": (2, 2, 4, 4, 4)}[name]
    per_layer = 2 if name.endswith("_bn") else 1   # conv (+ BatchNorm) per convolution
    for b, n in enumerate(convs_per_block):
        modules = {p[0] for p in params if spec.group_of(p) == f"block{b + 1}"}
        assert len(modules) == n * per_layer
    assert variables["params"]["classifier_0"]["kernel"].shape == (25088, 4096)


def meta_state_dict(name: str) -> dict:
    """A state dict with torchvision's names and shapes (zeros), without initialising weights."""
    import torch
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None)
    return {k: np.zeros(v.shape, np.float32) for k, v in model.state_dict().items()}


@pytest.mark.torch
def test_wrong_architecture_is_refused_with_the_keys_named():
    # vgg11 has one conv fewer in blocks 1 and 2: every later index shifts.
    with pytest.raises(ConversionError, match=r"into vgg13 \(torchvision names\): \d+ missing key\(s\): "
                                              r"features\.10\.bias.*\d+ unexpected key\(s\): features\.11\.bias"):
        jaxtl.convert_state_dict("vgg13", meta_state_dict("vgg11"))
    # BatchNorm parameters have no place in the plain network.
    with pytest.raises(ConversionError, match=r"into vgg16 .*unexpected key\(s\): .*features\.1\.running_mean"):
        jaxtl.convert_state_dict("vgg16", meta_state_dict("vgg16_bn"))
    with pytest.raises(ConversionError, match="missing key"):
        jaxtl.convert_state_dict("vgg16_bn", meta_state_dict("vgg16"))


# ---------------------------------------------------------------------------
# Behaviour.


def random_variables(model, spec, seed: int = 0) -> dict:
    """He-scaled random kernels and random BatchNorm statistics, made in numpy
    (cheaper than compiling ``model.init`` for 133 M parameters)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, sds in traverse_util.flatten_dict(abstract_variables(model, spec)).items():
        leaf = path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(sds.shape[:-1]))
            value = rng.standard_normal(sds.shape, np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, sds.shape)
        else:
            value = rng.standard_normal(sds.shape) * 0.1
        out[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


@pytest.fixture(scope="module")
def vgg11_bn():
    model = create_model("vgg11_bn", num_classes=3)   # dropout 0.5, as torchvision
    return model, random_variables(model, jaxtl.get_spec("vgg11_bn"))


def _jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "frozen", "features_only", "mutable"))


def test_frozen_groups_keep_statistics_and_dropout_follows_groups(vgg11_bn):
    model, variables = vgg11_bn
    spec = jaxtl.get_spec("vgg11_bn")
    apply = _jit_apply(model)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    rngs = {"dropout": jax.random.key(2, impl="rbg")}
    frozen = ("block1", "block2")
    _, updates = apply(variables, x, train=True, frozen=frozen, mutable=("batch_stats",), rngs=rngs)
    before = traverse_util.flatten_dict(variables["batch_stats"])
    after = traverse_util.flatten_dict(updates["batch_stats"])
    for path, old in before.items():
        group = spec.group_of(path)
        assert bool(jnp.all(after[path] == old)) == (group in frozen), (path, group)

    evals = apply(variables, x)
    # Everything frozen: train mode is eval mode (running statistics, no dropout, no rng needed).
    out, _ = apply(variables, x, train=True, frozen=GROUPS, mutable=("batch_stats",))
    assert rel_err(out, evals) <= 1e-6
    # The first dropout belongs to "fc", the one feeding the classifier to "head".
    for active in ("fc", "head"):
        frozen = tuple(g for g in GROUPS if g != active)
        out, _ = apply(variables, x, train=True, frozen=frozen, mutable=("batch_stats",), rngs=rngs)
        assert rel_err(out, evals) > 1e-3, active


def test_features_only_is_the_head_input(vgg11_bn):
    model, variables = vgg11_bn
    apply = _jit_apply(model)
    x = jax.random.normal(jax.random.key(3), (2, 48, 40, 3))   # not square, not 32k: exercises the pool
    with jax.default_matmul_precision("highest"):
        feats = apply(variables, x, features_only=True)
        logits = apply(variables, x)
        head = variables["params"]["classifier_6"]
        expected = feats @ head["kernel"] + head["bias"]
    assert feats.shape == (2, 4096) and feats.dtype == jnp.float32
    assert float(jnp.min(feats)) >= 0.0   # after the ReLU
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_give_clear_errors():
    model = create_model("vgg11_bn", num_classes=3)
    variables = abstract_variables(model, jaxtl.get_spec("vgg11_bn"))

    def shape_of(*shape):   # the checks run while tracing; no need to compute
        return jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(shape, jnp.float32)).shape

    assert shape_of(1, 32, 32, 3) == (1, 3)   # torchvision's min_size
    with pytest.raises(ConfigError, match="at least 32x32"):
        shape_of(1, 31, 64, 3)
    with pytest.raises(ConfigError, match="NHWC"):
        shape_of(32, 32, 3)


def test_pooled_map_is_kept_out_of_the_classifier_fusion():
    """Below 224 px the pooled map passes an optimization barrier (see VGG.__call__:
    without it XLA:CPU fused a 1x1 map's broadcast into the classifier and ran 20x slower)."""
    model = create_model("vgg11", num_classes=3)
    variables = abstract_variables(model, jaxtl.get_spec("vgg11"))

    def jaxpr_at(size):
        x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
        return str(jax.make_jaxpr(model.apply)(variables, x))

    assert "optimization_barrier" in jaxpr_at(32)
    assert "optimization_barrier" not in jaxpr_at(224)   # 7x7 already: no pooling at all
