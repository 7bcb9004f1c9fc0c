"""Where jaxtl and the libraries it works with keep files on disk.

Every folder honours the variable its owner documents: ``JAXTL_CACHE`` for
jaxtl's own cache (converted weights, downloads, compiled steps, the native
kernels), ``TORCH_HOME`` for torchvision's downloads, ``HF_HUB_CACHE`` /
``HF_HOME`` for timm's, and ``XDG_CACHE_HOME`` under all three.
"""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path


def _xdg_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache")))


def jaxtl_cache_dir() -> Path:
    if os.environ.get("JAXTL_CACHE"):
        return Path(os.environ["JAXTL_CACHE"])
    return _xdg_cache() / "jaxtl"


def torch_hub_checkpoints_dir() -> Path:
    """Where torchvision keeps downloaded weights."""
    torch_home = os.environ.get("TORCH_HOME")
    return (Path(torch_home) if torch_home else _xdg_cache() / "torch") / "hub" / "checkpoints"


def hf_hub_cache_dir() -> Path:
    """Where the Hugging Face hub (and so timm) keeps downloaded weights."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    hf_home = os.environ.get("HF_HOME")
    return (Path(hf_home) if hf_home else _xdg_cache() / "huggingface") / "hub"


def cpu_tag() -> str:
    """A short, stable name for this processor's instruction set.

    Compiled code is cached under it, so a home folder shared by different
    machines never hands one CPU code built for another's instructions.
    """
    flags = ""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):  # x86 / ARM
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    text = f"{platform.machine()} {flags or platform.processor()}"
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def compile_cache_dir() -> Path:
    """JAX's persistent compilation cache for this jaxlib and processor."""
    import jaxlib

    return jaxtl_cache_dir() / "xla" / f"jaxlib-{jaxlib.__version__}-{cpu_tag()}"


def native_build_dir(build_key: str) -> Path:
    """Where the native CPU kernels built from one set of sources live."""
    return jaxtl_cache_dir() / "native" / f"{build_key}-{cpu_tag()}"
