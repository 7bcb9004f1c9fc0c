"""Several processes and device counts: the same run, whoever computes it.

Two ``python -m jaxtl.train`` processes on localhost (one CPU device each, collectives over
gloo) share one ``--output``; they train, checkpoint, lose a peer to ``kill -9``, resume and
export. Every result is compared with one process on two host devices, and with one and four
devices: the same seed and global batch give the same run to float rounding, because every
random draw comes from the step and the example's position in the global batch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

import jaxtl

# A random-init ViT-Tiny fine-tuned with random crops (positional randomness is under test), 10 digits
# per class (6 steps an epoch) at 32 px, 180 validation images in 3 batches: small, because two
# processes on one small CPU exchange every sum of every step as a round trip between them.
# LayerNorm and GELU keep the runs within rounding of each other over the 12 steps; a BatchNorm
# network with ReLU6 at this size (MobileNetV2) drifts apart further, since rounding flips which
# activations sit on a kink (its first update differs by 2.5e-3 between 1 and 4 devices).
RUN = ["--backbone", "vit_tiny_patch16_224", "--weights", "none", "--strategy", "finetune", "--img-size", "32",
       "--limit-per-class", "10", "--val-fraction", "0.1", "--batch-size", "16", "--eval-batch-size", "60",
       "--opt", "sgd", "--lr", "0.02", "--momentum", "0.9", "--epochs", "2", "--no-progress"]
LOST_PEER_BOUND_S = 60
LOST = "lost contact with another process of the run"


def _env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_process(out: Path, devices: int, *extra) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "jaxtl.train", *RUN, "--output", str(out), *map(str, extra)],
                       capture_output=True, text=True, timeout=600, env=_env(devices))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def start_processes(out: Path, n: int, *extra) -> list[subprocess.Popen]:
    """Process 0 is told where it stands by flags, the others by JAX_* variables: both ways are used."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(n):
        flags = ["--coordinator", address, "--num-processes", str(n), "--process-id", str(i)] if i == 0 else []
        env = _env(1) if i == 0 else {**_env(1), "JAX_COORDINATOR_ADDRESS": address, "JAX_NUM_PROCESSES": str(n),
                                      "JAX_PROCESS_ID": str(i)}
        procs.append(subprocess.Popen([sys.executable, "-m", "jaxtl.train", *RUN, "--output", str(out),
                                       *map(str, extra), *flags], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def params(out: Path) -> dict:
    _, variables, _ = jaxtl.load_model(out)
    return traverse_util.flatten_dict(variables, sep="/")


def assert_same_run(out: Path, ref: Path, rel: float) -> None:
    """The same per-epoch losses and exported model as ``ref``, to ``rel``."""
    got, want = records(out), records(ref)
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want):
        for key in ("train_loss", "val_loss"):
            assert abs(a[key] - b[key]) <= rel * abs(b[key]), (key, a[key], b[key])
        assert a["val_top1"] == pytest.approx(b["val_top1"], abs=1.5 / 180)  # at most one image flips
    p, q = params(out), params(ref)
    assert p.keys() == q.keys()
    # Over the whole tree: some leaves are rounding alone (attention key biases get no gradient, 1e-11).
    diff = np.sqrt(sum(float(np.sum((p[k] - q[k]).astype(np.float64) ** 2)) for k in q))
    size = np.sqrt(sum(float(np.sum(q[k].astype(np.float64) ** 2)) for k in q))
    assert diff <= rel * size, diff / size


@pytest.fixture(scope="module")
def two_devices(tmp_path_factory) -> Path:
    """The reference: one process with two host devices."""
    out = tmp_path_factory.mktemp("mp") / "one-process-two-devices"
    one_process(out, 2)
    return out


@pytest.mark.slow
def test_two_processes_lose_a_peer_resume_and_match_one_process(two_devices, tmp_path):
    out = tmp_path / "two-processes"
    procs = start_processes(out, 2)
    first_checkpoint = out / "checkpoints" / str(records(two_devices)[0]["step"])  # the first epoch's
    deadline = time.time() + 300
    while not (first_checkpoint.is_dir() and (out / "metrics.jsonl").exists() and records(out)):
        assert time.time() < deadline and all(p.poll() is None for p in procs), finish(procs, 5)
        time.sleep(0.1)
    time.sleep(1.0)  # into the second epoch
    procs[1].send_signal(signal.SIGKILL)
    killed = time.time()
    code, _, stderr = finish(procs[:1], timeout=LOST_PEER_BOUND_S + 30)[0]
    assert time.time() - killed <= LOST_PEER_BOUND_S
    assert code != 0 and LOST in stderr, stderr[-3000:]
    assert "start all 2 processes again with --resume" in stderr
    assert [r["epoch"] for r in records(out)] == [0]
    elsewhere = tmp_path / "resumed-by-one-process"
    shutil.copytree(out, elsewhere)

    # The same two processes resume from the last complete checkpoint and end as one process on two devices.
    results = finish(start_processes(out, 2, "--resume"))
    assert [code for code, _, _ in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    jaxtl_lines = [line for line in results[1][1].splitlines() if not line.startswith("[Gloo]")]
    assert "resumed from step" in results[0][1] and not jaxtl_lines  # process 0 speaks for the run
    assert_same_run(out, two_devices, rel=1e-6)
    for name in ("model.msgpack", "meta.json", "config.json", "curves.png", "confusion_matrix.png"):
        assert (out / name).stat().st_size > 0, name

    # Another process and device count resumes the same checkpoint: the state is replicated and the
    # global batches do not depend on who loads them.
    one_process(elsewhere, 1, "--resume")
    assert_same_run(elsewhere, two_devices, rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("devices", [1, 4])
def test_one_and_four_devices_match_two(two_devices, tmp_path, devices):
    out = tmp_path / f"{devices}-devices"
    one_process(out, devices)
    assert_same_run(out, two_devices, rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (dict(coordinator="localhost", num_processes=2, process_id=0), "expected HOST:PORT"),
    (dict(coordinator="10.0.0.1:1234", num_processes=2), "missing --process-id"),
    (dict(coordinator="10.0.0.1:1234", num_processes="two", process_id=0), "must be whole numbers"),
    (dict(coordinator="10.0.0.1:1234", num_processes=2, process_id=2), "must be 0 to 1"),
    (dict(coordinator="auto", num_processes=2), "leave out --num-processes"),
])
def test_process_flags_are_checked(flags, message):
    from jaxtl.errors import ConfigError
    from jaxtl.runtime import processes_from

    with pytest.raises(ConfigError, match=message):
        processes_from(**flags, environ={})


def test_where_a_process_stands_comes_from_flags_environment_or_launcher():
    from jaxtl.runtime import AUTO, Processes, processes_from

    assert processes_from(environ={}) == Processes(None, None, None)  # one process: nothing to join
    assert processes_from("h:1", "2", "1", environ={}) == Processes("h:1", 2, 1)
    env = {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert processes_from(environ=env) == Processes("h:1", 4, 3)
    assert processes_from(environ={"SLURM_NTASKS": "8"}).coordinator == AUTO  # srun: JAX detects the rest
    assert not processes_from(environ={"SLURM_NTASKS": "1"}).wanted


def test_bad_process_flags_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jaxtl.train", "--output", str(tmp_path / "o"), "--coordinator",
                        "127.0.0.1", "--num-processes", "2", "--process-id", "0"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "jaxtl.train: error: --coordinator '127.0.0.1': expected HOST:PORT" in r.stderr.strip().splitlines()[-1]
    r = subprocess.run([sys.executable, "-m", "jaxtl.train", "--coordinator", "127.0.0.1:1", "--num-processes", "2",
                        "--process-id", "1"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "pass --output DIR, the same on every process" in r.stderr, r.stderr[-2000:]
