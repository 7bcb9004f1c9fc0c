"""The converter accounts for every key, and says which one is wrong."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxtl
from jaxtl.errors import ConfigError, ConversionError, UnknownModelError


def resnet18_state(num_classes: int = 1000) -> dict[str, np.ndarray]:
    """A complete resnet18 state dict in torchvision naming, without torch."""
    return state_in_torch_names("resnet18", "torchvision", num_classes)


def state_in_torch_names(name: str, source: str, num_classes: int = 1000) -> dict[str, np.ndarray]:
    """A complete random state dict of ``name`` in ``source``'s names and layouts, without torch."""
    from flax import traverse_util

    from jaxtl.conversion import _ref
    from jaxtl.models import abstract_variables
    from jaxtl.registry import conv1x1_to_dense

    spec = jaxtl.get_spec(name)
    src = spec.source(source)
    model = jaxtl.create_model(name, num_classes, source=source)
    shapes = traverse_util.flatten_dict(abstract_variables(model, spec))
    rng = np.random.default_rng(0)
    out = {}
    for path, sds in shapes.items():
        key, transform = _ref(src, path)
        shape = sds.shape
        if len(shape) == 4:
            shape = (shape[3], shape[2], shape[0], shape[1])
        elif len(shape) == 2:
            shape = (shape[1], shape[0], 1, 1) if transform is conv1x1_to_dense else (shape[1], shape[0])
        out[key] = rng.standard_normal(shape).astype(np.float32)
        if key.endswith(".running_mean"):
            out[key.replace("running_mean", "num_batches_tracked")] = np.array(3, np.int64)
    return out


def test_unknown_backbone_lists_close_names():
    with pytest.raises(UnknownModelError, match="did you mean resnet50"):
        jaxtl.create_model("resnet05")
    with pytest.raises(UnknownModelError, match="unknown backbone 'restnet18'.*resnet18"):
        jaxtl.convert_state_dict("restnet18", {})


def test_list_models():
    names = jaxtl.list_models()
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(names)
    assert names == sorted(names)
    assert jaxtl.list_models("resnet1*") == ["resnet101", "resnet152", "resnet18"]


def test_complete_state_dict_converts():
    v = jaxtl.convert_state_dict("resnet18", resnet18_state())
    assert set(v) == {"params", "batch_stats"}
    assert v["params"]["fc"]["kernel"].shape == (512, 1000)


def test_missing_key_is_named():
    state = resnet18_state()
    del state["layer2.1.bn2.running_var"]
    with pytest.raises(ConversionError, match=r"1 missing key\(s\): layer2\.1\.bn2\.running_var"):
        jaxtl.convert_state_dict("resnet18", state)


def test_unexpected_key_is_named():
    state = resnet18_state()
    state["layer5.0.conv1.weight"] = np.zeros((1, 1, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"1 unexpected key\(s\): layer5\.0\.conv1\.weight"):
        jaxtl.convert_state_dict("resnet18", state)


def test_wrong_shape_is_named():
    state = resnet18_state()
    state["layer1.0.conv1.weight"] = np.zeros((64, 64, 1, 1), np.float32)
    with pytest.raises(ConversionError, match=r"wrong shape.*layer1\.0\.conv1\.weight \(64, 64, 1, 1\) "
                                              r"\(model needs \(64, 64, 3, 3\)\)"):
        jaxtl.convert_state_dict("resnet18", state)


def test_other_architecture_is_refused():
    from test_conversion import resnet18_state as r18

    with pytest.raises(ConversionError, match="missing key.*another architecture"):
        jaxtl.convert_state_dict("resnet50", r18())


def test_head_keep_and_new():
    state = resnet18_state()
    with pytest.raises(ConversionError, match="head has 1000 classes but num_classes=10.*head='new'"):
        jaxtl.convert_state_dict("resnet18", state, num_classes=10)
    v = jaxtl.convert_state_dict("resnet18", state, head="new", num_classes=10, seed=3)
    assert v["params"]["fc"]["kernel"].shape == (512, 10)
    assert np.all(v["params"]["fc"]["bias"] == 0)
    np.testing.assert_array_equal(v["params"]["layer1_0"]["conv1"]["kernel"],
                                  state["layer1.0.conv1.weight"].transpose(2, 3, 1, 0))
    again = jaxtl.convert_state_dict("resnet18", state, head="new", num_classes=10, seed=3)
    np.testing.assert_array_equal(v["params"]["fc"]["kernel"], again["params"]["fc"]["kernel"])
    # A headless checkpoint (e.g. a feature extractor) is fine for a new head only.
    headless = {k: a for k, a in state.items() if not k.startswith("fc.")}
    jaxtl.convert_state_dict("resnet18", headless, head="new", num_classes=4)
    with pytest.raises(ConversionError, match="no classifier"):
        jaxtl.convert_state_dict("resnet18", headless)
    with pytest.raises(ConfigError, match="needs num_classes"):
        jaxtl.convert_state_dict("resnet18", state, head="new")


def test_unknown_source():
    with pytest.raises(ConfigError, match="known sources: timm, torchvision"):
        jaxtl.convert_state_dict("resnet18", resnet18_state(), source="keras")


def test_non_tensor_values_are_refused():
    state = resnet18_state()
    state["fc.weight"] = "hello"
    with pytest.raises(jaxtl.WeightsError, match="'fc.weight' is a str"):
        jaxtl.convert_state_dict("resnet18", state)


# --- the command line ------------------------------------------------------------


def run_convert(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "jaxtl.convert", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


@pytest.mark.torch
@pytest.mark.parametrize("source,suffix", [("torchvision", ".pth"), ("timm", ".safetensors")])
def test_convert_cli_verify_and_load(tmp_path, source, suffix):
    import torch

    from jaxtl.torch_ref import build_torch_model

    torch.manual_seed(0)
    tmodel = build_torch_model("resnet18", source, num_classes=7)
    weights = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save(tmodel.state_dict(), weights)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tmodel.state_dict().items()}, weights)
    out = tmp_path / "converted"
    r = run_convert("--backbone", "resnet18", "--source", source, "--weights-file", weights, "--out", out, "--verify")
    assert r.returncode == 0, r.stderr
    assert "verify: max |delta|" in r.stdout and "OK" in r.stdout
    model, variables, meta = jaxtl.load_model(out)
    assert meta["backbone"] == "resnet18" and meta["source"] == source and meta["num_classes"] == 7
    assert meta["weights"]["file"] == weights.name and len(meta["weights"]["sha256"]) == 64
    x = np.random.default_rng(1).standard_normal((1, 64, 64, 3)).astype(np.float32)
    ref = tmodel.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy()
    ours = jax.jit(lambda v, x: model.apply(v, x))(variables, x)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4 * np.abs(ref).max())


def test_convert_cli_errors_are_one_line(tmp_path):
    r = run_convert("--backbone", "resnet5", "--out", tmp_path / "o")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "unknown backbone 'resnet5'" in r.stderr
    r = run_convert("--backbone", "resnet18", "--weights-file", tmp_path / "missing.pth", "--out", tmp_path / "o")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = run_convert("--backbone", "resnet50", "--no-download", "--out", tmp_path / "o")
    assert r.returncode == 2 and "resnet50-11ad3fa6.pth" in r.stderr and "--weights-file" in r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.torch
def test_convert_cli_resamples_vit_and_verifies_against_the_library(tmp_path):
    """--img-size: jaxtl's position-embedding resampling against timm's own, through the CLI."""
    import torch
    from safetensors.torch import save_file

    from jaxtl.torch_ref import build_torch_model

    torch.manual_seed(0)
    tmodel = build_torch_model("vit_tiny_patch16_224", "timm")
    with torch.no_grad():
        tmodel.pos_embed.normal_(0, 0.5)  # timm initialises it tiny; make resampling matter
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tmodel.state_dict().items()}, weights)
    r = run_convert("--backbone", "vit_tiny_patch16_224", "--source", "timm", "--weights-file", weights,
                    "--img-size", "288", "--out", tmp_path / "vit288", "--verify")
    assert r.returncode == 0, r.stderr
    assert "at 288 px: OK" in r.stdout
    model, variables, meta = jaxtl.load_model(tmp_path / "vit288")
    assert meta["model_kwargs"] == {"img_size": 288} and meta["preprocessing"]["input_size"] == 288
    assert variables["params"]["pos_embed"].shape[1] == 1 + 18 * 18


def test_a_model_built_for_other_weights_is_refused_not_silently_off(tmp_path):
    """timm's MobileNetV3 uses BatchNorm eps 1e-5, torchvision's 1e-3: converting timm's weights for the name's
    default (torchvision) model would give other logits without a word, so it is refused; one call returns both."""
    model = jaxtl.create_model("mobilenet_v3_small", num_classes=10, source="timm")
    state = state_in_torch_names("mobilenet_v3_small", "timm", 10)
    with pytest.raises(jaxtl.ConversionError, match=r"bn_epsilon, bn_momentum differ .*from_state_dict"):
        jaxtl.convert_state_dict("mobilenet_v3_small", state, source="timm")
    wrong = jaxtl.create_model("mobilenet_v3_small", num_classes=10)   # torchvision's, the name's default
    with pytest.raises(jaxtl.ConversionError, match=r"not built for .*bn_epsilon=0.001 where they need 1e-05"):
        jaxtl.convert_state_dict("mobilenet_v3_small", state, source="timm", model=wrong)
    variables = jaxtl.convert_state_dict("mobilenet_v3_small", state, source="timm", model=model)
    built, same = jaxtl.from_state_dict("mobilenet_v3_small", state, source="timm")
    assert built.bn_epsilon == 1e-5 and jax.tree.all(jax.tree.map(np.array_equal, variables, same))
