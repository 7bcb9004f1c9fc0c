"""DINOv2, CLIP and SigLIP image towers against timm (random weights), at the 1e-5 bar.

These families are jaxtl's VisionTransformer with timm's options (layer
scale, registers, pre-norm, QuickGELU / tanh GELU, SwiGLU, attention
pooling, the CLIP projection). Their features are not timm's model output
for every family (DINOv2's linear probe reads the class token and the patch
mean), so the reference is what each family's ``reference_features``
computes from the timm model, and the logits are a random head on it.

Every parameter a library initialises to zero or to a constant (biases,
layer-scale gammas, tokens, the MAP query, LayerNorm affines) is randomised,
so a swapped or missing term shows. Dropout is off: train and eval mode are
then the same computation on both sides, and both are compared.

``depth=2`` builds the same network with two blocks (timm and jaxtl accept
it alike): the giant DINOv2 (SwiGLU) and the so400m SigLIP towers are
checked that way in the default suite, at full depth under --all-variants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxtl
from jaxtl.errors import ConfigError
from jaxtl.registry import resolve
from parity import disable_dropout, randomize_norm_layers, rel_err

TOLERANCE = 1e-5
NUM_CLASSES = 5

FAMILIES = ("dinov2", "clip", "siglip")
ALL = [n for n in jaxtl.list_models() if resolve(n)[0].family in FAMILIES]
# (name, model kwargs, image size) run by default; the rest of ALL under --all-variants.
DEFAULT = [
    ("vit_small_patch14_dinov2", {}, 56),
    ("vit_small_patch14_reg4_dinov2", {}, 42),
    ("vit_giant_patch14_dinov2", {"depth": 2}, 28),
    ("vit_base_patch32_clip_224", {}, 64),
    ("vit_base_patch16_clip_quickgelu_224", {"depth": 2}, 32),
    ("vit_base_patch16_siglip_224", {}, 48),
    ("vit_so400m_patch16_siglip_256", {"depth": 2}, 32),
]


# The embedding stream's std ~1e-2 (variance ~1e-4), so the LayerNorm eps shows: the other eps (1e-5 vs 1e-6)
# gives 1.8e-3 (DINOv2-S), 1.1e-2 (CLIP B/32), 3e-5 (SigLIP B/16) against ~7e-7 when right.
EMBED_SCALE = 0.01


def randomize_foundation(model, seed: int) -> None:
    """Random LayerNorms, biases, layer scales, tokens, position embedding and MAP query; a small embedding."""
    import torch

    randomize_norm_layers(model, seed)
    disable_dropout(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", "gamma")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if name.endswith("gamma") else 0.0))
            elif name == "attn_pool.latent":
                p.copy_(torch.randn(p.shape, generator=g))
            elif name in ("cls_token", "reg_token", "pos_embed"):
                p.copy_(torch.randn(p.shape, generator=g) * EMBED_SCALE)
            elif name == "patch_embed.proj.weight":
                p.mul_(EMBED_SCALE)


def _torch_model(name: str, img_size: int, seed: int, **kwargs):
    import torch
    from jaxtl.torch_ref import build_torch_model

    torch.manual_seed(seed)
    model = build_torch_model(name, "timm", img_size=img_size, **kwargs)
    randomize_foundation(model, seed)
    return model.eval()


def _reference(name: str, tmodel, x: np.ndarray):
    """(features, torch input tensor) from the timm model: what features_only must give."""
    import torch

    src = resolve(name)[0].source("timm")
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        feats = src.reference_features(tmodel, xt) if src.reference_features else tmodel(xt)
    return feats.numpy()


def _images(size: int, seed: int, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, size, size, 3)).astype(np.float32)


def _check(name: str, kwargs: dict, size: int, seed: int = 0) -> dict:
    tmodel = _torch_model(name, size, seed, **kwargs)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    model, variables = jaxtl.from_state_dict(name, state, head="new", num_classes=NUM_CLASSES, seed=seed,
                                             img_size=size, **kwargs)
    x = _images(size, seed)
    ref = _reference(name, tmodel, x)
    head = variables["params"]["head"]
    ref_logits = ref @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
    errors = {}
    with jax.default_matmul_precision("highest"):
        for train in (False, True):
            feats = jax.jit(lambda v, x: model.apply(v, x, train=train, features_only=True))(variables, x)
            logits = jax.jit(lambda v, x: model.apply(v, x, train=train))(variables, x)
            errors[f"features_{'train' if train else 'eval'}"] = rel_err(feats, ref)
            errors[f"logits_{'train' if train else 'eval'}"] = rel_err(logits, ref_logits)
    return errors


@pytest.mark.torch
@pytest.mark.parametrize("name,kwargs,size", DEFAULT)
def test_parity_with_timm(name, kwargs, size, record_property):
    errors = _check(name, kwargs, size)
    record_property("parity", str(errors))
    print(name, kwargs, size, {k: f"{v:.2g}" for k, v in errors.items()})
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.variants
@pytest.mark.parametrize("name", ALL)
def test_parity_with_timm_every_variant(name, record_property):
    spec = jaxtl.get_spec(name)
    patch = jaxtl.create_model(name).patch_size
    errors = _check(name, {}, 2 * patch, seed=3)
    record_property("parity", str(errors))
    print(name, {k: f"{v:.2g}" for k, v in errors.items()}, spec.family)
    assert max(errors.values()) <= TOLERANCE, errors


# ---------------------------------------------------------------------------
# Gradients, one model per family: d(features . r)/d(images) and /d(some weights).


GRADIENT_LEAVES = [("patch_embed", "kernel"), ("blocks_0", "mlp", "fc1", "kernel"), ("norm", "scale"),
                   ("blocks_1", "ls2", "gamma"), ("attn_pool", "latent"), ("proj", "kernel")]


def _torch_gradients(name, tmodel, x: np.ndarray, r: np.ndarray, dtype) -> dict:
    """Gradients of sum(features * r) w.r.t. the images and every parameter, in ``dtype``, as float64 numpy."""
    import torch

    model = tmodel.to(dtype)
    model.zero_grad()
    src = resolve(name)[0].source("timm")
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype).requires_grad_(True)
    feats = src.reference_features(model, xt) if src.reference_features else model(xt)
    (feats * torch.from_numpy(r).to(dtype)).sum().backward()
    grads = {k: p.grad.double().numpy().copy() for k, p in model.named_parameters()}
    grads["images"] = xt.grad.double().numpy().transpose(0, 2, 3, 1)
    model.float()
    return grads


@pytest.mark.torch
@pytest.mark.parametrize("name,kwargs,size", [DEFAULT[1], DEFAULT[4], DEFAULT[6]])
def test_gradients_match_timm(name, kwargs, size):
    """Against timm in float64; the bound is 1e-5, or twice timm's own float32 error where that is larger
    (the MAP query's gradient: timm's float32 is 1.1e-3 from its float64, jaxtl 5e-4)."""
    import torch

    tmodel = _torch_model(name, size, seed=1, **kwargs)
    state = {k: v.detach().numpy().copy() for k, v in tmodel.state_dict().items()}
    model, variables = jaxtl.from_state_dict(name, state, head="new", num_classes=NUM_CLASSES, img_size=size,
                                             **kwargs)
    x = _images(size, 1)
    width = jaxtl.get_spec(name).num_features
    r = np.random.default_rng(2).standard_normal((x.shape[0], width)).astype(np.float32)
    exact = _torch_gradients(name, tmodel, x, r, torch.float64)
    single = _torch_gradients(name, tmodel, x, r, torch.float32)

    def objective(params, images):
        f = model.apply({**variables, "params": params}, images, train=True, features_only=True)
        return jnp.sum(f * r)

    with jax.default_matmul_precision("highest"):
        g_params, g_x = jax.jit(jax.grad(objective, argnums=(0, 1)))(variables["params"], x)
    flat = traverse_util.flatten_dict(g_params)
    src = resolve(name)[0].source("timm")
    ours = {"images": (np.asarray(g_x), "images")}
    for path in GRADIENT_LEAVES:
        if path in flat:
            mapped = src.key_map(("params", *path))
            ours["/".join(path)] = (np.asarray(flat[path]), mapped[0] if isinstance(mapped, tuple) else mapped)
    errors = {}
    for leaf, (value, key) in ours.items():
        ref, ref32 = exact[key], single[key]
        if leaf.endswith("kernel"):
            ref, ref32 = [a.transpose(2, 3, 1, 0) if a.ndim == 4 else a.T for a in (ref, ref32)]
        bound = max(TOLERANCE, 2 * rel_err(ref32, ref))
        errors[leaf] = (rel_err(value, ref.reshape(value.shape)), bound)
    print(name, {k: f"{e:.2g} (bound {b:.2g})" for k, (e, b) in errors.items()})
    assert len(errors) >= 4
    assert all(e <= b for e, b in errors.values()), errors


# ---------------------------------------------------------------------------
# Another resolution: position embeddings resampled the way timm's checkpoint filter does.


@pytest.mark.torch
@pytest.mark.parametrize("name,table_size,size", [
    ("vit_small_patch14_dinov2", 518, 224),          # DINOv2's 37 x 37 table at 224 px
    ("vit_small_patch14_reg4_dinov2", 70, 42),       # no position for the prefix tokens
    ("vit_base_patch16_siglip_224", 224, 256),       # SigLIP at 256 from its 224 table
])
def test_parity_resampled_position_embedding(name, table_size, size):
    from jaxtl.torch_ref import load_torch_reference

    kwargs = {"depth": 2} if "siglip" in name else {}
    small = _torch_model(name, table_size, seed=5, **kwargs)
    state = {k: v.clone() for k, v in small.state_dict().items()}
    tmodel = load_torch_reference(name, "timm", dict(state), img_size=size, **kwargs)
    disable_dropout(tmodel)
    variables = jaxtl.convert_state_dict(name, {k: v.numpy() for k, v in state.items()}, head="new",
                                         num_classes=NUM_CLASSES, img_size=size, **kwargs)
    np.testing.assert_allclose(np.asarray(variables["params"]["pos_embed"]), tmodel.pos_embed.detach().numpy(),
                               rtol=0, atol=1e-6)
    model = jaxtl.create_model(name, NUM_CLASSES, img_size=size, **kwargs)
    x = _images(size, 4, batch=1)
    with jax.default_matmul_precision("highest"):
        feats = jax.jit(lambda v, x: model.apply(v, x, features_only=True))(variables, x)
    err = rel_err(feats, _reference(name, tmodel, x))
    print(f"{name} {table_size} -> {size} px: {err:.2g}")
    assert err <= TOLERANCE


# ---------------------------------------------------------------------------
# DINOv2's 4-block linear probe.


@pytest.mark.torch
def test_dinov2_probe_blocks_match_its_linear_evaluation():
    import torch

    name, size = "vit_small_patch14_reg4_dinov2", 28
    tmodel = _torch_model(name, size, seed=2)
    state = {k: v.numpy() for k, v in tmodel.state_dict().items()}
    model, variables = jaxtl.from_state_dict(name, state, head="new", num_classes=NUM_CLASSES, img_size=size,
                                             probe_blocks=4)
    x = _images(size, 2)
    with torch.no_grad():   # DINOv2's create_linear_input(n_last_blocks=4, avgpool=True), written out
        h = tmodel.patch_embed(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        h = tmodel.norm_pre(tmodel._pos_embed(h))
        outputs = []
        for block in tmodel.blocks:
            h = block(h)
            outputs.append(tmodel.norm(h))
        last = outputs[-4:]
        ref = torch.cat([o[:, 0] for o in last] + [last[-1][:, tmodel.num_prefix_tokens:].mean(1)], dim=-1)
    with jax.default_matmul_precision("highest"):
        feats = model.apply(variables, x, features_only=True)
    assert feats.shape == (2, 5 * 384)
    assert rel_err(feats, ref.numpy()) <= TOLERANCE
    assert variables["params"]["head"]["kernel"].shape == (5 * 384, NUM_CLASSES)


# ---------------------------------------------------------------------------
# Registry, names and bad input.


def test_families_are_listed_with_their_preprocessing():
    names = jaxtl.list_models()
    for family, example in [("dinov2", "vit_large_patch14_reg4_dinov2"), ("clip", "vit_large_patch14_clip_224"),
                            ("siglip", "vit_so400m_patch14_siglip_378")]:
        assert example in names and jaxtl.get_spec(example).family == family
    dino = jaxtl.get_spec("vit_small_patch14_dinov2").preprocessing_for()
    assert (dino.input_size, dino.resize_size, dino.interpolation) == (518, 518, "bicubic")
    clip = jaxtl.get_spec("vit_base_patch16_clip_quickgelu_224").preprocessing_for(tag="openai")
    assert clip.mean == (0.48145466, 0.4578275, 0.40821073) and clip.resize_size == int(224 / 0.9)
    siglip = jaxtl.get_spec("vit_base_patch16_siglip_256").preprocessing_for(tag="webli")
    assert (siglip.input_size, siglip.mean) == (256, (0.5, 0.5, 0.5))
    # timm's "model.tag" names resolve to the model, and the tag picks the weights.
    assert jaxtl.get_spec("vit_small_patch14_dinov2.lvd142m").name == "vit_small_patch14_dinov2"
    src = jaxtl.get_spec("vit_base_patch16_clip_quickgelu_224").source("timm")
    assert src.find_weights("openai").hf_repo == "timm/vit_base_patch16_clip_224.openai"


@pytest.mark.torch
def test_every_tag_is_timms_with_timms_preprocessing():
    """Each registered weights tag exists in timm under the name, and its eval transform is timm's own."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg
    from torchvision import transforms as T

    for name in ALL:
        src = jaxtl.get_spec(name).source("timm")
        published = set(timm.list_pretrained(f"{name}.*"))
        for w in src.weights:
            assert f"{name}.{w.tag}" in published, (name, w.tag)
            cfg = get_pretrained_cfg(f"{name}.{w.tag}")
            assert w.hf_repo == cfg.hf_hub_id and w.num_classes == 0 and w.class_names is None
            steps = create_transform(**resolve_data_config({}, pretrained_cfg=cfg.to_dict()),
                                     is_training=False).transforms
            resize = next(t for t in steps if isinstance(t, T.Resize))
            crop = next(t for t in steps if isinstance(t, T.CenterCrop))
            pre = w.preprocessing
            assert (pre.resize_size, pre.input_size, pre.interpolation) == \
                (resize.size, crop.size[0], resize.interpolation.value), (name, w.tag)
            assert np.allclose(pre.mean, cfg.mean) and np.allclose(pre.std, cfg.std), (name, w.tag)
            assert jaxtl.create_model(name).img_size == cfg.input_size[1], name


def test_layer_decay_is_per_block():
    """timm's --layer-decay over DINOv2's groups: the head and the pool/norm group at 1, then one factor per block."""
    from jaxtl.strategies import Strategy

    for name in ("vit_small_patch14_dinov2", "vit_base_patch16_siglip_224"):
        spec = jaxtl.get_spec(name)
        mults = Strategy("finetune", layer_decay=0.5).lr_multipliers(spec)
        groups = spec.group_names
        assert groups[0] == "embed" and groups[-1] == "head" and len(groups) == 12 + 3
        assert [mults[g] for g in groups] == [0.5 ** (13 - i) for i in range(13)] + [1.0, 1.0]


def test_train_config_takes_timm_name_with_tag():
    from jaxtl.training.config import TrainConfig

    cfg = TrainConfig(backbone="vit_small_patch14_dinov2.lvd142m")
    assert (cfg.backbone, cfg.weights_tag) == ("vit_small_patch14_dinov2", "lvd142m")
    with pytest.raises(ConfigError, match="give one of them"):
        TrainConfig(backbone="vit_small_patch14_dinov2.lvd142m", weights_tag="other")


def test_bad_options_are_one_line_errors():
    with pytest.raises(ConfigError, match="multiple of patch_size 14"):
        jaxtl.create_model("vit_small_patch14_dinov2", img_size=224 + 7)
    with pytest.raises(ConfigError, match="probe_blocks"):
        jaxtl.create_model("vit_base_patch16_siglip_224", probe_blocks=4)
    with pytest.raises(ConfigError, match="exceeds"):
        jaxtl.create_model("vit_small_patch14_dinov2", probe_blocks=13)


def test_headless_checkpoint_needs_num_classes(tmp_path):
    """DINOv2/SigLIP files have no classifier: loading them asks for the number of classes."""
    from safetensors.numpy import save_file

    name = "vit_small_patch14_dinov2"
    model = jaxtl.create_model(name, img_size=28, depth=1)
    from jaxtl.models import abstract_variables
    from jaxtl.conversion import _torch_like_shape

    spec, src = jaxtl.get_spec(name), jaxtl.get_spec(name).source("timm")
    state = {}
    for path, sds in traverse_util.flatten_dict(abstract_variables(model, spec)).items():
        if path[1] == "head":
            continue
        mapped = src.key_map(path)
        key = mapped[0] if isinstance(mapped, tuple) else mapped
        shape = _torch_like_shape(sds.shape, path)
        if "qkv" in key:
            shape = (3 * shape[0],) + tuple(shape[1:])
        state[key] = np.zeros(shape, np.float32)
    file = tmp_path / "model.safetensors"
    save_file(state, str(file))
    with pytest.raises(ConfigError, match="no classifier.*num_classes"):
        jaxtl.load_pretrained(name, weights_file=file, img_size=28, depth=1, use_cache=False)
    model, variables, info = jaxtl.load_pretrained(name, weights_file=file, img_size=28, depth=1, num_classes=3,
                                                   use_cache=False)
    assert variables["params"]["head"]["kernel"].shape == (2 * 384, 3) and info.checkpoint_num_classes == 0
    assert model.apply(variables, np.zeros((1, 28, 28, 3), np.float32)).shape == (1, 3)
    # A file of another architecture is named as such, not as a backbone without a classifier.
    with pytest.raises(jaxtl.ConversionError, match="another architecture"):
        jaxtl.load_pretrained("vit_base_patch16_siglip_224", weights_file=file, num_classes=3, use_cache=False)


def test_predict_refuses_a_backbone_without_classifier(tmp_path, monkeypatch):
    from jaxtl import pretrained
    from jaxtl.errors import HeadlessCheckpoint
    from jaxtl.predict import Predictor

    def headless(*args, **kwargs):
        raise HeadlessCheckpoint("no classifier")

    monkeypatch.setattr(pretrained, "load_pretrained", headless)
    with pytest.raises(ConfigError, match="no classifier, so there are no classes to predict; train a head"):
        Predictor.from_pretrained("vit_small_patch14_dinov2")


# ---------------------------------------------------------------------------
# The command lines, on a timm-format file of random DINOv2 weights (518-px table).


@pytest.mark.torch
@pytest.mark.slow
def test_linear_probe_cli_and_convert_verify_on_a_dinov2_file(tmp_path):
    import os
    import subprocess
    import sys

    from safetensors.torch import save_file

    tmodel = _torch_model("vit_small_patch14_dinov2", 518, seed=6)
    weights = tmp_path / "dinov2.safetensors"
    save_file({k: v.contiguous() for k, v in tmodel.state_dict().items()}, weights)

    def run(module, *args):
        r = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                           timeout=900, env=dict(os.environ))
        assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        return r

    out = tmp_path / "probe"
    r = run("jaxtl.train", "--backbone", "vit_small_patch14_dinov2.lvd142m", "--weights-file", weights,
            "--strategy", "feature_extract", "--cache-features", "--data", "digits", "--img-size", "56",
            "--probe-blocks", "4", "--limit-per-class", "10", "--epochs", "2", "--batch-size", "16",
            "--no-progress", "--output", out)
    assert "new 10-class head" in r.stdout + r.stderr
    model, variables, meta = jaxtl.load_model(out)
    assert meta["backbone"] == "vit_small_patch14_dinov2"
    assert meta["model_kwargs"] == {"img_size": 56, "probe_blocks": 4}
    assert variables["params"]["head"]["kernel"].shape == (5 * 384, 10)   # 4 class tokens + the patch mean
    assert variables["params"]["pos_embed"].shape == (1, 1 + 4 * 4, 384)   # resampled from 37 x 37

    r = run("jaxtl.convert", "--backbone", "vit_small_patch14_dinov2", "--weights-file", weights, "--img-size", "56",
            "--num-classes", "3", "--out", tmp_path / "converted", "--verify")
    assert "max |features|" in r.stdout and "at 56 px: OK" in r.stdout
    bad = subprocess.run([sys.executable, "-m", "jaxtl.convert", "--backbone", "vit_small_patch14_dinov2",
                          "--weights-file", str(weights), "--out", str(tmp_path / "x")], capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode != 0 and "no classifier" in bad.stderr and "--num-classes" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    bad = subprocess.run([sys.executable, "-m", "jaxtl.train", "--backbone", "resnet18", "--weights", "none",
                          "--probe-blocks", "4", "--img-size", "32", "--limit-per-class", "2", "--no-progress",
                          "--output", str(tmp_path / "r18")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--probe-blocks is for backbones" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and not (tmp_path / "r18").exists()
