"""The backbone registry: one ``BackboneSpec`` per model name.

A spec says everything the rest of jaxtl needs to know about a backbone
without importing torch: how to build the Flax module, how each weight source
names its tensors (the key map used by :mod:`jaxtl.convert`), which pretrained
files exist and how their images were preprocessed, the ordered layer groups
that transfer strategies freeze and unfreeze, and where the classifier head is.

A catalogue: it imports no model code. Model families register their specs
when :mod:`jaxtl.models` is imported (one family per file, like timm), which
``import jaxtl`` does.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from jaxtl.data.preprocessing import (IMAGENET_MEAN, IMAGENET_STD, INCEPTION_MEAN, INCEPTION_STD,  # noqa: F401
                                      OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocessing, timm_preprocessing)
from jaxtl.errors import ConfigError, UnknownModelError

# A leaf of a Flax variable tree: (collection, module path..., leaf name),
# e.g. ("params", "layer1_0", "conv1", "kernel").
FlaxPath = tuple[str, ...]
# A transform from the PyTorch array to the Flax array.
Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class PretrainedWeights:
    """One published checkpoint of a backbone."""

    tag: str                      # e.g. "IMAGENET1K_V2" (torchvision) or "a1_in1k" (timm)
    filename: str                 # file name in the cache (torchvision: URL basename)
    url: str                      # where it is downloaded from
    preprocessing: Preprocessing
    hf_repo: str | None = None    # timm: the Hugging Face hub repo, e.g. "timm/resnet50.a1_in1k"
    num_classes: int = 1000
    class_names: str | None = "imagenet1k"  # a name jaxtl.classnames knows
    note: str = ""

    @property
    def sha256_prefix(self) -> str | None:
        """torchvision names files ``<name>-<first hex digits of sha256>.pth``."""
        m = re.search(r"-([0-9a-f]{8,64})\.(?:pth|pt|bin|safetensors)$", self.filename)
        return m.group(1) if m else None


TORCHVISION_URL = "https://download.pytorch.org/models/"


def torchvision_weights(tag: str, filename: str, preprocessing: Preprocessing, note: str = "") -> PretrainedWeights:
    """A torchvision file, downloaded from ``download.pytorch.org/models/<filename>``."""
    return PretrainedWeights(tag, filename, TORCHVISION_URL + filename, preprocessing, note=note)


def timm_hub_weights(model: str, tag: str, preprocessing: Preprocessing, note: str = "",
                     num_classes: int = 1000) -> PretrainedWeights:
    """timm's ``model.safetensors`` of ``timm/<model>.<tag>`` on the Hugging Face hub.

    ``num_classes=0``: the file has no classifier (a backbone for features:
    DINOv2, CLIP's image tower, SigLIP), as timm's pretrained_cfg says."""
    repo = f"timm/{model}.{tag}"
    return PretrainedWeights(tag, "model.safetensors", f"https://huggingface.co/{repo}/resolve/main/model.safetensors",
                             preprocessing, hf_repo=repo, note=note, num_classes=num_classes,
                             class_names="imagenet1k" if num_classes == 1000 else None)


@dataclass(frozen=True)
class SourceSpec:
    """How one weight source (torchvision, timm) describes a backbone."""

    name: str                               # "torchvision" | "timm"
    model_name: str                         # the name in that library ("resnet50", "vit_b_16")
    key_map: Callable[[FlaxPath], "str | tuple[str, Transform]"]
    weights: tuple[PretrainedWeights, ...] = ()
    model_kwargs: Mapping[str, Any] = field(default_factory=dict)  # e.g. BatchNorm eps
    ignore_keys: tuple[str, ...] = (r"(^|\.)num_batches_tracked$",)  # regexes of keys with no Flax twin
    torch_kwargs: Mapping[str, Any] = field(default_factory=dict)   # for building the reference model
    # Called when a converted leaf's shape differs from the model's:
    # adapt(flax_path, array, target_shape) -> adapted array, or None for "wrong shape".
    # ViTs use it to resample position embeddings to another image size.
    adapt: Callable[[FlaxPath, np.ndarray, tuple[int, ...]], np.ndarray | None] | None = None
    # Applied to the checkpoint's {key: array} before any key is matched, so one
    # key map serves several spellings of the same tensors (torchvision's
    # published DenseNet files say "norm.1" where the module says "norm1").
    # Returns the renamed dict; raises ConversionError if two keys collide.
    rename_keys: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None
    # What ``features_only=True`` computes, from the PyTorch reference model:
    # reference_features(torch_model, nchw_images) -> (batch, num_features).
    # For backbones whose features are not the library model's own output
    # (DINOv2's class token + patch mean); None: the model's pre-logits.
    reference_features: Callable[[Any, Any], Any] | None = None

    def default_weights(self) -> PretrainedWeights | None:
        return self.weights[0] if self.weights else None

    def find_weights(self, tag: str | None) -> PretrainedWeights:
        if tag is None:
            w = self.default_weights()
            if w is None:
                raise ConfigError(f"{self.model_name} has no published {self.name} weights known to jaxtl; "
                                  "pass a file with --weights-file")
            return w
        for w in self.weights:
            if w.tag.lower() == tag.lower():
                return w
        known = ", ".join(w.tag for w in self.weights) or "none"
        raise ConfigError(f"unknown {self.name} weights tag {tag!r} for {self.model_name}; known tags: {known}")


@dataclass(frozen=True)
class BackboneSpec:
    """Everything jaxtl knows about one backbone name."""

    name: str
    family: str
    constructor: Callable[..., Any]          # (num_classes=..., dtype=..., **model_kwargs) -> nn.Module
    sources: Mapping[str, SourceSpec]
    # Ordered from input to output; each group is (group name, parameter-path
    # prefixes). Strategies freeze/unfreeze whole groups; the last one is the head.
    layer_groups: tuple[tuple[str, tuple[tuple[str, ...], ...]], ...]
    head_path: tuple[str, ...]               # the classifier Dense to replace, e.g. ("fc",)
    preprocessing: Preprocessing = Preprocessing()
    default_source: str = "torchvision"
    num_features: int | None = None          # width of the pooled features fed to the head
    description: str = ""

    @property
    def group_names(self) -> tuple[str, ...]:
        return tuple(g for g, _ in self.layer_groups)

    @property
    def head_group(self) -> str:
        return self.layer_groups[-1][0]

    def source(self, name: str | None) -> SourceSpec:
        name = name or self.default_source
        try:
            return self.sources[name]
        except KeyError:
            known = ", ".join(sorted(self.sources))
            raise ConfigError(f"{self.name} has no weights from source {name!r}; known sources: {known}") from None

    def group_of(self, param_path: Sequence[str]) -> str:
        """The layer group a parameter path belongs to (longest prefix wins)."""
        best, best_len = None, -1
        for group, prefixes in self.layer_groups:
            for prefix in prefixes:
                n = len(prefix)
                if tuple(param_path[:n]) == tuple(prefix) and n > best_len:
                    best, best_len = group, n
        if best is None:
            raise ConfigError(f"{self.name}: parameter {'/'.join(param_path)} is in no layer group "
                              f"(groups: {', '.join(self.group_names)})")
        return best

    def preprocessing_for(self, source: str | None = None, tag: str | None = None) -> Preprocessing:
        src = self.sources.get(source or self.default_source)
        if src is not None and src.weights:
            return src.find_weights(tag).preprocessing
        return self.preprocessing


_REGISTRY: dict[str, BackboneSpec] = {}
_ALIASES: dict[str, tuple[str, str]] = {}  # alias -> (canonical name, source)


def register(spec: BackboneSpec, aliases: Mapping[str, str] | None = None) -> BackboneSpec:
    """Add a backbone; ``aliases`` maps other names (e.g. timm's) to a source."""
    if spec.name in _REGISTRY:
        raise ValueError(f"backbone {spec.name!r} registered twice")
    if spec.default_source not in spec.sources:
        raise ValueError(f"{spec.name}: default source {spec.default_source!r} not in its sources")
    _REGISTRY[spec.name] = spec
    for alias, source in (aliases or {}).items():
        if alias != spec.name:
            _ALIASES[alias] = (spec.name, source)
    return spec


def resolve(name: str) -> tuple[BackboneSpec, str]:
    """Look up a name or alias; returns (spec, the source the name implies)."""
    if not isinstance(name, str):
        raise UnknownModelError(f"backbone name must be a string, got {type(name).__name__}")
    key = name.strip()
    if key in _REGISTRY:
        spec = _REGISTRY[key]
        return spec, spec.default_source
    if key in _ALIASES:
        canonical, source = _ALIASES[key]
        return _REGISTRY[canonical], source
    lowered = key.lower().replace("-", "_")
    if lowered != key and (lowered in _REGISTRY or lowered in _ALIASES):
        return resolve(lowered)
    base, dot, _ = key.rpartition(".")
    if dot and (base in _REGISTRY or base in _ALIASES):   # timm's "model.tag": the tag picks weights, not a model
        return resolve(base)
    known = sorted(set(_REGISTRY) | set(_ALIASES))
    close = difflib.get_close_matches(lowered, known, n=5, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else "see jaxtl.list_models()"
    raise UnknownModelError(f"unknown backbone {name!r}; {hint} ({len(_REGISTRY)} backbones known)")


def split_weights_tag(name: str) -> tuple[str, str | None]:
    """timm's ``model.tag`` (``vit_small_patch14_dinov2.lvd142m``) -> (model, tag);
    a registered name or anything else -> (name, None)."""
    key = name.strip() if isinstance(name, str) else name
    if not isinstance(key, str) or "." not in key or key in _REGISTRY or key in _ALIASES:
        return name, None
    base, _, tag = key.rpartition(".")
    try:
        resolve(base)
    except UnknownModelError:
        return name, None
    return base, tag


def get_spec(name: str) -> BackboneSpec:
    return resolve(name)[0]


def list_models(pattern: str | None = None, *, include_aliases: bool = False) -> list[str]:
    """Names the registry knows, sorted; ``pattern`` is a shell-style wildcard."""
    import fnmatch

    names = set(_REGISTRY)
    if include_aliases:
        names |= set(_ALIASES)
    names = sorted(names)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


# ---------------------------------------------------------------------------
# Key-map helpers shared by families.

_INDEX = re.compile(r"_(\d+)(?=_|$)")

LEAF_TO_TORCH = {
    ("params", "kernel"): "weight",
    ("params", "bias"): "bias",
    ("params", "scale"): "weight",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}


class TableKeyMap:
    """A source's key map driven by a table ``{flax module path: torch module name}``.

    ``("params", "stage2_0", "fc1", "kernel")`` -> ``table[("stage2_0", "fc1")] + ".weight"``
    (the leaf through :data:`LEAF_TO_TORCH`). Families whose tables carry more
    (a layout adapter, a leaf that is its own module) override :meth:`torch_key`.
    """

    def __init__(self, variant: str, source: str, table: Mapping[tuple[str, ...], Any]):
        self.variant, self.source, self.table = variant, source, table

    def torch_key(self, collection: str, modules: tuple[str, ...], leaf: str):
        """The PyTorch key (or ``(key, adapter)``); KeyError when there is none."""
        return f"{self.table[modules]}.{LEAF_TO_TORCH[(collection, leaf)]}"

    def __call__(self, flax_path: FlaxPath):
        collection, *modules, leaf = flax_path
        try:
            return self.torch_key(collection, tuple(modules), leaf)
        except KeyError:
            raise KeyError(f"no {self.source} name for Flax leaf {'/'.join(flax_path)} ({self.variant})") from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.variant!r}, {self.source!r})"


def torch_module_name(flax_module: str) -> str:
    """``layer1_0`` -> ``layer1.0``; ``features_3_conv_0`` -> ``features.3.conv.0``.

    Flax module names use ``_<index>`` where PyTorch has ``.<index>`` (a list
    position); names such as ``bn1`` or ``conv_dw`` are unchanged.
    """
    return _INDEX.sub(r".\1", flax_module)


def default_leaf_transform(flax_path: FlaxPath) -> Transform | None:
    """PyTorch -> Flax layout for the usual leaves; None means "as is"."""
    leaf = flax_path[-1]
    if flax_path[0] == "params" and leaf == "kernel":
        return torch_kernel_to_flax
    return None


def torch_kernel_to_flax(w: np.ndarray) -> np.ndarray:
    """Conv OIHW -> HWIO (depthwise (C,1,kh,kw) -> (kh,kw,1,C)); Linear (out,in) -> (in,out)."""
    if w.ndim == 4:
        return np.transpose(w, (2, 3, 1, 0))
    if w.ndim == 2:
        return w.T
    if w.ndim == 3:  # Conv1d
        return np.transpose(w, (2, 1, 0))
    return w


def standard_key_map(flax_path: FlaxPath, rename: Callable[[tuple[str, ...]], str] | None = None) -> str:
    """The PyTorch key of a Flax leaf when module names mirror PyTorch's."""
    collection, *modules, leaf = flax_path
    try:
        torch_leaf = LEAF_TO_TORCH[(collection, leaf)]
    except KeyError:
        raise KeyError(f"no PyTorch name for Flax leaf {'/'.join(flax_path)}") from None
    prefix = rename(tuple(modules)) if rename else ".".join(torch_module_name(m) for m in modules)
    return f"{prefix}.{torch_leaf}" if prefix else torch_leaf


def conv1x1_to_dense(w: np.ndarray) -> np.ndarray:
    """A 1x1 conv weight (O, I, 1, 1) as a Dense kernel (I, O)."""
    if w.ndim != 4 or w.shape[2:] != (1, 1):
        return w  # the converter reports the shape mismatch with the key's name
    return w[:, :, 0, 0].T
