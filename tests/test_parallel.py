"""Data parallelism: 4 host devices give the same training as 1 (shard_map and pmap)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "helpers" / "parallel_equivalence.py"


@pytest.mark.slow
def test_four_devices_match_one_device():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    print(result)
    assert result["changed"] > 1e-3  # the steps really trained
    for mapping in ("shard_map_4", "pmap_4"):
        assert result[mapping]["trajectory"]["max_rel"] <= 1e-5, result
        assert result[mapping]["trajectory"]["loss_rel"] <= 1e-5, result
        assert result[mapping]["one_step"]["params_update_rel"] <= 1e-4, result
        assert result[mapping]["one_step"]["stats_update_rel"] <= 1e-4, result
