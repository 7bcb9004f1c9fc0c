"""EfficientNet-B0...B7 against torchvision and timm (random weights, randomised BatchNorm)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxtl
from jaxtl.models import create_model
from jaxtl.models.efficientnet import EfficientNet, MBConv, MBConvConfig, architecture, drop_path_rates
from parity import check_parity, randomize_biases, rel_err

MODELS = [f"efficientnet_b{i}" for i in range(8)]
QUICK = {"efficientnet_b0"}
# Classifier dropout and stochastic depth off on both sides, so train mode is deterministic.
NO_DROPOUT = {"drop_rate": 0.0, "drop_path_rate": 0.0}
STAGES = tuple(f"stage{i}" for i in range(1, 8))


@pytest.mark.torch
@pytest.mark.parametrize("source", ["torchvision", "timm"])
@pytest.mark.parametrize("name", [n if n in QUICK else
                                  pytest.param(n, marks=[pytest.mark.slow, pytest.mark.variants]) for n in MODELS])
def test_parity_eval_and_train(name, source, record_property):
    # 72 px: the feature maps reach odd sizes (9 -> 5 -> 3) at the strided
    # 3x3 / 5x5 depthwise convs, where asymmetric padding would show.
    seed = 20 + MODELS.index(name) + (0 if source == "torchvision" else 100)
    result = check_parity(name, source, size=72, seed=seed, jax_kwargs=NO_DROPOUT, prepare=randomize_biases)
    record_property("parity", str(result))
    print(f"{name} {source}: {result}")
    result.assert_ok()


# ---------------------------------------------------------------------------
# Registry.


def test_registry_entries_complete():
    for name in MODELS:
        spec = jaxtl.get_spec(name)
        assert spec.family == "efficientnet"
        assert spec.group_names == ("stem", *STAGES, "head_conv", "head")
        assert spec.head_path == ("classifier",) and dict(spec.layer_groups)["head"] == (("classifier",),)
        assert set(spec.sources) == {"torchvision", "timm"} and spec.default_source == "torchvision"
        assert spec.sources["torchvision"].model_name == name == spec.sources["timm"].model_name
        assert jaxtl.registry.resolve(name.replace("_", "-")) == (spec, "torchvision")
        assert spec.num_features == {"efficientnet_b0": 1280, "efficientnet_b1": 1280, "efficientnet_b2": 1408,
                                     "efficientnet_b3": 1536, "efficientnet_b4": 1792, "efficientnet_b5": 2048,
                                     "efficientnet_b6": 2304, "efficientnet_b7": 2560}[name]
        for w in spec.sources["torchvision"].weights:
            assert w.url == "https://download.pytorch.org/models/" + w.filename and w.sha256_prefix
        for w in spec.sources["timm"].weights:
            assert w.filename == "model.safetensors" and w.hf_repo == f"timm/{name}.{w.tag}"
            assert w.url == f"https://huggingface.co/{w.hf_repo}/resolve/main/model.safetensors"
        assert spec.preprocessing == spec.sources["torchvision"].weights[0].preprocessing
    # timm publishes no weights for these two (only for tf_efficientnet_b6/b7, built differently).
    assert jaxtl.get_spec("efficientnet_b6").sources["timm"].weights == ()
    with pytest.raises(jaxtl.ConfigError, match="no published timm weights"):
        jaxtl.get_spec("efficientnet_b7").sources["timm"].find_weights(None)


@pytest.mark.torch
def test_torchvision_weights_match_torchvision_metadata():
    """Tags (DEFAULT first), files and eval transforms as torchvision publishes them."""
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
            assert pre.interpolation == t.interpolation.value, (name, w.tag)
            assert np.allclose(pre.mean, t.mean) and np.allclose(pre.std, t.std)
            assert w.num_classes == len(theirs.meta["categories"])


def timm_eval_sizes(cfg) -> tuple[tuple[int, int] | int, int, str]:
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
        published = timm.list_pretrained(f"{name}.*")
        in1k = [t for t in published if get_pretrained_cfg(t).num_classes == 1000]
        assert sorted(f"{name}.{w.tag}" for w in ours) == sorted(in1k), name
        if ours:
            assert ours[0].tag == get_pretrained_cfg(name).tag  # timm's default first
        for w in ours:
            cfg = get_pretrained_cfg(f"{name}.{w.tag}")
            pre = w.preprocessing
            resize, crop, interpolation = timm_eval_sizes(cfg)
            assert pre.input_size == cfg.input_size[1] == crop
            assert pre.interpolation == interpolation
            assert np.allclose(pre.mean, cfg.mean) and np.allclose(pre.std, cfg.std)
            if cfg.crop_mode == "squash":
                # Preprocessing has no squash mode; the weights say so.
                assert resize == (crop, crop) and pre.resize_size == crop and "squash" in w.note
            else:
                assert pre.resize_size == resize, (name, w.tag)


@pytest.mark.torch
@pytest.mark.parametrize("source", ["torchvision", "timm"])
def test_source_options_match_the_libraries(source):
    """BatchNorm eps/momentum, classifier dropout and stochastic-depth rates per block
    are those of the library's own default model (built on the meta device: no memory)."""
    import torch

    from jaxtl.torch_ref import build_torch_model

    for name in MODELS:
        model = create_model(name, source=source)
        with torch.device("meta"):
            tmodel = build_torch_model(name, source)
        bn_settings = {(m.eps, m.momentum) for m in tmodel.modules() if isinstance(m, torch.nn.BatchNorm2d)}
        assert len(bn_settings) == 1, bn_settings
        eps, momentum = bn_settings.pop()
        assert eps == model.bn_epsilon and momentum == pytest.approx(1 - model.bn_momentum), name
        dropouts = [m.p for m in tmodel.modules() if isinstance(m, torch.nn.Dropout)]
        if source == "torchvision":
            assert dropouts == [model.drop_rate]
            torch_rates = [b.stochastic_depth.p for stage in tmodel.features[1:-1] for b in stage]
        else:
            assert tmodel.drop_rate == model.drop_rate == 0.0
            torch_rates = [getattr(b.drop_path, "drop_prob", 0.0) for stage in tmodel.blocks for b in stage]
        arch = architecture(model.width_mult, model.depth_mult)
        assert np.allclose(drop_path_rates(model.drop_path_rate, arch.num_blocks), torch_rates), name
    # torchvision's B5-B7 weights were trained with TF's BatchNorm settings.
    assert create_model("efficientnet_b5", source="torchvision").bn_epsilon == 1e-3
    assert create_model("efficientnet_b5", source="torchvision").bn_momentum == 0.99


@pytest.mark.torch
@pytest.mark.slow
def test_drop_path_schedule_with_a_nonzero_rate():
    """Same per-block rates as both libraries when a rate is asked for (timm defaults to 0)."""
    import torch

    from jaxtl.torch_ref import build_torch_model

    for name in ("efficientnet_b0", "efficientnet_b4"):
        arch = architecture(*jaxtl.models.efficientnet.VARIANTS[name])
        with torch.device("meta"):
            tv = build_torch_model(name, "torchvision", stochastic_depth_prob=0.3)
            tm = build_torch_model(name, "timm", drop_path_rate=0.3)
        ours = drop_path_rates(0.3, arch.num_blocks)
        assert np.allclose(ours, [b.stochastic_depth.p for stage in tv.features[1:-1] for b in stage])
        assert np.allclose(ours, [getattr(b.drop_path, "drop_prob", 0.0) for stage in tm.blocks for b in stage])


def test_architecture_widths_and_depths():
    """Channel rounding and depth scaling (B0 is the paper's table 1)."""
    b0 = architecture(1.0, 1.0)
    assert b0.stem_features == 32 and b0.head_features == 1280
    assert [len(s) for s in b0.stages] == [1, 2, 2, 3, 3, 4, 1]
    assert [s[0].out_features for s in b0.stages] == [16, 24, 40, 80, 112, 192, 320]
    assert [s[0].kernel_size for s in b0.stages] == [3, 3, 5, 3, 5, 5, 3]
    first = b0.stages[0][0]
    assert not first.has_expand and first.se_features == 8 and not first.residual
    second = b0.stages[1][1]
    assert (second.in_features, second.expanded, second.se_features, second.residual) == (24, 144, 6, True)
    b7 = architecture(2.0, 3.1)
    assert [len(s) for s in b7.stages] == [math.ceil(n * 3.1) for n in (1, 2, 2, 3, 3, 4, 1)]
    assert b7.stem_features == 64 and b7.head_features == 2560
    b2 = architecture(1.1, 1.2)  # 1.1 x 16 = 17.6 -> 16; 1.1 x 40 = 44 -> 48 (round half up)
    assert [s[0].out_features for s in b2.stages] == [16, 24, 48, 88, 120, 208, 352]


def random_variables(module, *args, seed: int = 0) -> dict:
    """He-scaled random kernels, random BatchNorm, made in numpy from the
    abstract variables (compiling ``init`` costs far more than these tests)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
    out = {}
    for path, sds in traverse_util.flatten_dict(shapes).items():
        if path[-1] == "kernel":
            value = rng.standard_normal(sds.shape) * np.sqrt(2.0 / np.prod(sds.shape[:-1]))
        elif path[-1] in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, sds.shape)
        else:
            value = rng.standard_normal(sds.shape) * 0.1
        out[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


def test_stochastic_depth_drops_whole_samples_and_rescales():
    """torchvision's StochasticDepth(p, "row"): each sample keeps the residual
    branch scaled by 1 / (1 - p) or loses it; eval mode always keeps it unscaled."""
    cfg = MBConvConfig(16, 64, 16, 3, 1, 4)
    block = MBConv(cfg, drop_path_rate=0.5)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((64, 6, 6, 16)), jnp.float32)
    variables = random_variables(block, x, True, True)
    apply = jax.jit(lambda v, x, r, deterministic: block.apply(v, x, True, deterministic, rngs={"dropout": r}),
                    static_argnums=3)
    branch = apply(variables, x, jax.random.key(2), True) - x       # deterministic: x + branch
    out = apply(variables, x, jax.random.key(2), False)
    got = np.asarray(out - x).reshape(64, -1)
    full = np.asarray(branch).reshape(64, -1)
    kept = np.all(np.isclose(got, 2.0 * full, rtol=1e-5, atol=1e-6), axis=1)
    dropped = np.all(got == 0.0, axis=1)
    assert np.all(kept ^ dropped)
    assert 16 <= kept.sum() <= 48          # about half of 64 samples
    # A block without a skip connection has no stochastic depth (needs no rng).
    plain = MBConv(MBConvConfig(16, 64, 24, 3, 2, 4), drop_path_rate=0.5)
    v = random_variables(plain, x, True, True)
    jax.eval_shape(lambda v, x: plain.apply(v, x, True, False), v, x)  # no 'dropout' rng needed


def _rng_needed(model, variables, frozen=(), train=True) -> bool:
    """Whether applying ``model`` needs an rng (traced only, nothing computed)."""
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    try:
        jax.eval_shape(lambda v, x: model.apply(v, x, train=train, frozen=frozen, mutable=["batch_stats"]),
                       variables, x)
    except Exception as e:  # noqa: BLE001 - flax raises InvalidRngError
        assert "dropout" in str(e), e
        return True
    return False


def test_stochastic_depth_and_dropout_only_in_train_mode_and_unfrozen_groups():
    model = create_model("efficientnet_b0", num_classes=3)  # torchvision: dropout 0.2, drop path 0.2
    assert (model.drop_rate, model.drop_path_rate) == (0.2, 0.2)
    spec = jaxtl.get_spec("efficientnet_b0")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 32, 32, 3))))

    def all_but(group):
        return tuple(g for g in spec.group_names if g != group)

    assert not _rng_needed(model, variables, train=False)
    assert _rng_needed(model, variables)
    assert not _rng_needed(model, variables, frozen=spec.group_names)
    # Only the head trainable: its dropout still needs the rng; only a stage: its stochastic depth does.
    assert _rng_needed(model, variables, frozen=all_but("head"))
    assert _rng_needed(model, variables, frozen=all_but("stage3"))
    # stage1 has a single block without a skip connection: nothing random there.
    assert not _rng_needed(model, variables, frozen=all_but("stage1"))
    # The 'dropout' stream is the only one asked for.
    jax.eval_shape(lambda v, r: model.apply(v, jnp.zeros((2, 32, 32, 3)), train=True, mutable=["batch_stats"],
                                            rngs={"dropout": r}), variables, jax.random.key(0))
    # Eval mode draws no random numbers at all.
    jaxpr = str(jax.make_jaxpr(lambda v: model.apply(v, jnp.zeros((2, 32, 32, 3))))(variables))
    assert "random_bits" not in jaxpr and "threefry" not in jaxpr


def test_frozen_groups_keep_statistics_and_train_mode_differs():
    # A shallow, narrow EfficientNet (B0's groups and module paths, one block
    # per stage but two in stage6, the second with a skip connection) compiles quickly.
    model = EfficientNet(width_mult=0.25, depth_mult=0.3, num_classes=3, drop_path_rate=0.8)
    x = jnp.asarray(np.random.default_rng(1).standard_normal((16, 32, 32, 3)), jnp.float32)
    variables = random_variables(model, x)
    spec = jaxtl.get_spec("efficientnet_b0")
    frozen = ("stem", "stage1", "stage2")

    @jax.jit  # one compilation for all four forward passes
    def run(v, x):
        a, updates = model.apply(v, x, train=True, frozen=frozen, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(2)})
        b, _ = model.apply(v, x, train=True, frozen=frozen, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(3)})
        all_frozen, _ = model.apply(v, x, train=True, frozen=spec.group_names, mutable=["batch_stats"])
        return a, b, updates, all_frozen, model.apply(v, x)

    a, b, updates, all_frozen, evaluated = run(variables, x)
    before = traverse_util.flatten_dict(variables["batch_stats"])
    after = traverse_util.flatten_dict(updates["batch_stats"])
    for path, old in before.items():
        group = spec.group_of(path)
        assert bool(jnp.all(after[path] == old)) == (group in frozen), (path, group)
    # Stochastic depth is active in the unfrozen stages: another key, another output.
    assert rel_err(a, b) > 1e-4
    # Everything frozen: train mode is eval mode (running statistics, nothing random, no rng needed).
    assert rel_err(all_frozen, evaluated) <= 1e-6


@pytest.mark.parametrize("kwargs", [{"drop_rate": 1.5}, {"drop_path_rate": -0.1}, {"drop_rate": "0.2"}])
def test_rates_are_validated(kwargs):
    with pytest.raises(jaxtl.ConfigError, match="must be in \\[0, 1\\]"):
        create_model("efficientnet_b0", **kwargs)
