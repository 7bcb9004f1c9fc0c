"""ConvNeXt-T/S/B against torchvision and timm (random weights, randomised LayerNorm and layer scale)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxtl
from jaxtl.models import abstract_variables, create_model
from jaxtl.models.convnext import VARIANTS, ConvNeXtBlock, drop_path_rates
from parity import check_parity

MODELS = ["convnext_tiny", "convnext_small", "convnext_base"]
QUICK = {"convnext_tiny"}
NO_DROP_PATH = {"drop_path_rate": 0.0}


def randomize_convnext(model, seed: int) -> None:
    """Make every layer matter.

    The libraries' init would make the comparison nearly vacuous: layer scale
    1e-6 turns every block into the identity, weights of std 0.02 keep the
    GELU inputs so small that its tanh approximation would pass, and zero
    biases hide a bias applied in the wrong place. Here: layer scale in
    [0.25, 0.75], variance-preserving weights, biases of std 0.2.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("layer_scale", "gamma")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
        for mod in model.modules():
            if isinstance(mod, (torch.nn.Conv2d, torch.nn.Linear)):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) / math.sqrt(fan_in))
                if mod.bias is not None:
                    mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)


@pytest.mark.torch
@pytest.mark.parametrize("source", ["torchvision", "timm"])
@pytest.mark.parametrize("name", [n if n in QUICK else
                                  pytest.param(n, marks=[pytest.mark.slow, pytest.mark.variants]) for n in MODELS])
def test_parity_eval_and_train(name, source, record_property):
    # 72 px: 18 -> 9 -> 4 -> 2, so a 2x2 stride-2 downsampling meets an odd map.
    seed = 40 + MODELS.index(name) + (0 if source == "torchvision" else 100)
    result = check_parity(name, source, size=72, seed=seed, jax_kwargs=NO_DROP_PATH, prepare=randomize_convnext)
    record_property("parity", str(result))
    print(f"{name} {source}: {result}")
    result.assert_ok()


# ---------------------------------------------------------------------------
# Registry.


def test_registry_entries_complete():
    for name in MODELS:
        spec = jaxtl.get_spec(name)
        depths, dims = VARIANTS[name]
        assert spec.family == "convnext"
        assert spec.group_names == ("stem", "stage1", "stage2", "stage3", "stage4", "head_norm", "head")
        groups = dict(spec.layer_groups)
        assert groups["stage1"] == tuple((f"stage1_{j}",) for j in range(3))
        # Each downsampling layer belongs to the stage it starts.
        assert groups["stage2"][:2] == (("stage2_downsample_norm",), ("stage2_downsample_conv",))
        assert len(groups["stage3"]) == 2 + depths[2]
        assert spec.head_path == ("classifier",) and groups["head"] == (("classifier",),)
        assert set(spec.sources) == {"torchvision", "timm"} and spec.default_source == "torchvision"
        assert spec.sources["torchvision"].model_name == name == spec.sources["timm"].model_name
        assert spec.num_features == dims[-1]
        for w in spec.sources["torchvision"].weights:
            assert w.url == "https://download.pytorch.org/models/" + w.filename and w.sha256_prefix
        for w in spec.sources["timm"].weights:
            assert w.filename == "model.safetensors" and w.hf_repo == f"timm/{name}.{w.tag}"
            assert w.url == f"https://huggingface.co/{w.hf_repo}/resolve/main/model.safetensors"
        assert spec.preprocessing == spec.sources["torchvision"].weights[0].preprocessing
    assert [jaxtl.get_spec(n).preprocessing.resize_size for n in MODELS] == [236, 230, 232]


@pytest.mark.torch
def test_torchvision_weights_match_torchvision_metadata():
    import torchvision

    for name in MODELS:
        enum = torchvision.models.get_model_weights(name)
        ours = jaxtl.get_spec(name).sources["torchvision"].weights
        assert ours[0].tag == enum.DEFAULT.name
        assert sorted(w.tag for w in ours) == sorted(w.name for w in enum)
        for w in ours:
            theirs = enum[w.tag]
            t = theirs.transforms()
            pre = w.preprocessing
            assert w.url == theirs.url
            assert (pre.input_size, pre.resize_size) == (t.crop_size[0], t.resize_size[0]), (name, w.tag)
            assert pre.interpolation == t.interpolation.value == "bilinear"
            assert np.allclose(pre.mean, t.mean) and np.allclose(pre.std, t.std)


def timm_eval_sizes(cfg) -> tuple[int, int, str]:
    """(resize size, crop size, interpolation) of timm's own eval transform for a pretrained cfg."""
    from timm.data import create_transform, resolve_data_config
    from torchvision import transforms as T

    config = resolve_data_config({}, pretrained_cfg=cfg.to_dict())
    steps = create_transform(**config, is_training=False).transforms
    resize = next(s for s in steps if isinstance(s, T.Resize))
    crop = next(s for s in steps if isinstance(s, T.CenterCrop))
    return resize.size, crop.size[0], resize.interpolation.value


@pytest.mark.torch
def test_timm_weights_match_timm_pretrained_cfg():
    import timm
    from timm.models import get_pretrained_cfg

    for name in MODELS:
        ours = jaxtl.get_spec(name).sources["timm"].weights
        published = set(timm.list_pretrained(f"{name}.*"))
        assert ours[0].tag == get_pretrained_cfg(name).tag  # timm's default first
        for w in ours:
            assert f"{name}.{w.tag}" in published
            cfg = get_pretrained_cfg(f"{name}.{w.tag}")
            assert cfg.num_classes == w.num_classes in (0, 1000)   # 0: DINOv3's, no classifier
            resize, crop, interpolation = timm_eval_sizes(cfg)
            pre = w.preprocessing
            assert (pre.input_size, pre.resize_size, pre.interpolation) == (crop, resize, interpolation), (name, w.tag)
            assert np.allclose(pre.mean, cfg.mean) and np.allclose(pre.std, cfg.std)


@pytest.mark.torch
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_source_options_match_the_libraries(source):
    """LayerNorm eps, no classifier dropout and the per-block stochastic-depth rates
    of the library's own default model (built on the meta device: no memory)."""
    import torch

    from jaxtl.torch_ref import build_torch_model

    for name in MODELS:
        model = create_model(name, source=source)
        with torch.device("meta"):
            tmodel = build_torch_model(name, source)
        norms = [m for m in tmodel.modules() if isinstance(m, torch.nn.LayerNorm)]
        assert len(norms) == 1 + 3 + sum(VARIANTS[name][0]) + 1        # stem, downsampling, blocks, head
        assert {m.eps for m in norms} == {model.ln_epsilon} == {1e-6}
        assert all(m.p == 0.0 for m in tmodel.modules() if isinstance(m, torch.nn.Dropout))
        assert model.drop_rate == 0.0
        if source == "torchvision":
            torch_rates = [b.stochastic_depth.p for stage in tmodel.features[1::2] for b in stage]
        else:
            torch_rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in tmodel.stages for b in stage.blocks]
        assert np.allclose(drop_path_rates(model.drop_path_rate, sum(VARIANTS[name][0])), torch_rates), name
    if source == "torchvision":
        assert [create_model(n).drop_path_rate for n in MODELS] == [0.1, 0.4, 0.5]


@pytest.mark.torch
def test_drop_path_schedule_with_a_nonzero_rate():
    import torch

    from jaxtl.torch_ref import build_torch_model

    with torch.device("meta"):
        tm = build_torch_model("convnext_tiny", "timm", drop_path_rate=0.3)
    ours = drop_path_rates(0.3, 18)
    assert np.allclose(ours, [getattr(b.drop_path, "drop_prob", 0.0) for stage in tm.stages for b in stage.blocks])
    assert ours[0] == 0.0 and ours[-1] == pytest.approx(0.3)


@pytest.mark.parametrize("name", MODELS)
def test_layer_scale_per_stage_and_no_batchnorm_state(name):
    # Groups, head, keys and shapes of every backbone: tests/test_registry_contract.py.
    spec = jaxtl.get_spec(name)
    model = create_model(name, num_classes=7, axis_name="batch")  # axis_name accepted and ignored (no BatchNorm)
    shapes = traverse_util.flatten_dict(abstract_variables(model, spec))
    assert {p[0] for p in shapes} == {"params"}
    assert shapes[("params", "stage1_0", "layer_scale")].shape == (VARIANTS[name][1][0],)


def test_torchvision_layer_scale_is_reshaped():
    spec = jaxtl.get_spec("convnext_tiny")
    key, transform = spec.sources["torchvision"].key_map(("params", "stage2_1", "layer_scale"))
    assert key == "features.3.1.layer_scale"
    assert transform(np.ones((192, 1, 1), np.float32)).shape == (192,)
    assert spec.sources["timm"].key_map(("params", "stage2_1", "layer_scale")) == "stages.1.blocks.1.gamma"
    assert spec.sources["timm"].key_map(("params", "stage2_downsample_conv", "kernel")) == "stages.1.downsample.1.weight"
    assert spec.sources["torchvision"].key_map(("params", "stage4_downsample_norm", "scale")) == "features.6.0.weight"


# ---------------------------------------------------------------------------
# Train-mode behaviour.


def test_stochastic_depth_drops_whole_samples_and_rescales():
    block = ConvNeXtBlock(drop_path_rate=0.5, layer_scale_init=0.5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 5, 5, 8)), jnp.float32)
    variables = jax.eval_shape(lambda: block.init(jax.random.key(0), x, True))
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.3 + 0.2, jnp.float32), variables)
    apply = jax.jit(lambda v, x, r, deterministic: block.apply(v, x, deterministic, rngs={"dropout": r}),
                    static_argnums=3)
    branch = np.asarray(apply(variables, x, jax.random.key(2), True) - x).reshape(64, -1)
    got = np.asarray(apply(variables, x, jax.random.key(2), False) - x).reshape(64, -1)
    kept = np.all(np.isclose(got, 2.0 * branch, rtol=1e-5, atol=1e-6), axis=1)
    dropped = np.all(got == 0.0, axis=1)
    assert np.all(kept ^ dropped)
    assert 16 <= kept.sum() <= 48


def _rng_needed(model, variables, frozen=(), train=True) -> bool:
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=train, frozen=frozen), variables, x)
    except Exception as e:  # noqa: BLE001 - flax raises InvalidRngError
        assert "dropout" in str(e), e
        return True
    return False


def test_stochastic_depth_only_in_train_mode_and_unfrozen_groups():
    model = create_model("convnext_tiny", num_classes=3)  # torchvision: drop path 0.1
    spec = jaxtl.get_spec("convnext_tiny")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))

    def all_but(group):
        return tuple(g for g in spec.group_names if g != group)

    assert not _rng_needed(model, variables, train=False)
    assert _rng_needed(model, variables)
    assert not _rng_needed(model, variables, frozen=spec.group_names)
    assert _rng_needed(model, variables, frozen=all_but("stage4"))
    # Stage 1's first block has rate 0, its other two do not.
    assert _rng_needed(model, variables, frozen=all_but("stage1"))
    # No dropout before the classifier by default: a trainable head alone needs no rng.
    assert not _rng_needed(model, variables, frozen=all_but("head"))
    assert _rng_needed(create_model("convnext_tiny", 3, drop_rate=0.3, drop_path_rate=0.0), variables,
                       frozen=all_but("head"))
    # The timm source has no stochastic depth by default.
    assert not _rng_needed(create_model("convnext_tiny", 3, source="timm"), variables)
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3))))(variables))
    assert "random_bits" not in jaxpr and "threefry" not in jaxpr


@pytest.mark.parametrize("kwargs", [{"drop_rate": 1.5}, {"drop_path_rate": -0.1}])
def test_rates_are_validated(kwargs):
    with pytest.raises(jaxtl.ConfigError, match="must be in \\[0, 1\\]"):
        create_model("convnext_tiny", **kwargs)
