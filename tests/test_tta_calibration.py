"""Test-time augmentation (``--tta``) and temperature scaling (``--calibrate``): what each one claims.

One small over-confident run (the offline MobileNetV2, head only, 32 px, 10 digits per class, a high
learning rate) serves every check that needs a trained model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import jaxtl
from jaxtl.runtime import NO_COMPILE_CACHE
from jaxtl.training.config import TrainConfig


@pytest.fixture(autouse=True)
def _no_compile_cache(monkeypatch):
    monkeypatch.setenv(NO_COMPILE_CACHE, "1")  # the command lines must not switch this test process's JAX cache on


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Over-confident on purpose (SGD at lr 1 on 100 images): validation loss ~7, ECE ~0.28."""
    import os

    out = tmp_path_factory.mktemp("tta") / "run"
    before = os.environ.get(NO_COMPILE_CACHE)
    os.environ[NO_COMPILE_CACHE] = "1"
    try:
        jaxtl.train(TrainConfig(backbone="mobilenet_v2", strategy="feature_extract", epochs=15, img_size=32,
                                limit_per_class=10, batch_size=16, optim=jaxtl.OptimConfig(opt="sgd", lr=1.0),
                                output=str(out), progress=False), log=lambda line: None)
    finally:
        if before is None:
            os.environ.pop(NO_COMPILE_CACHE, None)
        else:
            os.environ[NO_COMPILE_CACHE] = before
    return out


def copy_run(run: Path, dest: Path, hflip: bool | None = None) -> Path:
    """A copy of the run to write into; ``hflip`` rewrites its config.json and the model's meta as if it
    had trained so."""
    from jaxtl.export import MODEL_FILE, read_model_file, save_model

    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("checkpoints"))
    if hflip is not None:
        config = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**config, "hflip": hflip}))
        variables, meta = read_model_file(dest / MODEL_FILE)
        meta = {k: v for k, v in meta.items() if k != "format"}
        save_model(dest, variables, {**meta, "training": {**meta.get("training", {}), "hflip": hflip}})
    return dest


def cli(main, capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([*map(str, args)])
    got = capsys.readouterr()
    return status, got.out, got.err


def evaluate_json(*args) -> dict:
    import contextlib
    import io

    from jaxtl.evaluate import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main([*map(str, args), "--json"])
    assert status == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def plain(run) -> dict:
    """``python -m jaxtl.evaluate --json`` of the run, without TTA or a temperature."""
    return evaluate_json("--checkpoint", run, "--data", "digits")


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


# --- views ----------------------------------------------------------------------------------


def coordinate_images(n=2, h=7, w=9):
    """Pixel (y, x) of image i holds (i, y, x) in its three channels."""
    i, y, x = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing="ij")
    return np.stack([i, y, x], -1).astype(np.uint8)


def test_views_cut_the_crops_of_torchvisions_five_and_ten_crop():
    from jaxtl.tta import views

    images = coordinate_images()
    size = 4
    five = np.asarray(views(images, size, 5))
    assert five.shape == (5, 2, size, size, 3) and five.dtype == np.uint8
    # centre (offsets rounded as CenterCrop: round(1.5) = 2, round(2.5) = 2), then the four corners
    for view, (top, left) in zip(five, [(2, 2), (0, 0), (0, 5), (3, 0), (3, 5)]):
        assert np.array_equal(view, images[:, top:top + size, left:left + size])
        assert view[1, 0, 0].tolist() == [1, top, left]  # every image is cropped alike
    ten = np.asarray(views(images, size, 10))
    assert np.array_equal(ten[:5], five) and np.array_equal(ten[5:], five[:, :, :, ::-1])
    two = np.asarray(views(images, size, 2))
    assert np.array_equal(two[0], five[0]) and np.array_equal(two[1, 0, :, 0], five[0, 0, :, -1])
    at_size = images[:, :size, :size]
    assert np.array_equal(np.asarray(views(at_size, size, 1))[0], at_size)  # one view: the image as it is
    floats = np.asarray(views(images.astype(np.float32) / 7, size, 10))
    assert np.allclose(floats, ten.astype(np.float32) / 7)


def test_the_crops_come_from_the_resize_size_square_and_the_centre_is_the_plain_crop():
    from PIL import Image

    from jaxtl.data.preprocessing import Preprocessing
    from jaxtl.data.transforms import eval_crop
    from jaxtl.tta import loader_preprocessing, views

    pre = Preprocessing(32, 37)
    rng = np.random.default_rng(0)
    square = Image.fromarray(rng.integers(0, 256, (50, 50, 3), dtype=np.uint8))
    shipped = eval_crop(square, loader_preprocessing(pre, 5))
    assert shipped.shape == (37, 37, 3) and loader_preprocessing(pre, 2) == pre
    five = np.asarray(views(shipped[None], 32, 5))
    assert np.array_equal(five[0, 0], eval_crop(square, pre))  # view 0: today's evaluation input
    assert np.array_equal(five[4, 0], shipped[5:, 5:])


def test_only_the_documented_view_counts_and_no_flips_for_data_a_mirror_changes(run, capsys):
    from jaxtl.errors import ConfigError
    from jaxtl.evaluate import main as evaluate
    from jaxtl.predict import main as predict
    from jaxtl.tta import check_views

    for n in (0, 3, 6):
        with pytest.raises(ConfigError, match="choose 1"):
            check_views(n)
    status, _, err = cli(evaluate, capsys, "--checkpoint", run, "--data", "digits", "--tta", "3")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--tta 3" in err
    for n in (2, 10):  # digits trained without flips: a mirrored digit is another image
        status, _, err = cli(evaluate, capsys, "--checkpoint", run, "--data", "digits", "--tta", n)
        assert status == 2 and len(err.strip().splitlines()) == 1 and "without flips" in err
    status, _, err = cli(predict, capsys, "--checkpoint", run, "--tta", "2", "nothing.png")
    assert status == 2 and "without flips" in err
    status, _, err = cli(evaluate, capsys, "--checkpoint", run, "--data", "digits", "--write")
    assert status == 2 and "--calibrate" in err
    status, _, err = cli(evaluate, capsys, "--checkpoint", run, "--data", "digits", "--calibrate", "--write",
                         "--tta", "5")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "single views" in err


# --- TTA on the trained model ----------------------------------------------------------------


def test_one_view_is_the_plain_evaluation_bit_for_bit(run, plain):
    assert evaluate_json("--checkpoint", run, "--data", "digits", "--tta", "1") == plain
    five = evaluate_json("--checkpoint", run, "--data", "digits", "--tta", "5")
    assert five["images"] == plain["images"] and five["loss"] != plain["loss"]


def test_two_views_average_the_plain_and_the_mirrored_probabilities(run, plain, tmp_path):
    import jax

    from jaxtl.data.augment import eval_prepare
    from jaxtl.data.preprocessing import Preprocessing
    from jaxtl.data.sources import load_dataset
    from jaxtl.data.transforms import eval_crop
    from jaxtl.evaluate import make_evaluator
    from jaxtl.training.evaluation import metrics

    model, variables, meta = jaxtl.load_model(run)
    pre = Preprocessing.from_dict(meta["preprocessing"])
    val = load_dataset("digits").val
    sums, pred, _, confidence, logits = make_evaluator(model, pre, 10, 64, 1, tta=2)(variables, val,
                                                                                     with_logits=True)
    # by hand: the model on each centre crop and on its mirror, the two softmaxes averaged
    images = np.stack([eval_crop(val.image(i), pre) for i in range(len(val))])
    forward = jax.jit(lambda v, x: model.apply(v, eval_prepare(x, pre), train=False))
    unflipped = softmax(forward(variables, images))
    by_hand = (unflipped + softmax(forward(variables, images[:, :, ::-1]))) / 2
    assert logits.shape == (len(val), 2, 10)
    assert np.allclose(confidence, by_hand.max(-1), rtol=1e-4, atol=1e-6)
    assert np.mean(pred == by_hand.argmax(-1)) > 0.99  # a near-tie may fall either way in float32
    m = metrics(sums)
    assert m["loss"] == pytest.approx(np.mean(-np.log(by_hand[np.arange(len(val)), val.labels])), rel=1e-4)
    assert m["top1"] == pytest.approx(np.mean(pred == val.labels))
    assert abs(m["top1"] - np.mean(by_hand.argmax(-1) == val.labels)) <= 0.01
    assert not np.allclose(confidence, unflipped.max(-1), atol=1e-3) and plain["loss"] != m["loss"]
    # the command line, on a copy that says it trained with flips
    flipped = copy_run(run, tmp_path / "flipped", hflip=True)
    got = evaluate_json("--checkpoint", flipped, "--data", "digits", "--tta", "2")
    assert got["tta"] == 2 and got["loss"] == pytest.approx(m["loss"], rel=1e-6)


def test_predict_with_tta_prints_what_it_prints_without(run, tmp_path, capsys):
    from PIL import Image
    from sklearn.datasets import load_digits

    from jaxtl.predict import main as predict

    flipped = copy_run(run, tmp_path / "flipped", hflip=True)
    d = load_digits()
    paths = []
    for i in (7, 8):
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(np.round(d.images[i] * 255 / 16).astype(np.uint8)).resize((48, 40)).save(paths[-1])
    status, plain, err = cli(predict, capsys, "--checkpoint", flipped, *paths, "--top-k", "3")
    assert status == 0, err
    status, out, err = cli(predict, capsys, "--checkpoint", flipped, *paths, "--top-k", "3", "--tta", "2")
    assert status == 0, err
    lines = out.strip().splitlines()
    assert "test-time augmentation" in lines[0] and len(lines) == len(plain.strip().splitlines()) + 1
    assert [str(p) for p in paths] == [line for line in lines if line.endswith(".png")]
    assert out.count("(class") == plain.count("(class") == 6 and "\n".join(lines[1:]) != plain.strip()
    status, out, _ = cli(predict, capsys, "--checkpoint", flipped, paths[0], "--json", "--tta", "5")
    assert status == 0 and json.loads(out)["tta"] == 5 and len(json.loads(out)["top_k"]) == 5


# --- temperature scaling -----------------------------------------------------------------------


def test_fit_temperature_recovers_a_known_temperature():
    from jaxtl.calibration import apply_temperature, fit_temperature, nll

    rng = np.random.default_rng(0)
    true = rng.normal(0.0, 2.0, (20000, 10))
    labels = (softmax(true).cumsum(-1) > rng.random((len(true), 1))).argmax(-1)  # drawn from the true model
    t = fit_temperature(true * 3.0, labels)
    assert t == pytest.approx(3.0, rel=0.02)
    assert fit_temperature(true / 2.0, labels) == pytest.approx(0.5, rel=0.02)
    assert nll(apply_temperature(true * 3.0, t), labels) < nll(true * 3.0, labels)
    assert fit_temperature(true * 3.0, labels) == t  # deterministic
    views = np.stack([true * 3.0, true * 3.0], 1)  # two identical views: the same T
    assert fit_temperature(views, labels) == pytest.approx(t, rel=1e-4)
    separable = np.eye(3)[[0, 1, 2]] * 5.0  # every example right: the NLL falls all the way to the bound
    assert fit_temperature(separable, [0, 1, 2]) == pytest.approx(1e-2)


def test_temperature_scaling_lowers_a_high_ece_on_held_out_images(run):
    from jaxtl.calibration import fit_temperature, report
    from jaxtl.data.preprocessing import Preprocessing
    from jaxtl.data.sources import load_dataset
    from jaxtl.evaluate import make_evaluator

    model, variables, meta = jaxtl.load_model(run)
    val = load_dataset("digits").val
    *_, logits = make_evaluator(model, Preprocessing.from_dict(meta["preprocessing"]), 10, 64, 1)(
        variables, val, with_logits=True)
    order = np.random.default_rng(0).permutation(len(val))
    fit, held = order[: len(val) // 2], order[len(val) // 2:]
    t = fit_temperature(logits[fit], val.labels[fit])
    got = report(logits[held], val.labels[held], t)
    assert t > 1.5  # over-confident: the logits are too large
    assert got["ece_before"] > 0.15 and got["ece_after"] < got["ece_before"] / 2
    assert got["nll_after"] < got["nll_before"] and got["top1_after"] == got["top1_before"]


def test_calibrate_write_then_predict_and_evaluate_apply_the_temperature(run, plain, tmp_path, capsys):
    import jax

    from jaxtl.data.decode import load_image
    from jaxtl.evaluate import main as evaluate
    from jaxtl.export import read_model_file
    from jaxtl.predict import Predictor, main as predict

    out = copy_run(run, tmp_path / "calibrated")
    plain = {**plain, "checkpoint": str(out)}
    fitted = evaluate_json("--checkpoint", out, "--data", "digits", "--calibrate", "--write")
    c = fitted["calibrated"]
    t = c["temperature"]
    assert c["ece_after"] < c["ece_before"] and c["nll_after"] < c["nll_before"] and t > 1.5
    assert (c["ece_before"], c["nll_before"], c["top1_before"]) == (plain["ece"], plain["loss"], plain["top1"])
    assert c["ece_after"] < 0.5 * c["ece_before"] and c["top1_after"] == pytest.approx(plain["top1"], abs=0.01)
    assert any("optimistic" in note for note in fitted["notes"])
    assert json.loads((out / "meta.json").read_text())["temperature"] == t
    assert read_model_file(out / "model.msgpack")[1]["temperature"] == t
    # evaluate now reports with and without it; the uncalibrated numbers stay exactly what they were
    again = evaluate_json("--checkpoint", out, "--data", "digits")
    assert {k: again[k] for k in plain} == plain
    assert again["calibration"]["temperature"] == t and again["calibration"]["ece_after"] == pytest.approx(
        c["ece_after"])
    status, text, _ = cli(evaluate, capsys, "--checkpoint", out, "--data", "digits", "--split", "train",
                          "--calibrate")
    assert status == 0 and "the model's temperature T =" in text and "fit on --split val" in text

    # predict divides the logits by T: the printed probabilities are softmax(logits / T)
    image = tmp_path / "seven.png"
    from PIL import Image
    from sklearn.datasets import load_digits

    Image.fromarray(np.round(load_digits().images[7] * 255 / 16).astype(np.uint8)).resize((64, 64)).save(image)
    status, text, err = cli(predict, capsys, "--checkpoint", out, image, "--top-k", "3")
    assert status == 0, err
    assert text.splitlines()[0] == f"calibrated (T = {t:.4g})"
    status, line, _ = cli(predict, capsys, "--checkpoint", out, image, "--top-k", "10", "--json")
    got = json.loads(line)
    assert got["temperature"] == t
    raw = Predictor.from_checkpoint(run)
    logits = np.asarray(jax.jit(lambda v, x: raw.model.apply(v, x, train=False))(
        raw.variables, raw.prepare(load_image(image))[None]))[0]
    printed = np.zeros(10)
    for entry in got["top_k"]:
        printed[entry["index"]] = entry["probability"]
    assert np.allclose(printed, softmax(logits / t), atol=2e-6)
    assert not np.allclose(printed, softmax(logits), atol=1e-3)
