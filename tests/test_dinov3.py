"""DINOv3 ViTs against timm's ``Eva`` (random weights, float32, tolerance 1e-5 relative).

timm's random init would hide most mistakes: layer scale 1e-5 makes every
block nearly the identity and the biases, class and register tokens start at
zero or near it. ``randomize_dinov3`` gives every such tensor values of order
one (layer scales in [0.25, 0.75]), random LayerNorm affine parameters,
scales the q and k rows of ``qkv`` up so attention is peaked and the rotary
embedding (which only moves q and k) changes the output clearly, and makes
the embedding stream small so the LayerNorm eps matters. Measured on ViT-S
(32 x 48 px, features, relative error): no rope 0.14, interleaved rope
layout 0.17, row and column coordinates swapped 0.09, coordinates normalised
by the longer side 0.06, rope temperature 1e4 0.08, LayerNorm eps 1e-6 2e-3
(tolerance 1e-5; correct code ~4e-7). Images are small (32-48 px: 2-3
patches a side) so the default suite stays quick; the rotary tables of larger
grids are compared with timm's directly.

timm's features are rebuilt from its ``forward_features`` (class token and
patch-token mean, registers excluded) and ``forward_intermediates``; its own
pooled output (patch mean only, ``global_pool='avg'``) is not jaxtl's head input.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxtl
from jaxtl.errors import ConfigError, ConversionError
from jaxtl.models import abstract_variables
from jaxtl.models.dinov3 import NUM_PREFIX_TOKENS, rope_sin_cos
from parity import disable_dropout

TOLERANCE = 1e-5   # stricter than the families' 1e-4: no BatchNorm, nothing ill-conditioned
NAMES = ["vit_small_patch16_dinov3", "vit_small_patch16_dinov3_qkvb", "vit_small_plus_patch16_dinov3",
         "vit_small_plus_patch16_dinov3_qkvb", "vit_base_patch16_dinov3", "vit_base_patch16_dinov3_qkvb",
         "vit_large_patch16_dinov3", "vit_large_patch16_dinov3_qkvb"]
QUICK = {"vit_small_patch16_dinov3"}
WIDTH = {n: 384 for n in NAMES[:4]} | {n: 768 for n in NAMES[4:6]} | {n: 1024 for n in NAMES[6:]}
DEPTH = {n: 24 if "large" in n else 12 for n in NAMES}
SIZES = [(32, 32), (32, 48)]   # a square 2 x 2 and a non-square 2 x 3 patch grid
QK_SCALE = 3.0
EMBED_SCALE = 0.05   # a small embedding stream, so the first LayerNorm's eps (1e-5, not timm's ViT 1e-6) shows
NUM_CLASSES = 5


def _variant(names):
    """The quick model runs by default, the others only with --all-variants."""
    return [n if n in QUICK else pytest.param(n, marks=[pytest.mark.slow, pytest.mark.variants]) for n in names]


def rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


def randomize_dinov3(model, seed: int = 0) -> None:
    """Every zero-initialised or near-constant tensor random (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.2)
        for name, p in model.named_parameters():
            if "norm" in name:
                continue
            if name.endswith(("gamma_1", "gamma_2")):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
            elif name in ("cls_token", "reg_token"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name.endswith(("bias", "q_bias", "v_bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
            elif name.endswith("attn.qkv.weight"):
                p[:2 * (p.shape[0] // 3)].mul_(QK_SCALE)        # rows of q and k
            if name in ("cls_token", "reg_token") or name.startswith("patch_embed."):
                p.mul_(EMBED_SCALE)


def _timm_model(name: str, seed: int = 0):
    import torch
    from jaxtl.torch_ref import build_torch_model

    torch.manual_seed(seed)
    tmodel = build_torch_model(name, "timm", num_classes=0)
    randomize_dinov3(tmodel, seed)
    disable_dropout(tmodel)
    return tmodel


def _nchw(x):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _random_head(width: int, seed: int):
    rng = np.random.default_rng(seed + 10)
    kernel = (rng.standard_normal((width, NUM_CLASSES)) / width ** 0.5).astype(np.float32)
    bias = (rng.standard_normal(NUM_CLASSES) * 0.1).astype(np.float32)
    return kernel, bias


def _with_head(variables, kernel, bias):
    params = dict(variables["params"], head={"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)})
    return {**variables, "params": params}


def _probe(ff: np.ndarray) -> np.ndarray:
    """DINOv3's linear-probe features from timm's normed tokens: class token, patch mean."""
    return np.concatenate([ff[:, 0], ff[:, NUM_PREFIX_TOKENS:].mean(1)], axis=-1)


# ---------------------------------------------------------------------------
# Parity.


@pytest.mark.torch
@pytest.mark.parametrize("name", _variant(NAMES))
def test_features_and_logits_match_timm(name, record_property):
    """features_only and a random head's logits, eval and train mode, square and non-square images."""
    import torch

    seed = NAMES.index(name)
    tmodel = _timm_model(name, seed)
    model, variables = jaxtl.from_state_dict(name, tmodel.state_dict(), head="new", num_classes=NUM_CLASSES)
    kernel, bias = _random_head(2 * WIDTH[name], seed)
    variables = _with_head(variables, kernel, bias)
    x = np.random.default_rng(seed).standard_normal((2, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():   # the registry's reference (convert --verify) is the same linear probe
        np.testing.assert_array_equal(jaxtl.get_spec(name).sources["timm"].reference_features(tmodel, _nchw(x)),
                                      _probe(tmodel.forward_features(_nchw(x)).numpy()))
    errs = {}
    for h, w in SIZES:
        x = np.random.default_rng(seed).standard_normal((2, h, w, 3)).astype(np.float32)
        with jax.default_matmul_precision("highest"):   # one program per size: both modes, both outputs
            outs = jax.jit(lambda v, x: [(model.apply(v, x, train=t, features_only=True), model.apply(v, x, train=t))
                                         for t in (False, True)])(variables, jnp.asarray(x))
        for train, (feats, logits) in zip((False, True), outs):
            with torch.no_grad():
                feats_ref = _probe(tmodel.train(train).forward_features(_nchw(x)).numpy())
            logits_ref = feats_ref @ kernel + bias
            assert feats.shape == (2, 2 * WIDTH[name]) and logits.shape == (2, NUM_CLASSES)
            mode = "train" if train else "eval"
            errs[f"{h}x{w} {mode} features"] = rel_err(feats, feats_ref)
            errs[f"{h}x{w} {mode} logits"] = rel_err(logits, logits_ref)
    worst = max(errs, key=errs.get)
    record_property("parity", errs)
    print(f"{name}: worst {worst} {errs[worst]:.2e}; " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert errs[worst] <= TOLERANCE, f"{worst} differs: {errs}"


@pytest.mark.torch
@pytest.mark.parametrize("name", _variant(["vit_small_patch16_dinov3", "vit_small_plus_patch16_dinov3_qkvb",
                                           "vit_base_patch16_dinov3_qkvb"]))
def test_probe_blocks_match_timm_forward_intermediates(name, record_property):
    """probe_blocks=4: the last 4 blocks' class tokens (each through the final norm), then the last
    block's patch mean, as DINOv2's create_linear_input(n_last_blocks=4, avgpool=True)."""
    import torch

    seed = NAMES.index(name)
    tmodel = _timm_model(name, seed)
    model, variables = jaxtl.from_state_dict(name, tmodel.state_dict(), head="new", num_classes=NUM_CLASSES,
                                             probe_blocks=4)
    x = np.random.default_rng(seed).standard_normal((2, 32, 48, 3)).astype(np.float32)
    with torch.no_grad():
        _, inter = tmodel.forward_intermediates(_nchw(x), indices=4, return_prefix_tokens=True, norm=True,
                                                output_fmt="NLC", intermediates_only=False)
    ref = np.concatenate([prefix[:, 0].numpy() for _, prefix in inter] + [inter[-1][0].numpy().mean(1)], -1)
    with jax.default_matmul_precision("highest"):
        feats = jax.jit(lambda v, x: model.apply(v, x, features_only=True))(variables, jnp.asarray(x))
    assert feats.shape == (2, 5 * WIDTH[name])
    assert variables["params"]["head"]["kernel"].shape == (5 * WIDTH[name], NUM_CLASSES)
    err = rel_err(feats, ref)
    record_property("parity", err)
    print(f"{name} probe_blocks=4: {err:.2e}")
    assert err <= TOLERANCE


@pytest.mark.torch
def test_gradients_match_timm_autograd(record_property):
    """One cross-entropy backward pass through a random head on the probe features, against torch
    autograd: every parameter and the input image, 1e-5 relative per tensor.

    The reference is timm's model in float64: with peaked attention, torch's own float32 gradients
    are ~4e-6 from it on the worst leaves (attention q/k kernels) and jaxtl's as close, so the two
    float32 results differ by up to ~5e-6 between runs (threaded reductions); float64 gives the
    comparison a margin that float32 noise cannot use up."""
    import copy

    import torch

    name, seed = "vit_small_patch16_dinov3_qkvb", 3   # the q/v biases get gradients too
    tmodel = _timm_model(name, seed).train()
    model, variables = jaxtl.from_state_dict(name, tmodel.state_dict(), head="new", num_classes=NUM_CLASSES)
    kernel, bias = _random_head(2 * WIDTH[name], seed)
    variables = _with_head(variables, kernel, bias)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 32, 48, 3)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, 2)

    def torch_grads(m, dtype):
        xt = _nchw(x).to(dtype).requires_grad_(True)
        ff = m.forward_features(xt)
        feats = torch.cat([ff[:, 0], ff[:, NUM_PREFIX_TOKENS:].mean(1)], -1)
        logits = feats @ torch.from_numpy(kernel).to(dtype) + torch.from_numpy(bias).to(dtype)
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels)).backward()
        grads = {k: p.grad.detach().numpy() for k, p in m.named_parameters()}
        flat = traverse_util.flatten_dict(jaxtl.convert_state_dict(name, grads, head="new",
                                                                   num_classes=NUM_CLASSES)["params"], sep="/")
        flat = {k: v for k, v in flat.items() if not k.startswith("head/")}
        return flat, xt.grad.numpy().transpose(0, 2, 3, 1)

    want32, want32_x = torch_grads(tmodel, torch.float32)
    want, want_x = torch_grads(copy.deepcopy(tmodel).double(), torch.float64)

    def loss(params, x):
        out = model.apply({"params": params}, x, train=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(out), jnp.asarray(labels)[:, None], 1))

    with jax.default_matmul_precision("highest"):
        grads, grad_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], jnp.asarray(x))
    got = traverse_util.flatten_dict(grads, sep="/")
    assert set(want) == set(got) - {"head/kernel", "head/bias"}
    errs = {k: rel_err(got[k], want[k]) for k in want} | {"input": rel_err(grad_x, want_x)}
    errs32 = {k: rel_err(got[k], want32[k]) for k in want} | {"input": rel_err(grad_x, want32_x)}
    torch32 = max([rel_err(want32[k], want[k]) for k in want] + [rel_err(want32_x, want_x)])
    worst, worst32 = max(errs, key=errs.get), max(errs32, key=errs32.get)
    record_property("parity", {"worst": worst, "err": errs[worst], "vs torch float32": errs32[worst32],
                               "torch float32 vs float64": torch32})
    print(f"worst gradient vs float64 {worst}: {errs[worst]:.2e}; vs torch float32 {worst32}: {errs32[worst32]:.2e}; "
          f"torch float32 vs float64: {torch32:.2e} ({len(errs)} tensors)")
    assert errs[worst] <= TOLERANCE, f"gradient of {worst} differs: {errs[worst]:.2e}"
    assert all(float(np.abs(want[k]).max()) > 0 for k in want)   # every parameter matters


@pytest.mark.torch
def test_rotary_embedding_matches_timm():
    """The (sin, cos) tables against timm's, square and non-square grids (float32 rounding apart)."""
    import torch
    from timm.layers.pos_embed_sincos import RotaryEmbeddingDinoV3

    for head_dim, (h, w) in ((64, (3, 5)), (64, (16, 16)), (32, (7, 2))):
        rope = RotaryEmbeddingDinoV3(head_dim, temperature=100, rotate_half=True)
        emb = rope.get_embed(shape=[h, w]).numpy()
        sin, cos = rope_sin_cos(h, w, head_dim, 100.0)
        np.testing.assert_allclose(np.concatenate([sin, cos], -1), emb, rtol=0, atol=1e-6)
        rope.train()   # no coordinate augmentation is configured: train mode gives the same table
        assert torch.equal(rope.get_embed(shape=[h, w]), torch.from_numpy(emb))


# ---------------------------------------------------------------------------
# Conversion, registry, errors.


@pytest.mark.torch
@pytest.mark.parametrize("name", _variant(NAMES))
def test_conversion_accounts_for_every_key(name):
    from jaxtl.torch_ref import build_torch_model

    state = {k: v.numpy() for k, v in build_torch_model(name, "timm", num_classes=0).state_dict().items()}
    model, variables = jaxtl.from_state_dict(name, state, head="new", num_classes=3)
    params = variables["params"]
    d = WIDTH[name]
    for i, part in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(params["blocks_1"]["attn"][part]["kernel"],
                                      state["blocks.1.attn.qkv.weight"][i * d:(i + 1) * d].T)
    assert "bias" not in params["blocks_0"]["attn"]["key"]
    if name.endswith("_qkvb"):
        np.testing.assert_array_equal(params["blocks_0"]["attn"]["value"]["bias"], state["blocks.0.attn.v_bias"])
    else:
        assert "bias" not in params["blocks_0"]["attn"]["query"]
    np.testing.assert_array_equal(params["blocks_2"]["ls2"]["gamma"], state["blocks.2.gamma_2"])
    np.testing.assert_array_equal(params["reg_token"], state["reg_token"])
    assert params["head"]["kernel"].shape == (2 * d, 3)
    # Every key used: one more is unexpected, one fewer is missing.
    with pytest.raises(ConversionError, match="unexpected key.*blocks.0.attn.extra"):
        jaxtl.from_state_dict(name, dict(state, **{"blocks.0.attn.extra": state["norm.bias"]}), head="new",
                              num_classes=3)
    with pytest.raises(ConversionError, match="missing key.*blocks.0.gamma_1"):
        jaxtl.from_state_dict(name, {k: v for k, v in state.items() if k != "blocks.0.gamma_1"}, head="new",
                              num_classes=3)
    # The checkpoints are headless: keeping "their" head is refused with the way out.
    with pytest.raises(ConversionError, match="head='new'"):
        jaxtl.from_state_dict(name, state)


def test_registry_entries():
    assert jaxtl.list_models("*dinov3*") == sorted(NAMES)
    for name in NAMES:
        spec = jaxtl.get_spec(name)
        assert spec.family == "dinov3" and spec.default_source == "timm" and spec.head_path == ("head",)
        assert spec.num_features == 2 * WIDTH[name]
        assert spec.group_names == ("embed", *[f"block{i}" for i in range(DEPTH[name])], "norm", "head")
        weights = spec.sources["timm"].weights
        assert [w.tag for w in weights] == (["lvd1689m", "sat493m"] if "large" in name else ["lvd1689m"])
        assert all(w.hf_repo == f"timm/{name}.{w.tag}" and w.num_classes == 0 for w in weights)
        pre = weights[0].preprocessing
        assert (pre.input_size, pre.resize_size, pre.interpolation) == (256, 256, "bicubic")
        assert pre.mean == (0.485, 0.456, 0.406) and pre.std == (0.229, 0.224, 0.225)
        assert spec.description
    _, _, shapes = _shapes("vit_small_patch16_dinov3")
    embed = {p[0] for p in shapes if jaxtl.get_spec("vit_small_patch16_dinov3").group_of(p) == "embed"}
    assert embed == {"patch_embed", "cls_token", "reg_token"}


def _shapes(name, **kwargs):
    spec = jaxtl.get_spec(name)
    model = jaxtl.create_model(name, num_classes=7, **kwargs)
    return spec, model, traverse_util.flatten_dict(abstract_variables(model, spec)["params"])


@pytest.mark.torch
def test_preprocessing_matches_timm_pretrained_cfg():
    import timm

    for name in NAMES:
        for w in jaxtl.get_spec(name).sources["timm"].weights:
            cfg = timm.models.get_pretrained_cfg(f"{name}.{w.tag}")
            pre = w.preprocessing
            assert w.hf_repo == cfg.hf_hub_id.rstrip("/") or cfg.hf_hub_id == "timm/"
            assert (pre.input_size, pre.interpolation) == (cfg.input_size[-1], cfg.interpolation)
            assert pre.resize_size == int(cfg.input_size[-1] / cfg.crop_pct)
            assert pre.mean == tuple(cfg.mean) and pre.std == tuple(cfg.std)
            assert cfg.num_classes == 0


@pytest.mark.torch
def test_convnext_dinov3_checkpoint_keys_fit():
    """timm's convnext_*.dinov3_lvd1689m are its convnext_* with num_classes=0: every key converts
    (not registered as a tag: test_convnext requires 1000-class timm tags, load_pretrained a classifier)."""
    import timm
    from jaxtl.torch_ref import build_torch_model

    for name in ("convnext_tiny", "convnext_small", "convnext_base"):
        cfg = timm.models.get_pretrained_cfg(f"{name}.dinov3_lvd1689m")
        assert cfg.architecture == name and cfg.num_classes == 0

    state = build_torch_model("convnext_tiny", "timm", num_classes=0).state_dict()
    _, variables = jaxtl.from_state_dict("convnext_tiny", state, source="timm", head="new", num_classes=3)
    assert variables["params"]["classifier"]["kernel"].shape == (768, 3)


def test_bad_sizes_give_config_errors():
    with pytest.raises(ConfigError, match="img_size 250 is not a multiple of patch_size 16"):
        jaxtl.create_model("vit_small_patch16_dinov3", img_size=250)
    with pytest.raises(ConfigError, match="probe_blocks"):
        jaxtl.create_model("vit_small_patch16_dinov3", probe_blocks=13)
    with pytest.raises(ConfigError, match="drop_path_rate"):
        jaxtl.create_model("vit_small_patch16_dinov3", drop_path_rate=2.0)
    model = jaxtl.create_model("vit_small_patch16_dinov3", num_classes=3, img_size=32, depth=1)
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    with pytest.raises(ConfigError, match="multiples of 16, got 40x48"):
        model.apply(variables, jnp.zeros((1, 40, 48, 3)))
    with pytest.raises(ConfigError, match="3 channels"):
        model.apply(variables, jnp.zeros((1, 32, 32, 1)))


def test_end_to_end_img_size_and_dropout():
    """create_model with --img-size's keyword, init, a jitted forward at that size and at another one;
    dropout only in train mode and unfrozen groups."""
    import dataclasses

    name = "vit_small_patch16_dinov3"
    # The training command passes --img-size to backbones whose constructor has an img_size field.
    assert "img_size" in {f.name for f in dataclasses.fields(jaxtl.get_spec(name).constructor.func)}
    model = jaxtl.create_model(name, num_classes=3, img_size=48, depth=1, drop_rate=0.5, proj_drop_rate=0.3,
                               attn_drop_rate=0.3, drop_path_rate=0.5)
    variables = jaxtl.init_variables(model, jaxtl.get_spec(name))
    apply = jax.jit(model.apply, static_argnames=("train", "frozen", "features_only"))
    x = jax.random.normal(jax.random.key(0), (2, 48, 48, 3))
    out = apply(variables, x)
    assert out.shape == (2, 3) and out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    assert apply(variables, x[:, :32], features_only=True).shape == (2, 768)   # another grid, same weights
    rngs = {"dropout": jax.random.key(1, impl="rbg")}
    groups = ("embed", "block0", "norm", "head")
    np.testing.assert_allclose(apply(variables, x, train=True, frozen=groups, rngs=rngs), out, rtol=1e-6, atol=1e-6)
    assert not np.allclose(apply(variables, x, train=True, frozen=("embed", "norm", "head"), rngs=rngs), out)


@pytest.mark.torch
def test_from_state_dict_new_head_then_jitted_forward():
    from jaxtl.torch_ref import build_torch_model

    name = "vit_small_patch16_dinov3"
    state = build_torch_model(name, "timm", num_classes=0).state_dict()
    model, variables = jaxtl.from_state_dict(name, state, head="new", num_classes=3)
    assert model.img_size == 256
    out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.ones((1, 64, 64, 3)))
    assert out.shape == (1, 3) and bool(jnp.all(jnp.isfinite(out)))
