"""The README's "Training from Python" example runs as written, on a folder of real photos."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def readme_python_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Training from Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def write_photo_folder(root: Path, per_class: int = 8) -> None:
    """photos/<class>/<i>.jpg: random crops of scikit-image's photos, one class per photo."""
    from skimage import data

    rng = np.random.default_rng(0)
    for name, image in (("cat", data.chelsea()), ("coffee", data.coffee()), ("rocket", data.rocket())):
        (root / name).mkdir(parents=True)
        h, w = image.shape[:2]
        for i in range(1, per_class + 1):
            top, left = rng.integers(0, h // 3), rng.integers(0, w // 3)
            crop = image[top:top + 2 * h // 3, left:left + 2 * w // 3]
            Image.fromarray(crop).save(root / name / f"{i}.jpg", quality=90)


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written(tmp_path):
    code = readme_python_example()
    assert "jaxtl.train(" in code and "jaxtl.load_model(" in code
    write_photo_folder(tmp_path / "photos")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-2].startswith("validation top-1:") and 0.0 <= float(lines[-2].split()[-1]) <= 1.0
    assert lines[-1] in ("cat", "coffee", "rocket")
    assert (tmp_path / "runs" / "photos" / "model.msgpack").is_file()
