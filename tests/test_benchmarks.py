"""The benchmark scripts: a smoke run, and their --out handling (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def _bench(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "bench_throughput.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=BENCH.parent)


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
