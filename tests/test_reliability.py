"""Every way a run can go wrong ends with one clear line and no lost work.

Interrupted runs (SIGINT, kill -9 during an epoch, kill -9 during a checkpoint
write) and a disk that fills up while saving all end, after ``--resume``, with
parameters and metrics bit-identical (CPU) to an uninterrupted run - in the
middle of progressive unfreezing. Faults inside checkpoint writes are injected
by tests/helpers/faulty_train.py at orbax's commit step.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jaxtl
from jaxtl.errors import ConfigError, ConversionError, JaxtlError, UnknownModelError, WeightsError

HELPERS = Path(__file__).parent / "helpers"
# Progressive unfreezing over 3 epochs of a small random-init ResNet-18: three stages.
RUN = ["--backbone", "resnet18", "--weights", "none", "--img-size", "32", "--limit-per-class", "20",
       "--batch-size", "16", "--opt", "sgd", "--lr", "0.05", "--no-progress", "--strategy", "progressive",
       "--unfreeze-every", "1", "--epochs", "3", "--sched", "cosine", "--warmup-epochs", "1", "--seed", "3"]


def train(*args, env=None, timeout=900, launcher=None):
    cmd = [sys.executable, str(launcher)] if launcher else [sys.executable, "-m", "jaxtl.train"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def start(*args, env=None, launcher=None):
    cmd = [sys.executable, str(launcher)] if launcher else [sys.executable, "-m", "jaxtl.train"]
    return subprocess.Popen([*cmd, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def wait_for(predicate, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def assert_same_run(a: Path, b: Path) -> None:
    _, va, _ = jaxtl.load_model(a)
    _, vb, _ = jaxtl.load_model(b)
    fa, fb = traverse_util.flatten_dict(va, sep="/"), traverse_util.flatten_dict(vb, sep="/")
    assert fa.keys() == fb.keys()
    for k in fa:
        assert np.array_equal(fa[k], fb[k]), f"{k} differs"
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records(a)) == strip(records(b))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("reliability") / "whole"
    r = train(*RUN, "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["strategy_stage"] for x in records(out)] == [0, 1, 2]
    return out


# --- interrupted runs ------------------------------------------------------------------


@pytest.mark.slow
def test_sigint_mid_progressive_then_resume_is_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "sigint"
    proc = start(*RUN, "--output", out)
    # Epoch 1 done and its checkpoint complete (a signal during that save stops the run after it):
    # epoch 2 begins by compiling stage 1's step, where the signal lands.
    assert wait_for(lambda: (out / "checkpoints" / "12").is_dir(), proc)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted at epoch 2" in err and "--resume --output" in err
    r = train("--resume", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from step" in r.stdout
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_kill9_during_an_epoch_then_resume_is_bit_identical(uninterrupted, tmp_path):
    out = tmp_path / "kill9"
    proc = start(*RUN, "--output", out)
    assert wait_for(lambda: (out / "metrics.jsonl").exists() and len(records(out)) >= 1, proc)
    time.sleep(3)  # somewhere in epoch 2 (compiling stage 1 or training)
    proc.kill()  # SIGKILL: no handler runs, nothing is saved
    proc.communicate(timeout=60)
    r = train("--resume", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_kill9_during_a_checkpoint_write_leaves_the_previous_one_usable(uninterrupted, tmp_path):
    out, marker = tmp_path / "kill9ckpt", tmp_path / "marker"
    env = {"JAXTL_TEST_FAULT": "hang:2", "JAXTL_TEST_MARKER": str(marker)}
    proc = start(*RUN, "--output", out, env=env, launcher=HELPERS / "faulty_train.py")
    assert wait_for(marker.exists, proc), proc.communicate()[1][-2000:]  # the 2nd save is writing
    proc.kill()
    proc.communicate(timeout=60)
    steps = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    assert len(steps) == 1, steps  # the complete epoch-1 checkpoint; the half-written one is not a step
    r = train("--resume", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 2" in r.stdout
    assert_same_run(uninterrupted, out)


@pytest.mark.slow
def test_two_signals_during_a_save_keep_the_checkpoint_and_resume(uninterrupted, tmp_path):
    """Ctrl-C twice while the first checkpoint is being written: the save completes, the run stops
    after it, and --resume continues exactly (before, the second signal abandoned the save and left
    only a temporary folder)."""
    out = tmp_path / "sigint2"
    r = train(*RUN, "--output", out, env={"JAXTL_TEST_FAULT": "sigint2:1"}, launcher=HELPERS / "faulty_train.py")
    assert r.returncode == 130, r.stderr[-2000:]
    assert "interrupted after epoch 1; checkpoint saved (step 12)" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["12"]  # complete, nothing temporary
    r = train("--resume", "--output", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(uninterrupted, out)


def test_resume_with_only_a_half_written_checkpoint_is_one_line(tmp_path):
    """The first save killed mid-write leaves only orbax's temporary folder: --resume says there is no
    checkpoint, in one line (orbax's own clean-up thread printed a traceback as the process exited)."""
    out = tmp_path / "half"
    (out / "checkpoints" / "12.orbax-checkpoint-tmp" / "state").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"backbone": "resnet18", "strategy": {"kind": "finetune"},
                                                 "optim": {}, "output": str(out)}))
    r = train("--resume", "--output", out)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0, r.stderr
    assert "no checkpoint" in r.stderr and not list((out / "checkpoints").iterdir())


@pytest.mark.slow
def test_disk_full_while_saving_stops_cleanly_and_resumes(uninterrupted, tmp_path):
    out = tmp_path / "enospc"
    r = train(*RUN, "--output", out, env={"JAXTL_TEST_FAULT": "enospc:2"}, launcher=HELPERS / "faulty_train.py")
    assert r.returncode == 2, r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert "No space left on device" in line and "previous checkpoint" in line and "--resume" in line
    assert "Traceback" not in r.stderr
    assert len(records(out)) == 2  # epoch 2's metrics were written before the save failed
    r = train("--resume", "--output", out)  # "space freed": the previous checkpoint is intact
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_run(uninterrupted, out)


def test_exported_files_follow_the_umask(tmp_path):
    import jaxtl.export as export

    model = jaxtl.create_model("resnet18", num_classes=3)
    variables = jaxtl.init_variables(model, jaxtl.get_spec("resnet18"))
    meta = {"backbone": "resnet18", "num_classes": 3,
            "preprocessing": jaxtl.get_spec("resnet18").preprocessing.to_dict()}
    old = os.umask(0o027)
    try:
        export.save_model(tmp_path, variables, meta)
    finally:
        os.umask(old)
    for name in ("model.msgpack", "meta.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name  # 0666 less the umask, not 0600


def test_a_failed_export_keeps_the_previous_model(tmp_path, monkeypatch):
    import jaxtl.export as export

    model = jaxtl.create_model("resnet18", num_classes=3)
    variables = jaxtl.init_variables(model, jaxtl.get_spec("resnet18"))
    meta = {"backbone": "resnet18", "num_classes": 3, "preprocessing": jaxtl.get_spec("resnet18").preprocessing.to_dict()}
    export.save_model(tmp_path, variables, meta)
    before = (tmp_path / "model.msgpack").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export.os, "replace", full)
    with pytest.raises(jaxtl.CheckpointError, match="No space left on device"):
        export.save_model(tmp_path, jax_tree_plus_one(variables), meta)
    assert (tmp_path / "model.msgpack").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def jax_tree_plus_one(tree):
    import jax

    return jax.tree.map(lambda x: np.asarray(x) + 1, tree)


# --- bad data at scale ---------------------------------------------------------------------


def _image_folder_with_bad_files(root: Path, per_class: int = 250) -> dict[str, Path]:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(4):
        d = root / f"class{c}"
        d.mkdir(parents=True)
        base = np.zeros((16, 16, 3), np.uint8)
        base[..., c % 3] = 200
        for i in range(per_class):
            img = np.clip(base.astype(int) + rng.integers(-30, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i:04d}.jpg", quality=90)
    bad = {
        "truncated": root / "class0" / "0000.jpg",
        "zero": root / "class1" / "zero.jpg",
        "text": root / "class2" / "notes.jpg",
        "bomb": root / "class3" / "bomb.png",
        "loop": root / "class0" / "loop.jpg",
    }
    data = bad["truncated"].read_bytes()
    bad["truncated"].write_bytes(data[: len(data) // 2])
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is not an image\n")
    _write_png_header(bad["bomb"], 60000, 60000)
    os.symlink(bad["loop"], bad["loop"])  # a symlink loop
    return bad


def _write_png_header(path: Path, w: int, h: int) -> None:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def test_thousand_images_with_corrupt_ones_train_and_report(tmp_path):
    bad = _image_folder_with_bad_files(tmp_path / "data")
    common = ["--data", tmp_path / "data", "--backbone", "resnet18", "--weights", "none", "--img-size", "32",
              "--strategy", "feature_extract", "--cache-features", "--epochs", "1", "--batch-size", "32",
              "--no-progress"]
    r = train(*common, "--output", tmp_path / "run")
    assert r.returncode == 0, r.stderr[-3000:]
    listed = (tmp_path / "run" / "skipped_files.txt").read_text()
    for name, path in bad.items():
        assert str(path) in listed, name
    assert "5 file(s) were skipped as unreadable" in r.stdout
    assert "truncated" in listed and "decompression bomb" in listed and "symbolic link loop" in listed
    assert "empty file" in listed
    # --strict stops before training, naming a bad file
    r = train(*common, "--strict", "--output", tmp_path / "strict")
    assert r.returncode == 2 and "--strict:" in r.stderr and "and 4 more bad files" in r.stderr
    assert not (tmp_path / "strict" / "metrics.jsonl").exists()


def test_batch_size_must_divide_over_the_devices(tmp_path):
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = train("--backbone", "resnet18", "--weights", "none", "--batch-size", "30", "--output", tmp_path / "o",
              env=env, timeout=300)
    assert r.returncode == 2
    assert "--batch-size 30 is not divisible by the 4 devices; use a multiple of 4" in r.stderr


# --- fuzzing the decoder and the converter -------------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".jpg", ".png", ".gif", ".webp", ".bmp"]))
def test_fuzz_image_decoder(tmp_path, data, suffix):
    from jaxtl.data.decode import BadImageError, load_image

    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        im = load_image(path)
    except BadImageError as e:
        assert str(path) in str(e)
    else:
        assert im.mode == "RGB"


_JPEG = None


def _valid_jpeg() -> bytes:
    global _JPEG
    if _JPEG is None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
        _JPEG = buf.getvalue()
    return _JPEG


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cuts=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=8), keep=st.integers(1, 4000))
def test_fuzz_damaged_jpegs(tmp_path, cuts, keep):
    from jaxtl.data.decode import BadImageError, load_image

    data = bytearray(_valid_jpeg()[:keep])
    for pos, value in cuts:
        if pos < len(data):
            data[pos] = value
    path = tmp_path / "damaged.jpg"
    path.write_bytes(bytes(data))
    try:
        assert load_image(path).mode == "RGB"
    except BadImageError:
        pass


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".pth", ".pt", ".safetensors", ".bin"]))
def test_fuzz_weight_reader(tmp_path, data, suffix):
    from jaxtl.weights import read_state_dict

    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        read_state_dict(path)
    except WeightsError:
        pass


_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=4).map(tuple)
_keys = st.sampled_from(["fc.weight", "fc.bias", "conv1.weight", "bn1.running_mean", "bn1.running_var",
                         "bn1.weight", "layer1.0.conv1.weight", "junk", "module.fc.weight", ""])
_values = st.one_of(_shapes.map(lambda s: np.zeros(s, np.float32)), st.just("text"), st.none(), st.integers())


@settings(max_examples=200, deadline=None)
@given(state=st.dictionaries(st.one_of(_keys, st.integers()), _values, max_size=8),
       head=st.sampled_from(["keep", "new", "bogus"]), num_classes=st.one_of(st.none(), st.integers(-1, 5)))
def test_fuzz_state_dict_converter(state, head, num_classes):
    try:
        jaxtl.convert_state_dict("resnet18", state, head=head, num_classes=num_classes)
    except (ConversionError, WeightsError, ConfigError, UnknownModelError) as e:
        assert isinstance(e, JaxtlError) and str(e)
