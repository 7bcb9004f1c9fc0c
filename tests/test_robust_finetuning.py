"""LoRA, LP-FT, WiSE-FT and L2-SP: what each one claims, on the offline pretrained MobileNetV2 and digits.

Runs go through ``jaxtl.train`` in this process (small: 32 px, 8 images per class, batch 16), and the
checks read what a user gets: the exported model, ``metrics.jsonl`` and the command lines.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

import jaxtl
from jaxtl.errors import ConfigError, Interrupted
from jaxtl.lora import LORA_KEY, apply_factors, init_factors, select_targets
from jaxtl.runtime import NO_COMPILE_CACHE
from jaxtl.training.config import TrainConfig
from jaxtl.training.loop import Trainer
from jaxtl.wise_ft import interpolate

RUN = dict(backbone="mobilenet_v2", data="digits", img_size=32, limit_per_class=8, batch_size=16,
           optim=jaxtl.OptimConfig(opt="sgd", lr=0.05), epochs=2, progress=False, seed=1)
EPS32 = float(np.finfo(np.float32).eps)
EMA = dict(model_ema=True, model_ema_decay=0.9)  # the LoRA runs keep an EMA too: the resume must restore it


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    monkeypatch.setenv(NO_COMPILE_CACHE, "1")  # jaxtl.train() must not switch this test process's JAX cache on


def run(out: Path, **options):
    return jaxtl.train(TrainConfig(**{**RUN, "output": str(out), **options}), log=lambda line: None)


def flat(variables: dict) -> dict:
    return traverse_util.flatten_dict(variables)


def exported(out: Path) -> dict:
    return flat(jaxtl.load_model(out)[1])


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def pretrained():
    """The run's starting backbone (its head is new: the comparisons leave it out)."""
    _, variables, _ = jaxtl.load_pretrained("mobilenet_v2", num_classes=10)
    return flat(variables)


def is_head(path: tuple) -> bool:
    return path[:2] == ("params", "classifier")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "whole"
    run(out, strategy="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, **EMA)
    return out


# --- LoRA ----------------------------------------------------------------------------


def test_lora_defaults_are_attention_projections_or_1x1_kernels():
    vit = jaxtl.get_spec("vit_tiny_patch16_224")
    params = jaxtl.models.abstract_variables(jaxtl.create_model(vit.name, 10), vit)["params"]
    targets = ["/".join(t) for t in select_targets(params, vit.head_path, None)]
    assert len(targets) == 12 * 4 and all(t.split("/")[-2] in ("query", "key", "value", "proj") for t in targets)
    cnn = jaxtl.get_spec("mobilenet_v2")
    params = jaxtl.models.abstract_variables(jaxtl.create_model(cnn.name, 10), cnn)["params"]
    paths = select_targets(params, cnn.head_path, None)
    shapes = flat(params)
    assert paths and all(shapes[p].shape[:2] == (1, 1) for p in paths)  # no 3x3 depthwise, no head
    assert ("classifier", "kernel") not in paths
    with pytest.raises(ConfigError, match="matches no kernel"):
        select_targets(params, cnn.head_path, "no_such_layer")
    with pytest.raises(ConfigError, match="exceeds the rank"):
        init_factors(params, [("stage1_0", "project_conv", "kernel")], 17, 0)  # a 32 x 16 kernel


def test_lora_starts_at_the_pretrained_model_and_folds_any_kernel_shape():
    rng = np.random.default_rng(0)
    params = {"conv": {"kernel": rng.normal(size=(3, 3, 4, 5)).astype(np.float32)},
              "dense": {"kernel": rng.normal(size=(6, 7)).astype(np.float32)}}
    targets = [("conv", "kernel"), ("dense", "kernel")]
    factors = init_factors(params, targets, 2, 0)
    same = apply_factors({**params, LORA_KEY: factors}, 4.0)
    for path in targets:  # B starts at zero
        assert np.array_equal(flat(same)[path], flat(params)[path])
    factors["dense"]["lora_b"] = rng.normal(size=(2, 7)).astype(np.float32)
    moved = flat(apply_factors({**params, LORA_KEY: factors}, 4.0))
    want = params["dense"]["kernel"] + 4.0 * factors["dense"]["lora_a"] @ factors["dense"]["lora_b"]
    np.testing.assert_allclose(moved[("dense", "kernel")], want, rtol=1e-6)
    assert LORA_KEY not in apply_factors({**params, LORA_KEY: factors}, 4.0)


def test_lora_exports_the_plain_backbone_with_rank_r_updates_on_the_targets_only(lora_run, pretrained):
    got = exported(lora_run)
    assert got.keys() == pretrained.keys()  # the plain backbone: no adapter left in the export
    targets = {("params", *t) for t in select_targets(jaxtl.load_model(lora_run)[1]["params"], ("classifier",), None)}
    largest = 0.0
    for path, value in got.items():
        if is_head(path):
            continue
        if path not in targets:
            assert np.array_equal(value, pretrained[path]), f"{'/'.join(path)} changed but is not a LoRA target"
            continue
        assert not np.array_equal(value, pretrained[path]), f"{'/'.join(path)} did not train"
        delta = (value.astype(np.float64) - pretrained[path]).reshape(-1, value.shape[-1])
        s = np.linalg.svd(delta, compute_uv=False)
        # Rounding of W + s*A@B in float32 bounds every singular value past the rank.
        rounding = 2 * EPS32 * (np.linalg.norm(delta) + np.linalg.norm(value))
        assert s[4:].max(initial=0.0) <= rounding, f"{'/'.join(path)}: rank above 4 ({s[:6]})"
        largest = max(largest, s[0] / rounding)
    assert largest > 1e3  # the updates are far above rounding: the test can see a rank


def test_lora_resumed_mid_epoch_matches_an_uninterrupted_run(lora_run, tmp_path, monkeypatch):
    out = tmp_path / "interrupted"
    calls = {"n": 0}
    read = Trainer._read_metrics

    def interrupt_in_epoch_two(self, packed):  # as a SIGINT between two steps would
        calls["n"] += 1
        if calls["n"] == 6:  # 4 steps per epoch: the second step of epoch 2
            self._signals.received = signal.SIGINT
        return read(self, packed)

    monkeypatch.setattr(Trainer, "_read_metrics", interrupt_in_epoch_two)
    with pytest.raises(Interrupted, match="interrupted at epoch 2, batch"):
        run(out, strategy="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, **EMA)
    monkeypatch.setattr(Trainer, "_read_metrics", read)
    run(out, strategy="lora", lora_rank=4, lora_alpha=8.0, lora_dropout=0.1, **EMA, resume=True)
    a, b = exported(lora_run), exported(out)
    for path in a:
        assert np.array_equal(a[path], b[path]), f"{'/'.join(path)} differs after the resume"
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records(lora_run)) == strip(records(out))


# --- fine-tuning, WiSE-FT and L2-SP ------------------------------------------------------------


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    """The run folder and its fine-tuned export (the WiSE-FT test re-exports the folder)."""
    out = tmp_path_factory.mktemp("finetune") / "plain"
    run(out, strategy="finetune")
    return out, exported(out)


def test_wise_ft_endpoints_are_the_pretrained_and_the_fine_tuned_model(finetune_run, pretrained, capsys):
    from jaxtl.evaluate import main as evaluate

    finetune_run, finetuned = finetune_run
    assert evaluate(["--checkpoint", str(finetune_run), "--data", "digits", "--wise-ft-sweep", "0,0.5,1",
                     "--json"]) == 0
    sweep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["wise_ft"]
    assert [row["alpha"] for row in sweep] == [0, 0.5, 1]
    # alpha 1 is the fine-tuned model the run validated (the same images, counted the same way).
    assert sweep[-1]["val_top1"] == pytest.approx(records(finetune_run)[-1]["val_top1"], abs=1e-6)

    # A finished run re-exports with another --wise-ft through --resume, without training.
    run(finetune_run, strategy="finetune", resume=True, wise_ft=1.0)
    assert all(np.array_equal(v, finetuned[p]) for p, v in exported(finetune_run).items())
    run(finetune_run, strategy="finetune", resume=True, wise_ft=0.0)
    got = exported(finetune_run)
    for path, value in got.items():
        want = finetuned[path] if is_head(path) else pretrained[path]
        assert np.array_equal(value, want), f"{'/'.join(path)}: alpha 0 is not the pretrained backbone"
    meta = jaxtl.load_model(finetune_run)[2]
    assert meta["wise_ft"]["alpha"] == 0.0 and "fine-tuned" in meta["wise_ft"]["head"]
    half = flat(interpolate(traverse_util.unflatten_dict(pretrained), traverse_util.unflatten_dict(finetuned), 0.5,
                            keep=("classifier",)))
    path = ("params", "last_conv", "kernel")
    np.testing.assert_allclose(half[path], (pretrained[path] + finetuned[path]) / 2, rtol=1e-6, atol=1e-7)


def test_l2sp_keeps_the_backbone_closer_to_its_pretrained_values(finetune_run, pretrained, tmp_path):
    def distance(variables: dict) -> float:
        return float(np.sqrt(sum(np.sum((v.astype(np.float64) - pretrained[p]) ** 2)
                                 for p, v in variables.items() if p[0] == "params" and not is_head(p))))

    run(tmp_path / "l2sp", strategy="finetune", l2sp=10.0)
    plain, pulled = distance(finetune_run[1]), distance(exported(tmp_path / "l2sp"))
    assert plain > 0 and pulled < 0.8 * plain, (plain, pulled)
    assert records(tmp_path / "l2sp")[-1]["train_loss"] > 0  # the cross-entropy, reported without the penalty


# --- LP-FT -------------------------------------------------------------------------------------


def test_lp_ft_probes_then_fine_tunes_from_the_probed_head(tmp_path, monkeypatch):
    import jax

    seen = {}
    enter = Trainer._enter_stage

    def watch(self, state, old, new):
        seen["start"] = np.asarray(self.variables["params"]["classifier"]["kernel"])
        seen["probed"] = np.asarray(jax.device_get(state.params["classifier"]["kernel"]))
        new_state = enter(self, state, old, new)
        seen["fine_tune_start"] = np.asarray(jax.device_get(new_state.params["classifier"]["kernel"]))
        return new_state

    monkeypatch.setattr(Trainer, "_enter_stage", watch)
    out = tmp_path / "lp_ft"
    run(out, strategy=jaxtl.Strategy("lp_ft", lp_epochs=1))
    rs = records(out)
    assert [r["phase"] for r in rs] == ["linear_probe", "fine_tune"]
    assert [r["strategy_stage"] for r in rs] == [0, 1]
    assert rs[0]["trainable_groups"] == ["head"] and "stem" in rs[1]["trainable_groups"]
    assert not np.array_equal(seen["probed"], seen["start"])  # the probe trained the head
    assert np.array_equal(seen["fine_tune_start"], seen["probed"])  # and fine-tuning starts from it


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize("options, message", [
    (dict(strategy="finetune", lora_rank=4), "configure --strategy lora"),
    (dict(strategy="lora", lora_dropout=1.0), "--lora-dropout"),
    (dict(strategy="lora", lora_targets="("), "not a regular expression"),
    (dict(strategy="feature_extract", l2sp=0.1), "does not train the backbone"),
    (dict(strategy="lora", l2sp=0.1), "does not train the backbone"),
    (dict(strategy="finetune", wise_ft=1.5), "in \\[0, 1\\]"),
    (dict(strategy="feature_extract", wise_ft=0.5), "leaves the backbone"),
    (dict(strategy="finetune", weights="none", wise_ft=0.5), "pretrained"),
    (dict(strategy=jaxtl.Strategy("lp_ft", lp_epochs=2)), "leaves no fine-tuning"),
    (dict(strategy="dann", target_data="digits-shifted", l2sp=0.1), "does not train the backbone"),
])
def test_bad_combinations_are_one_line_errors(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{**RUN, **options}).validate()
    with pytest.raises(ConfigError, match="lp_epochs is the linear-probe phase"):
        jaxtl.Strategy("finetune", lp_epochs=1)


def test_the_l2sp_penalty_is_the_same_on_one_and_four_devices():
    """Every device adds its share of the penalty, so the summed gradient has it once."""
    script = textwrap.dedent("""
        import os
        os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
        import jax, jax.numpy as jnp, numpy as np, optax
        from jaxtl.optim import plateau_init, OptimConfig
        from jaxtl.training.parallel import AXIS, DataParallel
        from jaxtl.training.state import create_train_state
        from jaxtl.training.step import L2SP_REFERENCE, make_train_step

        def forward(variables, images, key, axis_name=None):
            p = variables["params"]
            return images @ p["w"] + p["head"]["b"], {}

        rng = np.random.default_rng(0)
        params = {"w": rng.normal(size=(3, 5)).astype(np.float32), "head": {"b": np.zeros(5, np.float32)}}
        reference = {"w": (params["w"] + 0.5).astype(np.float32)}
        batch = {"image": rng.normal(size=(8, 3)).astype(np.float32), "label": np.arange(8, dtype=np.int32) % 5,
                 "weight": np.ones(8, np.float32)}
        tx = optax.sgd(0.1)
        out = []
        for devices in (1, 4):
            dp = DataParallel("shard_map", devices=jax.devices()[:devices])
            step = dp.train_step(make_train_step(forward, tx, num_classes=5, l2sp=2.0, axis_name=AXIS))
            state = dp.replicate(create_train_state({"params": params}, tx, 0, plateau_init(OptimConfig())))
            state, _ = step(state, dp.replicate({"params": {}, L2SP_REFERENCE: reference}), dp.put_batch(batch))
            out.append(np.asarray(jax.device_get(state.params["w"])))
        print(float(np.abs(out[0] - out[1]).max()), float(np.abs(out[0] - params["w"]).max()))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    difference, moved = map(float, r.stdout.split())
    assert moved > 0.05 and difference < 1e-6 * moved, (difference, moved)


def test_bitfit_trains_only_the_biases_and_norm_scales(tmp_path, pretrained):
    out = tmp_path / "bitfit"
    result = run(out, strategy="bitfit", epochs=1)
    trained = {p for p in flat(result.state.params)}
    assert trained and all(p[-1] in ("bias", "scale") or p[0] == "classifier" for p in trained)
    got = exported(out)
    moved = [p for p, v in got.items() if not is_head(p) and not np.array_equal(v, pretrained[p])]
    assert moved and all(p[0] == "params" and p[-1] in ("bias", "scale") for p in moved), moved[:3]
