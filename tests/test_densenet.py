"""DenseNet-121/169/201 against torchvision and timm, and the legacy checkpoint names."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxtl
from jaxtl.errors import ConfigError, ConversionError
from jaxtl.models import abstract_variables, create_model
from jaxtl.models.densenet import modern_key_names
from parity import check_parity, randomize_norm_layers, rel_err

NAMES = ["densenet121", "densenet169", "densenet201"]
GROUPS = ("stem", "block1", "block2", "block3", "block4", "norm5", "head")
# A 4-block DenseNet with 1-2 layers per block: the same code paths, quick to compile.
TINY = {"block_sizes": (1, 2, 1, 2)}


def randomize_classifier_bias(model, seed: int) -> None:
    """torchvision and timm initialise the classifier bias to zero (the convs have none)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        model.classifier.bias.copy_(torch.randn(model.classifier.bias.shape, generator=g))


@pytest.mark.torch
@pytest.mark.parametrize("source", ["torchvision", pytest.param("timm", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", ["densenet121",
                                  *(pytest.param(n, marks=[pytest.mark.slow, pytest.mark.variants])
                                    for n in ("densenet169", "densenet201"))])
def test_parity_eval_and_train(name, source, record_property):
    seed = 30 + NAMES.index(name) + (0 if source == "torchvision" else 100)
    result = check_parity(name, source, seed=seed, prepare=randomize_classifier_bias)
    record_property("parity", str(result))
    print(f"{name} {source}: {result}")
    result.assert_ok()


def meta_state_dict(name: str, source: str = "torchvision", seed: int = 0) -> dict:
    """The library's tensor names and shapes with random values, without building real weights."""
    import timm
    import torch
    import torchvision

    with torch.device("meta"):
        if source == "torchvision":
            model = torchvision.models.get_model(name, weights=None)
        else:
            model = timm.create_model(name, pretrained=False)
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def legacy_names(state: dict) -> dict:
    """Spell dense-layer keys as torchvision's published files do: norm1 -> norm.1 etc."""
    pattern = re.compile(r"(\.denselayer\d+\.(?:norm|conv))([12])\.")
    return {pattern.sub(r"\1.\2.", k): v for k, v in state.items()}


@pytest.mark.torch
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_legacy_and_current_key_names_give_the_same_variables(source):
    state = meta_state_dict("densenet121", source)
    legacy = legacy_names(state)
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    assert "features.denseblock4.denselayer16.conv.2.weight" in legacy
    assert sum(k.endswith(".norm.1.weight") for k in legacy) == 58 and not any(".norm1." in k for k in legacy)
    current = traverse_util.flatten_dict(jaxtl.convert_state_dict("densenet121", state, source=source))
    old = traverse_util.flatten_dict(jaxtl.convert_state_dict("densenet121", legacy, source=source))
    assert current.keys() == old.keys()
    for path in current:
        np.testing.assert_array_equal(current[path], old[path], err_msg=str(path))
    # And the values land where PyTorch keeps them.
    np.testing.assert_array_equal(
        current[("params", "denseblock2", "denselayer3", "conv2", "kernel")],
        state["features.denseblock2.denselayer3.conv2.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(current[("batch_stats", "transition1", "norm", "var")],
                                  state["features.transition1.norm.running_var"])


def test_modern_key_names():
    a = np.zeros(1)
    renamed = modern_key_names({"features.denseblock1.denselayer10.norm.2.running_var": a,
                                "features.denseblock1.denselayer10.relu.1.weight": a,
                                "features.transition1.norm.weight": a,          # not a dense layer: kept
                                "features.denseblock1.denselayer2.conv1.weight": a,
                                "classifier.weight": a})
    assert sorted(renamed) == ["classifier.weight", "features.denseblock1.denselayer10.norm2.running_var",
                               "features.denseblock1.denselayer10.relu1.weight",
                               "features.denseblock1.denselayer2.conv1.weight", "features.transition1.norm.weight"]
    with pytest.raises(ConversionError, match=r"denselayer1\.norm1\.weight twice"):
        modern_key_names({"features.denseblock1.denselayer1.norm1.weight": a,
                          "features.denseblock1.denselayer1.norm.1.weight": a})


@pytest.mark.torch
def test_timm_densenet_is_torchvisions_network_under_the_same_names():
    """Why one key map serves both sources (timm's parity is checked fully in the slow tests)."""
    import timm
    import torch
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None).eval()
    tm = timm.create_model("densenet121", pretrained=False).eval()
    randomize_norm_layers(tv)
    tm.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(tm(x), tv(x), rtol=1e-5, atol=1e-5)
    spec = jaxtl.get_spec("densenet121")
    assert spec.sources["timm"].key_map is spec.sources["torchvision"].key_map


# ---------------------------------------------------------------------------
# Registry, groups, names.


def test_registry_entries_complete():
    features = {"densenet121": 1024, "densenet169": 1664, "densenet201": 1920}
    for name in NAMES:
        spec = jaxtl.get_spec(name)
        assert spec.family == "densenet" and spec.group_names == GROUPS
        assert spec.head_path == ("classifier",) and spec.num_features == features[name]
        assert set(spec.sources) == {"torchvision", "timm"} and spec.default_source == "torchvision"
        assert jaxtl.registry.resolve(name) == (spec, "torchvision")
        (w,) = spec.sources["torchvision"].weights
        assert w.tag == "IMAGENET1K_V1" and w.url == "https://download.pytorch.org/models/" + w.filename
        assert w.filename.startswith(name + "-") and w.sha256_prefix
        assert spec.preprocessing == w.preprocessing
        timm_w = spec.sources["timm"].default_weights()
        assert timm_w.hf_repo == f"timm/{name}.{'ra_in1k' if name == 'densenet121' else 'tv_in1k'}"
        assert (timm_w.preprocessing.resize_size, timm_w.preprocessing.interpolation) == (256, "bicubic")
    assert jaxtl.get_spec("densenet121").sources["torchvision"].weights[0].filename == "densenet121-a639ec97.pth"


@pytest.mark.torch
def test_weights_match_the_libraries_metadata():
    import timm
    import torchvision.models as tvm

    for name in NAMES:
        spec = jaxtl.get_spec(name)
        enum = getattr(tvm, name.replace("densenet", "DenseNet") + "_Weights")
        (w,) = spec.sources["torchvision"].weights
        tw = enum[w.tag]
        assert tw is enum.DEFAULT and tw.url == w.url
        t = tw.transforms()
        pre = w.preprocessing
        assert (pre.input_size, pre.resize_size, pre.interpolation) == \
            (t.crop_size[0], t.resize_size[0], t.interpolation.value)
        assert pre.mean == tuple(t.mean) and pre.std == tuple(t.std)
        default = timm.models.get_pretrained_cfg(name)
        weights = spec.sources["timm"].weights
        assert weights[0].hf_repo == default.hf_hub_id.rstrip("/")
        for w in weights:
            cfg = timm.models.get_pretrained_cfg(f"{name}.{w.tag}")
            pre = w.preprocessing
            assert w.hf_repo == cfg.hf_hub_id.rstrip("/")
            assert pre.input_size == cfg.input_size[-1] and pre.interpolation == cfg.interpolation
            assert pre.resize_size == int(cfg.input_size[-1] / cfg.crop_pct)
            assert pre.mean == tuple(cfg.mean) and pre.std == tuple(cfg.std)


def test_transitions_belong_to_the_block_before_them():
    # Groups, head, keys and shapes of every backbone: tests/test_registry_contract.py.
    spec = jaxtl.get_spec("densenet121")
    for i in (1, 2, 3):
        assert spec.group_of(("transition%d" % i, "conv", "kernel")) == f"block{i}"
    shapes = traverse_util.flatten_dict(abstract_variables(create_model("densenet121", num_classes=7), spec))
    keys = [k[0] if isinstance(k, tuple) else k for k in map(spec.sources["torchvision"].key_map, shapes)]
    assert all(k.startswith(("features.", "classifier.")) for k in keys)


@pytest.mark.torch
def test_wrong_architecture_is_refused_with_the_keys_named():
    # densenet121's third block has 24 layers, densenet169's 32.
    with pytest.raises(ConversionError, match=r"into densenet169 \(torchvision names\): \d+ missing key\(s\): "
                                              r"features\.denseblock3\.denselayer25\."):
        jaxtl.convert_state_dict("densenet169", meta_state_dict("densenet121"))
    with pytest.raises(ConversionError, match=r"into densenet121 .*unexpected key\(s\): "
                                              r"features\.denseblock3\.denselayer25\."):
        jaxtl.convert_state_dict("densenet121", meta_state_dict("densenet169"))
    # With a new head too, a file of another architecture is named as such, with the keys.
    with pytest.raises(ConversionError, match=r"into densenet121 .*keys are missing \(features\.conv0.*unexpected "
                                              r"\(bn1\..*another architecture"):
        jaxtl.convert_state_dict("densenet121", meta_state_dict("resnet18"), head="new", num_classes=3)


# ---------------------------------------------------------------------------
# Behaviour, on a tiny DenseNet (same module, fewer layers per block).


def random_variables(model, spec, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for path, sds in traverse_util.flatten_dict(abstract_variables(model, spec)).items():
        leaf = path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(sds.shape[:-1]))
            value = rng.standard_normal(sds.shape) * np.sqrt(2.0 / fan_in)
        elif leaf in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, sds.shape)
        else:
            value = rng.standard_normal(sds.shape) * 0.1
        out[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


def _tiny(**kwargs):
    model = create_model("densenet121", num_classes=5, **TINY, **kwargs)
    return model, random_variables(model, jaxtl.get_spec("densenet121"))


def _jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "frozen", "features_only", "mutable"))


def test_frozen_groups_keep_statistics_and_dropout_follows_groups():
    spec = jaxtl.get_spec("densenet121")
    model, variables = _tiny(drop_rate=0.5, layer_drop_rate=0.3)
    apply = _jit_apply(model)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    rngs = {"dropout": jax.random.key(2, impl="rbg")}
    frozen = ("stem", "block1", "block3")
    _, updates = apply(variables, x, train=True, frozen=frozen, mutable=("batch_stats",), rngs=rngs)
    before = traverse_util.flatten_dict(variables["batch_stats"])
    after = traverse_util.flatten_dict(updates["batch_stats"])
    assert any(p[0] == "transition1" for p in before)
    for path, old in before.items():
        group = spec.group_of(path)
        assert bool(jnp.all(after[path] == old)) == (group in frozen), (path, group)

    evals = apply(variables, x)
    out, _ = apply(variables, x, train=True, frozen=GROUPS, mutable=("batch_stats",))
    assert rel_err(out, evals) <= 1e-6
    # Dense-layer dropout in a block's group, classifier dropout in "head". The
    # other groups stay frozen, so only the dropout makes the difference.
    for active in ("block2", "head"):
        f = tuple(g for g in GROUPS if g != active)
        with_rng, _ = apply(variables, x, train=True, frozen=f, mutable=("batch_stats",), rngs=rngs)
        other_rng, _ = apply(variables, x, train=True, frozen=f, mutable=("batch_stats",),
                             rngs={"dropout": jax.random.key(3, impl="rbg")})
        assert rel_err(with_rng, other_rng) > 1e-3, active


def test_features_only_is_the_head_input():
    model, variables = _tiny()
    apply = _jit_apply(model)
    x = jax.random.normal(jax.random.key(4), (2, 40, 48, 3))
    with jax.default_matmul_precision("highest"):
        feats = apply(variables, x, features_only=True)
        logits = apply(variables, x)
        head = variables["params"]["classifier"]
        expected = feats @ head["kernel"] + head["bias"]
    # 64 stem channels + 1 layer -> 96 // 2, + 2 -> 112 // 2, + 1 -> 88 // 2, + 2 -> 108.
    assert feats.shape == (2, 108) and feats.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_bad_inputs_give_clear_errors():
    model, variables = _tiny()

    def shape_of(*shape):   # the checks run while tracing; no need to compute
        return jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(shape, jnp.float32)).shape

    assert shape_of(1, 29, 29, 3) == (1, 5)   # torchvision's min_size
    with pytest.raises(ConfigError, match="too small for DenseNet"):
        shape_of(1, 28, 64, 3)
    with pytest.raises(ConfigError, match="NHWC"):
        shape_of(32, 32, 3)

