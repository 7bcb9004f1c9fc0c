"""Class names of the datasets published heads were trained on."""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

from jaxtl.errors import ConfigError

_FILES = {"imagenet1k": "imagenet1k_classes.txt"}


@lru_cache(maxsize=None)
def class_names(dataset: str) -> tuple[str, ...]:
    """E.g. ``class_names("imagenet1k")[281] == "tabby"`` (torchvision's names)."""
    try:
        fname = _FILES[dataset]
    except KeyError:
        raise ConfigError(f"no class names for {dataset!r}; known: {', '.join(_FILES)}") from None
    text = resources.files("jaxtl.resources").joinpath(fname).read_text(encoding="utf-8")
    return tuple(line for line in text.splitlines() if line)
