"""Vision Transformers against timm and torchvision (random weights).

Random weights are made to exercise what could go wrong (see ``randomize_vit``):
besides the LayerNorms (randomised by check_parity), every parameter that the
libraries initialise to zero or near zero gets random values (torchvision's
head is all zeros, which would make the comparison pass vacuously); the
embedding stream is made small so the first LayerNorm's eps matters; q/k and
the MLP's first layer are scaled up so attention is peaked and GELU inputs
reach the range where the tanh approximation differs. Measured on ViT-Ti:
q/k swapped -> 0.15, LayerNorm eps 1e-5 -> 0.04, tanh GELU -> 2.7e-4
(relative error, tolerance 1e-4; correct code ~1e-6).
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
from jaxtl.models.vit import bicubic_weights, resample_pos_embed, resize_bicubic
from jaxtl.registry import resolve
from parity import TOLERANCE, check_parity, disable_dropout, randomize_norm_layers, rel_err

NAMES = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_large_patch16_224"]
DEPTH = {"vit_tiny_patch16_224": 12, "vit_small_patch16_224": 12, "vit_base_patch16_224": 12,
         "vit_large_patch16_224": 24}
WIDTH = {"vit_tiny_patch16_224": 192, "vit_small_patch16_224": 384, "vit_base_patch16_224": 768,
         "vit_large_patch16_224": 1024}
CASES = [(n, "timm") for n in NAMES] + [("vit_base_patch16_224", "torchvision"),
                                        ("vit_large_patch16_224", "torchvision")]
SLOW = {"vit_large_patch16_224"}


EMBED_SCALE = 0.01   # embedding stream std ~1e-2: variance ~1e-4, so eps 1e-6 vs 1e-5 shows
QK_SCALE = 3.0       # attention logits x9: peaked attention
FC1_SCALE = 3.0      # GELU inputs of a few units


def randomize_vit(model, seed: int = 0) -> None:
    """Make a randomly initialised timm/torchvision ViT a sensitive test (see the module docstring)."""
    import torch

    g = torch.Generator().manual_seed(seed + 1)
    norm_params = {id(p) for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if id(p) in norm_params:
                continue
            if name in ("cls_token", "class_token"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif name in ("head.weight", "heads.head.weight"):
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        for name, p in model.named_parameters():
            if name in ("cls_token", "class_token", "pos_embed", "encoder.pos_embedding") or \
                    name.startswith(("patch_embed.", "conv_proj.")):
                p.mul_(EMBED_SCALE)
            elif name.endswith(("attn.qkv.weight", "self_attention.in_proj_weight")):
                p[:2 * (p.shape[0] // 3)].mul_(QK_SCALE)      # rows of q and k
            elif name.endswith(("mlp.fc1.weight", "mlp.0.weight")):
                p.mul_(FC1_SCALE)


def _params(name, **kwargs):
    spec = jaxtl.get_spec(name)
    model = jaxtl.create_model(name, **kwargs)
    return spec, model, traverse_util.flatten_dict(abstract_variables(model, spec)["params"])


# ---------------------------------------------------------------------------
# Parity at 224 px (eval, and train mode with dropout / drop-path off).


@pytest.mark.torch
@pytest.mark.parametrize("name,source", [pytest.param(n, s, marks=[pytest.mark.slow, pytest.mark.variants])
                                         if n in SLOW else (n, s) for n, s in CASES])
def test_parity_eval_and_train(name, source, record_property):
    batch = 2 if WIDTH[name] < 768 else 1
    result = check_parity(name, source, size=224, batch=batch, seed=NAMES.index(name), prepare=randomize_vit)
    record_property("parity", str(result))
    print(f"{name} {source}: {result}")
    result.assert_ok()


# ---------------------------------------------------------------------------
# Another resolution: 224-px weights in a model built for img_size, against
# each library's own way of loading them.


def _torch_resampled(name: str, source: str, img_size: int, seed: int):
    """(224-px state dict, torch model built for img_size loaded from it the library's way)."""
    import torch
    from jaxtl.torch_ref import build_torch_model, load_torch_reference

    torch.manual_seed(seed)
    small = build_torch_model(name, source)
    randomize_norm_layers(small, seed)
    randomize_vit(small, seed)
    state = {k: v.clone() for k, v in small.state_dict().items()}
    big = load_torch_reference(name, source, dict(state), img_size=img_size)
    disable_dropout(big)
    return state, big.eval()


@pytest.mark.torch
@pytest.mark.parametrize("name,source,img_size", [
    ("vit_tiny_patch16_224", "timm", 384),
    ("vit_base_patch16_224", "torchvision", 160),   # downsampling, and torchvision's method, cheaply
    pytest.param("vit_base_patch16_224", "timm", 384, marks=pytest.mark.slow),
    pytest.param("vit_base_patch16_224", "torchvision", 384, marks=pytest.mark.slow),
])
def test_parity_resampled_position_embedding(name, source, img_size, record_property):
    import torch

    state, tmodel = _torch_resampled(name, source, img_size, seed=7)
    variables = jaxtl.convert_state_dict(name, state, source=source, img_size=img_size)
    model = jaxtl.create_model(name, source=source, img_size=img_size)
    assert model.img_size == img_size
    x = np.random.default_rng(3).standard_normal((1, img_size, img_size, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tmodel(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda v, x: model.apply(v, x))(variables, jnp.asarray(x))
    err = rel_err(out, ref)
    record_property("parity", err)
    print(f"{name} {source} @ {img_size}: {err:.3g}")
    assert err <= TOLERANCE
    # The converted position embedding is the library's own, to float32 rounding.
    torch_key = "pos_embed" if source == "timm" else "encoder.pos_embedding"
    np.testing.assert_allclose(np.asarray(variables["params"]["pos_embed"]), tmodel.state_dict()[torch_key].numpy(),
                               rtol=0, atol=1e-6)


@pytest.mark.torch
@pytest.mark.parametrize("antialias", [False, True])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("in_hw,out_hw", [((14, 14), (24, 24)), ((14, 14), (10, 10)), ((7, 9), (13, 4)),
                                          ((5, 5), (1, 1)), ((1, 3), (4, 6))])
def test_bicubic_matches_torch_interpolate(in_hw, out_hw, align_corners, antialias):
    import torch
    import torch.nn.functional as F

    x = np.random.default_rng(0).standard_normal((2, 5, *in_hw)).astype(np.float32)   # NCHW
    ref = F.interpolate(torch.from_numpy(x), size=out_hw, mode="bicubic", align_corners=align_corners,
                        antialias=antialias).numpy()
    out = resize_bicubic(x.transpose(0, 2, 3, 1), out_hw, align_corners=align_corners, antialias=antialias)
    assert rel_err(out.transpose(0, 3, 1, 2), ref) < 1e-5


@pytest.mark.torch
def test_resample_pos_embed_matches_timm_and_torchvision():
    import torch
    from timm.layers import resample_abs_pos_embed
    from torchvision.models.vision_transformer import interpolate_embeddings

    pe = np.random.default_rng(1).standard_normal((1, 1 + 14 * 14, 8)).astype(np.float32)
    ref = resample_abs_pos_embed(torch.from_numpy(pe), new_size=(24, 24), num_prefix_tokens=1).numpy()
    out = resample_pos_embed(pe, 24)
    assert out.shape == (1, 1 + 24 * 24, 8) and out.dtype == np.float32
    assert rel_err(out, ref) < 1e-5
    np.testing.assert_array_equal(out[:, 0], pe[:, 0])   # class token kept as is
    ref_tv = interpolate_embeddings(384, 16, {"encoder.pos_embedding": torch.from_numpy(pe)})["encoder.pos_embedding"]
    out_tv = resample_pos_embed(pe, (24, 24), align_corners=True, antialias=False)
    assert rel_err(out_tv, ref_tv.numpy()) < 1e-5
    # Non-square grids and several prefix tokens.
    pe2 = np.random.default_rng(2).standard_normal((1, 2 + 6 * 4, 3)).astype(np.float32)
    ref2 = resample_abs_pos_embed(torch.from_numpy(pe2), new_size=(9, 5), old_size=(6, 4), num_prefix_tokens=2)
    assert rel_err(resample_pos_embed(pe2, (9, 5), 2, old_grid=(6, 4)), ref2.numpy()) < 1e-5


def test_bicubic_weights_rows_sum_to_one():
    for aa in (False, True):
        for ac in (False, True):
            w = bicubic_weights(14, 24, align_corners=ac, antialias=aa)
            np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)
    # Same size, no antialias, no align_corners: the identity.
    np.testing.assert_allclose(bicubic_weights(7, 7), np.eye(7), atol=1e-12)


def test_convert_resamples_pos_embed_to_img_size():
    rng = np.random.default_rng(0)
    _, _, shapes = _params("vit_tiny_patch16_224", num_classes=10)
    # A fake timm state dict with the right names and shapes (PyTorch layout).
    state = {}
    for path, sds in shapes.items():
        key, transform = resolve_key("vit_tiny_patch16_224", "timm", ("params", *path))
        shape = {("params", "pos_embed"): (1, 197, 192)}.get(("params", *path))
        if key in state:
            continue
        if shape is None:
            shape = torch_like(sds.shape, path)
            if "qkv" in key:
                shape = (3 * shape[0],) + tuple(shape[1:])
        state[key] = rng.standard_normal(shape).astype(np.float32)
    variables = jaxtl.convert_state_dict("vit_tiny_patch16_224", state, source="timm", img_size=288)
    pe = variables["params"]["pos_embed"]
    assert pe.shape == (1, 1 + 18 * 18, 192)
    np.testing.assert_allclose(pe, resample_pos_embed(state["pos_embed"], 18), rtol=0, atol=0)
    # q/k/v come from the rows 0:D, D:2D, 2D:3D of the fused tensor.
    qkv = state["blocks.3.attn.qkv.weight"]
    for i, part in enumerate(("query", "key", "value")):
        np.testing.assert_array_equal(variables["params"]["blocks_3"]["attn"][part]["kernel"],
                                      qkv[i * 192:(i + 1) * 192].T)
    # The same weights at 224 are taken as they are.
    v224 = jaxtl.convert_state_dict("vit_tiny_patch16_224", state, source="timm")
    np.testing.assert_array_equal(v224["params"]["pos_embed"], state["pos_embed"])
    # A checkpoint of another width is a wrong shape, not something to resample.
    bad = dict(state, pos_embed=rng.standard_normal((1, 197, 100)).astype(np.float32))
    with pytest.raises(ConversionError, match="pos_embed"):
        jaxtl.convert_state_dict("vit_tiny_patch16_224", bad, source="timm")


def resolve_key(name, source, path):
    from jaxtl.conversion import _ref

    spec, _ = resolve(name)
    return _ref(spec.source(source), path)


def torch_like(shape, path):
    shape = tuple(shape)
    if path[-1] == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return shape


# ---------------------------------------------------------------------------
# Registry, groups, metadata.


def test_registry_entries_and_aliases():
    for name in NAMES:
        spec = jaxtl.get_spec(name)
        d = DEPTH[name]
        assert spec.family == "vit" and spec.default_source == "timm"
        assert spec.group_names == ("embed", *[f"block{i}" for i in range(d)], "norm", "head")
        assert spec.head_path == ("head",)
        assert spec.num_features == WIDTH[name]
        assert spec.preprocessing.mean == (0.5, 0.5, 0.5) and spec.preprocessing.resize_size == 248
        assert spec.sources["timm"].model_name == name
        assert spec.sources["timm"].default_weights().hf_repo.startswith(f"timm/{name}.")
        assert spec.description
    for alias, canonical in (("vit_b_16", "vit_base_patch16_224"), ("vit_l_16", "vit_large_patch16_224")):
        spec, source = resolve(alias)
        assert (spec.name, source) == (canonical, "torchvision")
        src = spec.sources["torchvision"]
        assert src.model_name == alias
        assert src.default_weights().tag == "IMAGENET1K_V1" and src.default_weights().sha256_prefix
    assert set(jaxtl.get_spec("vit_tiny_patch16_224").sources) == {"timm"}
    assert [n for n in jaxtl.list_models("vit_*") if jaxtl.get_spec(n).family == "vit"] == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_parameter_is_in_exactly_one_group_and_blocks_are_ordered(name):
    spec, _, shapes = _params(name, num_classes=7)
    matches = {}
    for path in shapes:
        hits = [g for g, prefixes in spec.layer_groups for p in prefixes if path[:len(p)] == p]
        assert len(hits) == 1, (path, hits)
        matches.setdefault(hits[0], []).append(path)
        assert spec.group_of(path) == hits[0]
    assert set(matches) == set(spec.group_names)   # no empty group
    for i in range(DEPTH[name]):
        assert {p[0] for p in matches[f"block{i}"]} == {f"blocks_{i}"}
    assert {p[0] for p in matches["embed"]} == {"patch_embed", "cls_token", "pos_embed"}
    assert shapes[("head", "kernel")].shape == (WIDTH[name], 7)


@pytest.mark.torch
def test_preprocessing_matches_the_libraries_metadata():
    import timm
    import torchvision.models as tvm

    for name in NAMES:
        spec = jaxtl.get_spec(name)
        cfg = timm.models.get_pretrained_cfg(name)
        weights = spec.sources["timm"].default_weights()
        assert weights.hf_repo == cfg.hf_hub_id
        pre = weights.preprocessing
        assert pre.input_size == cfg.input_size[-1] and pre.interpolation == cfg.interpolation
        assert pre.mean == tuple(cfg.mean) and pre.std == tuple(cfg.std)
        assert pre.resize_size == int(cfg.input_size[-1] / cfg.crop_pct)
    for name, enum in (("vit_base_patch16_224", tvm.ViT_B_16_Weights), ("vit_large_patch16_224", tvm.ViT_L_16_Weights)):
        for w in jaxtl.get_spec(name).sources["torchvision"].weights:
            tw = enum[w.tag]
            assert tw.url == w.url and tw.meta["min_size"] == (224, 224)
            t = tw.transforms()
            pre = w.preprocessing
            assert (pre.input_size, pre.resize_size) == (t.crop_size[0], t.resize_size[0])
            assert pre.interpolation == t.interpolation.value and pre.mean == tuple(t.mean)


# ---------------------------------------------------------------------------
# Behaviour (small images so these are quick).


def _tiny(img_size=32, depth=2, **kwargs):
    """A 2-block ViT-Ti on 32-px images (2 x 2 patches): same code paths, quick to compile."""
    model = jaxtl.create_model("vit_tiny_patch16_224", num_classes=5, img_size=img_size, depth=depth, **kwargs)
    return model, jaxtl.init_variables(model, jaxtl.get_spec("vit_tiny_patch16_224"))


@pytest.fixture(scope="module")
def tiny():
    return _tiny()


def _jit_apply(model):
    return jax.jit(model.apply, static_argnames=("train", "frozen", "features_only"))


def test_bad_inputs_give_clear_errors(tiny):
    with pytest.raises(ConfigError, match="not a multiple of patch_size 16"):
        jaxtl.create_model("vit_tiny_patch16_224", img_size=230)
    with pytest.raises(ConfigError, match="drop_path_rate"):
        jaxtl.create_model("vit_tiny_patch16_224", drop_path_rate=1.5)
    model, variables = tiny
    with pytest.raises(ConfigError, match="built for 32x32 images but got 48x48"):
        model.apply(variables, jnp.zeros((1, 48, 48, 3)))
    with pytest.raises(ConfigError, match="NHWC"):
        model.apply(variables, jnp.zeros((32, 32, 3)))
    with pytest.raises(ConfigError, match="3 channels"):
        model.apply(variables, jnp.zeros((1, 32, 32, 1)))


def test_dropout_only_in_train_mode_and_unfrozen_groups():
    groups = ("embed", "block0", "block1", "norm", "head")    # of the 2-block model
    model, variables = _tiny(drop_rate=0.5, pos_drop_rate=0.3, proj_drop_rate=0.3, attn_drop_rate=0.3,
                             drop_path_rate=0.5)
    apply = _jit_apply(model)
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    # XLA:CPU compiles threefry bit generation slowly (8 s for this model); rbg takes 2-3 s.
    rngs = {"dropout": jax.random.key(1, impl="rbg")}
    evals = apply(variables, x)

    def train_with_only(active):
        return apply(variables, x, train=True, frozen=tuple(g for g in groups if g not in active), rngs=rngs)

    # Every group frozen: inference mode even with train=True.
    np.testing.assert_allclose(train_with_only(()), evals, rtol=1e-6, atol=1e-6)
    # One unfrozen group: its dropout (embed: position dropout; block: attention,
    # projection, MLP dropout and drop-path; head: dropout before the head) is on.
    for active in ("embed", "block1", "head"):
        assert not np.allclose(train_with_only((active,)), evals), active


def test_features_only_is_the_head_input(tiny):
    model, variables = tiny
    x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
    apply = _jit_apply(model)
    with jax.default_matmul_precision("highest"):
        feats = apply(variables, x, features_only=True)
        logits = apply(variables, x)
        head = variables["params"]["head"]
        expected = feats @ head["kernel"] + head["bias"]
    assert feats.shape == (2, 192) and feats.dtype == jnp.float32
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_axis_name_is_accepted(tiny):
    f32, variables = tiny
    model = jaxtl.create_model("vit_tiny_patch16_224", num_classes=5, img_size=32, depth=2, dtype="bfloat16",
                               axis_name="batch")
    bf16_init = jaxtl.init_variables(model, jaxtl.get_spec("vit_tiny_patch16_224"))
    assert jax.tree.structure(bf16_init) == jax.tree.structure(variables)
    assert {x.dtype for x in jax.tree.leaves(bf16_init)} == {jnp.dtype("float32")}
    assert "batch_stats" not in variables
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    out = _jit_apply(model)(variables, x)
    assert out.dtype == jnp.float32 and out.shape == (2, 5)
    ref = _jit_apply(f32)(variables, x)
    assert rel_err(out, ref) < 0.1


def test_layer_norm_variance_is_two_pass():
    """E[x^2] - E[x]^2 (Flax's fast variance) cancels catastrophically when |mean| >> std;
    PyTorch's LayerNorm does not, and the residual stream can have such a mean."""
    from jaxtl.models.vit import _layer_norm

    x = (10.0 + 0.01 * np.random.default_rng(0).standard_normal((4, 64))).astype(np.float32)
    ln = _layer_norm(1e-6, jnp.float32, "ln")
    out = ln.apply(ln.init(jax.random.key(0), x), x)
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    assert rel_err(out, ref) < 1e-3


@pytest.mark.torch
def test_gradients_match_timm():
    """One cross-entropy backward pass against timm's autograd, every parameter.

    jaxtl's LayerNorm has a hand-written backward (jaxtl.ops.layer_norm); PyTorch's
    gradients, converted to Flax's tree with the weight converter itself, are the
    reference. Randomised as in the parity tests (LayerNorm affine params, peaked
    attention, small embedding stream)."""
    import torch
    from jaxtl.torch_ref import build_torch_model

    name, source, size, batch = "vit_tiny_patch16_224", "timm", 64, 4
    torch.manual_seed(3)
    tmodel = build_torch_model(name, source, img_size=size)
    randomize_norm_layers(tmodel, 3)
    randomize_vit(tmodel, 3)
    disable_dropout(tmodel)
    variables = jaxtl.convert_state_dict(name, tmodel.state_dict(), source=source, img_size=size)
    model = jaxtl.create_model(name, source=source, img_size=size)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((batch, size, size, 3)).astype(np.float32)
    labels = rng.integers(0, 1000, batch)

    tmodel.train()
    loss = torch.nn.functional.cross_entropy(tmodel(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())),
                                             torch.from_numpy(labels))
    loss.backward()
    torch_grads = {k: p.grad.detach().clone() for k, p in tmodel.named_parameters()}
    want = traverse_util.flatten_dict(
        jaxtl.convert_state_dict(name, torch_grads, source=source, img_size=size)["params"], sep="/")

    def jax_loss(params):
        logits = model.apply({"params": params}, jnp.asarray(x), train=True)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.asarray(labels)[:, None], 1))

    with jax.default_matmul_precision("highest"):
        got = traverse_util.flatten_dict(jax.jit(jax.grad(jax_loss))(variables["params"]), sep="/")
    assert got.keys() == want.keys()
    # A bias on the keys adds q.b to every logit of a query's row, which softmax
    # ignores: its true gradient is 0 and both sides hold float32 noise (~1e-9).
    zero = [k for k in want if k.endswith("attn/key/bias")]
    scale = max(float(np.abs(v).max()) for v in want.values())
    assert max(float(np.abs(side[k]).max()) for k in zero for side in (got, want)) < 1e-5 * scale
    errs = {k: rel_err(got[k], want[k]) for k in want if k not in zero}
    worst = max(errs, key=errs.get)
    print(f"worst gradient leaf {worst}: {errs[worst]:.2e}")
    assert errs[worst] <= TOLERANCE, f"gradient of {worst} differs: {errs[worst]:.2e}"
    assert any(float(np.abs(want[k]).max()) > 0 for k in want if "norm" in k)
