"""``python -m jaxtl.lr_find``: the learning-rate range test, its suggestions, plot and errors."""

from __future__ import annotations

import re
import tempfile

import numpy as np
import pytest

from jaxtl.errors import ConfigError
from jaxtl.lr_find import lr_find, main, smooth, suggest, valley
from jaxtl.optim import OptimConfig
from jaxtl.runtime import NO_COMPILE_CACHE
from jaxtl.training.config import TrainConfig

# Random-init ResNet-18 at 32 px on 10 digits per class, fine-tuned with SGD: every sweep below compiles
# the same step (the rate is an input), so the runs after the first load it from the tests' cache.
SMALL = dict(backbone="resnet18", weights="none", img_size=32, limit_per_class=10, batch_size=16,
             strategy="finetune", optim=OptimConfig(opt="sgd"), progress=False)
SMALL_ARGS = ["--backbone", "resnet18", "--weights", "none", "--img-size", "32", "--limit-per-class", "10",
              "--batch-size", "16", "--strategy", "finetune", "--opt", "sgd", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep():
    """lr_find on the small run, memoised per (start, end, num_it): the tests share the sweeps."""
    done = {}

    def run(start, end, num_it, again=False):
        key = (start, end, num_it)
        if again or key not in done:
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv(NO_COMPILE_CACHE, "1")  # lr_find() must not switch this test process's JAX cache on
                done[key] = lr_find(TrainConfig(**SMALL), start, end, num_it, log=lambda line: None)
        return done[key]

    return run


def test_the_curve_is_monotone_in_the_learning_rate(sweep):
    r = sweep(1e-7, 1e-6, 8)
    assert not r.stopped_early and len(r.lrs) == len(r.losses) == len(r.smoothed) == 8
    lrs = np.asarray(r.lrs)
    assert np.all(np.diff(lrs) > 0)
    ratios = lrs[1:] / lrs[:-1]
    np.testing.assert_allclose(ratios, 10 ** (1 / 7), rtol=1e-12)  # geometric: one constant ratio
    assert r.lrs[0] == pytest.approx(1e-7, rel=1e-12) and r.lrs[-1] == pytest.approx(1e-6, rel=1e-12)
    assert 1e-7 <= r.suggestion <= 1e-6 and 1e-7 <= r.steep <= 1e-6
    np.testing.assert_allclose(r.smoothed, smooth(r.losses), rtol=1e-12)


def test_a_tiny_rate_barely_moves_the_loss_and_a_huge_one_diverges(sweep):
    tiny, still = sweep(1e-7, 1e-6, 8), sweep(1e-12, 1e-11, 8)
    assert np.all(np.isfinite(tiny.losses))
    # The same batches as a sweep at practically zero rate, and nearly the same losses.
    np.testing.assert_allclose(tiny.losses, still.losses, atol=5e-3)  # measured: 8e-4 at most
    huge = sweep(1e-4, 10.0, 20)
    assert huge.stopped_early and len(huge.lrs) < 20
    last = huge.smoothed[-1]
    assert not np.isfinite(last) or last > 4 * min(huge.smoothed[:-1])  # fastai's stop_div
    assert huge.losses[0] == tiny.losses[0]  # the same starting state and first batch
    assert 1e-4 <= huge.suggestion <= 10.0
    assert abs(huge.losses[-1] - huge.losses[0]) > 10 * np.max(np.abs(np.subtract(tiny.losses, still.losses)))


def test_the_sweep_does_not_change_the_model(sweep):
    """Two sweeps with the same seed start from the same state and see the same batches."""
    first = sweep(1e-7, 1e-6, 8)
    again = sweep(1e-7, 1e-6, 8, again=True)
    assert again is not first
    assert again.losses == first.losses and again.lrs == first.lrs


def test_the_command_line_plots_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    work, temp = tmp_path / "work", tmp_path / "temp"
    work.mkdir()
    temp.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv(NO_COMPILE_CACHE, "1")
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the Trainer's temporary run folder goes
    status = main([*SMALL_ARGS, "--start-lr", "1e-4", "--end-lr", "10", "--num-it", "12", "--output", "mine",
                   "--plot", "plots/lr.png"])
    out = capsys.readouterr().out
    assert status == 0, out
    png = work / "plots" / "lr.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    found = re.search(r"suggested --lr (\S+) \(valley", out)
    assert found, out
    assert 1e-4 <= float(found.group(1)) <= 10.0
    assert "--output mine is ignored" in out
    assert list(temp.iterdir()) == []  # the temporary run folder is gone
    assert sorted(p.name for p in work.iterdir()) == ["plots"]  # no runs/, no --output folder


def test_bad_options_are_one_line_errors(tmp_path, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the options were refused")

    monkeypatch.setattr("jaxtl.training.loop.load_dataset", no_data)
    monkeypatch.setenv(NO_COMPILE_CACHE, "1")
    monkeypatch.chdir(tmp_path)
    cases = [(["--start-lr", "0"], "--start-lr must be a positive number"),
             (["--end-lr", "-1"], "--end-lr must be a positive number"),
             (["--start-lr", "1", "--end-lr", "0.1"], "--start-lr 1 must be below --end-lr 0.1"),
             (["--start-lr", "0.1", "--end-lr", "0.1"], "must be below"),
             (["--num-it", "4"], "--num-it must be a whole number >= 5"),
             (["--resume"], "--resume continues a run"),
             (["--epochs", "0"], "--epochs must be >= 1")]
    for args, message in cases:
        capsys.readouterr()
        status = main([*SMALL_ARGS, *args])
        err = capsys.readouterr().err
        assert status == 2, (args, err)
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="--num-it"):
        lr_find(TrainConfig(**SMALL), num_it=2)


def test_smoothing_and_suggestions_follow_fastai():
    # Debiased: a constant loss is its own average from the first step on.
    np.testing.assert_allclose(smooth([2.0] * 10), 2.0)
    assert smooth([1.0, 3.0])[1] == pytest.approx((0.98 * 0.02 * 1 + 0.02 * 3) / (1 - 0.98 ** 2))
    # A flat start, a long descent, then divergence: the valley is the descent, the suggestion inside it.
    lrs = np.geomspace(1e-6, 1, 60)
    losses = np.concatenate([np.full(15, 2.0) + np.linspace(0, 1e-3, 15), np.linspace(2.0, 0.5, 30),
                             np.linspace(0.5, 5.0, 15)])
    index, start, end = valley(losses)
    # The longest decreasing subsequence: the last flat point (2.001) and the 30 of the descent, L = 31.
    assert (start, end) == (44 - 31, 44) and index == start + 31 // 3 + int(31 / 3 / 2)
    picked = suggest(lrs, losses, 60)  # the window leaves out the first 60 // 10 and the last 5 points
    assert picked["suggestion"] == lrs[index]
    assert picked["minimum"] == pytest.approx(lrs[44] / 10)
    assert lrs[15] <= picked["steep"] <= lrs[44]
    # Nothing descends: fastai's index would fall before the window; the window's first point instead.
    assert valley(np.arange(10.0))[0] == 0
