"""The benchmark scripts: a smoke run, and their --out handling (no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "bench_throughput.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=BENCH.parent)


def test_alternate_settles_each_turn_before_timing(monkeypatch):
    """Each candidate's turn starts with an untimed call; only the calls after it are timed."""
    monkeypatch.syspath_prepend(str(BENCH))
    from common import alternate

    calls = []
    times = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=2, repeats=3)
    assert calls == (["a"] * 4 + ["b"] * 4) * 2    # 1 untimed + 3 timed per turn
    assert {k: len(v) for k, v in times.items()} == {"a": 6, "b": 6}
    calls.clear()
    alternate({"a": lambda: calls.append("a")}, rounds=1, repeats=2, settle=0)
    assert calls == ["a", "a"]


def test_results_path_puts_bare_names_in_results_and_keeps_paths(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from common import RESULTS, results_path

    assert results_path("mine.json") == RESULTS / "mine.json"
    nested = tmp_path / "new" / "folder" / "mine.json"
    assert results_path(str(nested)) == nested and nested.parent.is_dir()   # folders are created
    with pytest.raises(SystemExit, match="give a .json file name"):
        results_path(str(tmp_path / "mine.txt"))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot create folder"):
        results_path(str(blocker / "sub" / "mine.json"))


def test_bad_out_is_refused_before_measuring(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    r = _bench("--out", str(blocker / "x.json"), timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("--out "), r.stderr[-2000:]
    assert "cannot create folder" in r.stderr and "Traceback" not in r.stderr
    assert "img/s" not in r.stdout + r.stderr        # nothing was measured


@pytest.mark.torch
def test_throughput_smoke_run_writes_a_table_and_json(tmp_path):
    out = tmp_path / "results" / "smoke.json"
    r = _bench("--models", "resnet18", "--sizes", "32", "--modes", "inference", "--quick", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads(out.read_text())
    (rec,) = payload["results"]
    assert (rec["model"], rec["size"], rec["mode"]) == ("resnet18", 32, "inference")
    assert rec["images_per_s"]["jaxtl"] > 0 and rec["jaxtl_over_best"] > 0
    assert "| resnet18 | 32 | inference |" in payload["table"] and payload["table"] in r.stdout
    assert payload["machine"]["cpus"] >= 1


@pytest.mark.slow
def test_native_smoke_run_times_both_steps(tmp_path):
    # inference compiles in seconds (a fine-tune step twice took a minute); the script is the same.
    # MobileNetV2 at 32 px: 18 s here against 23 s for mobilenet_v3_small (2-core Xeon)
    out = tmp_path / "native.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_native.py"), "--models", "mobilenet_v2", "--sizes",
                        "32", "--mode", "inference", "--quick", "--out", str(out)], capture_output=True, text=True,
                       timeout=300,
                       cwd=BENCH.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    (rec,) = json.loads(out.read_text())["results"]
    assert rec["median_s"]["xla"] > 0 and rec["median_s"]["native"] > 0 and len(rec["per_round_ratio"]) == 1
    assert "| mobilenet_v2 | 32 | inference |" in r.stdout


def test_profile_step_names_layers_from_hlo_metadata(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from profile_step import hlo_index, origin

    assert origin("jit(train_step)/transpose(jvp(MobileNet))/stage2_0/expand_bn/reduce_sum") == ("expand_bn", "bwd")
    assert origin("jit(train_step)/jvp(ResNet)/layer1_1/conv2/conv_general_dilated") == ("conv", "fwd")
    assert origin("jit(train_step)/transpose(jvp(MobileNet))/stage1_0/dw_conv/while/body/closed_call/slice") \
        == ("dw_conv", "bwd")
    assert origin("") == ("(no metadata)", "")
    hlo = ('  %ynn_fusion.14 = f32[1,144]{1,0} fusion(%a, %b), kind=kCustom, calls=%c, '
           'metadata={op_name="jit(train_step)/jvp(M)/bn/reduce_sum" stack_frame_id=3}\n'
           '  %transpose_copy_fusion.2 = f32[512,4,4,32]{3,2,1,0} fusion(%x), kind=kLoop, calls=%d\n'
           '  %copy.1 = f32[3,3,4,4]{3,2,1,0} copy(%y)\n'
           '  %convolution.3 = f32[3,3,32,512]{3,2,1,0} convolution(%transpose_copy_fusion.2, %z), '
           'metadata={op_name="jit(train_step)/transpose(jvp(ResNet))/layer4_1/conv2/conv_general_dilated"}\n')
    index = hlo_index(hlo)
    assert index["ynn_fusion.14"] == ("f32[1,144]{1,0}", "jit(train_step)/jvp(M)/bn/reduce_sum")
    # XLA's own copies are charged to the operation that uses them; unused ones stay unnamed
    assert index["transpose_copy_fusion.2"][1] == "for:" + index["convolution.3"][1]
    assert origin(index["transpose_copy_fusion.2"][1]) == ("conv (operand copy)", "bwd")
    assert index["copy.1"] == ("f32[3,3,4,4]{3,2,1,0}", "")


def test_profile_step_default_out_names_model_size_and_mode(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from profile_step import default_out

    assert default_out("vit_tiny_patch16_224", 128, "finetune") == "profile_vit_tiny_128.json"
    assert default_out("resnet18", 224, "inference") == "profile_resnet18_224_inference.json"


def test_profile_step_smoke_run_writes_tables(tmp_path, monkeypatch, capsys):
    # In this process (the script's own start-up would double the test's time).
    monkeypatch.syspath_prepend(str(BENCH))
    import profile_step

    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["profile_step.py", "--model", "resnet18", "--size", "32", "--mode",
                                      "inference", "--steps", "1", "--top", "5", "--out", str(out)])
    profile_step.main()
    payload = json.loads(out.read_text())
    assert payload["step_ms"] > 0 and payload["traced_ms_per_step"] > 0
    assert 0 < len(payload["top"]) <= 5
    # the traced operations were found in the HLO: they carry a shape and the Flax module they came from
    assert any(t["shape"] and t["layer"] != "(no metadata)" for t in payload["top"])
    assert payload["tables"]["layer"] in capsys.readouterr().out


def test_scaling_counts_and_efficiency(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from bench_scaling import default_counts, efficiency, parse_counts

    assert default_counts(1) == [1] and default_counts(4) == [1, 2, 4] and default_counts(6) == [1, 2, 4, 6]
    assert parse_counts("4,1,2,2", 8) == [1, 2, 4] and parse_counts(None, 2) == [1, 2]
    # perfect scaling is 1.0; 150 img/s on 2 devices against 100 on one is 0.75
    assert efficiency({1: 100.0, 2: 150.0, 4: 400.0}) == {1: 1.0, 2: 0.75, 4: 1.0}
    assert efficiency({2: 100.0, 4: 100.0}) == {2: 1.0, 4: 0.5}    # relative to the smallest count
    with pytest.raises(SystemExit, match="this process has 2 device"):
        parse_counts("1,4", 2)
    with pytest.raises(SystemExit, match="comma-separated device counts"):
        parse_counts("1,two", 2)


def test_scaling_refuses_a_global_batch_without_strong_scaling(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCH))
    from bench_scaling import _parse_args

    assert _parse_args(["--scaling", "strong", "--global-batch", "64"]).global_batch == 64
    with pytest.raises(SystemExit):
        _parse_args(["--global-batch", "64"])
    assert "--global-batch fixes the batch for --scaling strong" in capsys.readouterr().err


@pytest.mark.slow
def test_scaling_smoke_run_on_two_host_devices(tmp_path):
    """The data-parallel step over 1 and 2 CPU host devices under pmap, global batch fixed (24 s here)."""
    out = tmp_path / "scaling.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_scaling.py"), "--host-devices", "2", "--size", "32",
                        "--mode", "feature_extract", "--mapping", "pmap", "--scaling", "strong", "--global-batch",
                        "16", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300,
                       cwd=BENCH.parent, env={k: v for k, v in os.environ.items() if k != "XLA_FLAGS"})
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads(out.read_text())
    assert [(x["devices"], x["batch"]) for x in payload["results"]] == [(1, 16), (2, 16)]
    one, two = payload["results"]
    assert one["efficiency"] == 1.0 and one["speedup"] == 1.0
    assert two["efficiency"] == pytest.approx(two["images_per_s"] / (2 * one["images_per_s"]))
    assert all(x["images_per_s"] > 0 and x["compile_s"] > 0 for x in payload["results"])
    assert payload["machine"]["backend"] == "cpu" and len(payload["machine"]["jax_devices"]) == 2
    assert payload["table"] in r.stdout


def test_scaling_refuses_host_devices_twice_before_jax_starts(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, str(BENCH / "bench_scaling.py"), "--host-devices", "4", "--out",
                        str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120, cwd=BENCH.parent,
                       env=env)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("--host-devices and XLA_FLAGS")
    assert "Traceback" not in r.stderr and not (tmp_path / "x.json").exists()


def test_frozen_smoke_run_measures_the_head_step_and_host_work(tmp_path):
    out = tmp_path / "frozen.json"
    r = subprocess.run([sys.executable, str(BENCH / "bench_frozen.py"), "--parts", "head_step,host", "--quick",
                        "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert r.returncode == 0, r.stderr[-3000:]
    payload = json.loads(out.read_text())
    head = payload["head_step"]
    assert head["jaxtl_ms"] > 0 and head["plain_optax_ms"] > 0
    assert head["ratio"] == pytest.approx(head["jaxtl_ms"] / head["plain_optax_ms"])
    assert set(payload["host"]["us_per_step"]) >= {"step call", "+ metric read as one vector (the trainer)"}
    assert "head step on cached features" in r.stdout
    bad = subprocess.run([sys.executable, str(BENCH / "bench_frozen.py"), "--parts", "speed", "--quick", "--out",
                          str(out)], capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert bad.returncode == 2 and "unknown part(s) speed" in bad.stderr


def test_robust_summary_is_mean_and_spread_over_seeds(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    from bench_robust import DOMAINS, report, summarise

    runs = {"finetune": [{"seed": s, **{d: top for d in DOMAINS}, "trainable_params": 5, "checkpoint_bytes": 9}
                         for s, top in enumerate((0.5, 0.7, 0.9))],
            "finetune + WiSE-FT 0.5": [{"seed": 0, **{d: 0.25 for d in DOMAINS}}]}
    summary = summarise(runs)
    assert summary["finetune"]["digits"] == {"mean": pytest.approx(0.7), "std": pytest.approx(0.2)}
    assert summary["finetune + WiSE-FT 0.5"]["digits-inverted"] == {"mean": 0.25, "std": 0.0}
    table = report({"accuracy": {"seeds": [0, 1, 2], "epochs": 8, "summary": summary}})
    assert "| finetune | 0.700 ± 0.200 | 0.700 ± 0.200 | 0.700 ± 0.200 | 5 | 9 |" in table
    assert "(finetune's)" in table
