"""Pretrained backbones: find the file, check it, convert it once, cache it.

``load_pretrained("mobilenet_v2")`` finds torchvision's ImageNet file (the
embedded offline package, the torch hub cache, or a download), checks its
sha256 against the prefix in its name, converts it and caches the converted
variables under ``~/.cache/jaxtl/converted`` keyed by the file's sha256, so
later runs skip the conversion. A replaced head (``num_classes`` different
from the checkpoint's) is initialised after the cache, from ``seed``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import serialization, traverse_util
from PIL import Image

from jaxtl.classnames import class_names as known_class_names
from jaxtl.conversion import checkpoint_num_classes, from_state_dict, init_head
from jaxtl.errors import ConfigError, HeadlessCheckpoint
from jaxtl.export import atomic_write_bytes, read_model_file
from jaxtl.hub import find_pretrained
from jaxtl.paths import jaxtl_cache_dir
from jaxtl.models import create_model
from jaxtl.data.decode import load_image
from jaxtl.data.preprocessing import Preprocessing
from jaxtl.data.transforms import eval_transform
from jaxtl.registry import resolve, split_weights_tag
from jaxtl.weights import check_weights_path, read_state_dict, sha256_file


@dataclass
class PretrainedInfo:
    """Where a model's weights came from (goes into exported metadata)."""

    backbone: str
    source: str
    tag: str | None
    file: str
    sha256: str
    num_classes: int
    checkpoint_num_classes: int
    class_names: list[str] | None
    preprocessing: Preprocessing
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        return {
            "backbone": self.backbone,
            "source": self.source,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "preprocessing": self.preprocessing.to_dict(),
            "model_kwargs": self.model_kwargs,
            "weights": {"tag": self.tag, "file": os.path.basename(self.file), "sha256": self.sha256,
                        "checkpoint_num_classes": self.checkpoint_num_classes},
        }


def _cache_path(name: str, source: str, sha256: str, model_kwargs: dict) -> Path:
    extra = "".join(f"-{k}{v}" for k, v in sorted(model_kwargs.items()))
    return jaxtl_cache_dir() / "converted" / f"{name}-{source}-{sha256[:16]}{extra}.msgpack"


def load_pretrained(name: str, source: str | None = None, *, tag: str | None = None,
                    weights_file: str | Path | None = None, num_classes: int | None = None, seed: int = 0,
                    allow_download: bool = True, use_cache: bool = True, **model_kwargs):
    """Return ``(model, variables, info)`` for a pretrained backbone.

    ``num_classes`` different from the checkpoint's replaces the head with a
    fresh one (the transfer-learning case); None keeps the checkpoint's head.
    A checkpoint without a classifier (DINOv2, CLIP's and SigLIP's image
    towers) needs ``num_classes``: its head is always new
    (:class:`~jaxtl.errors.HeadlessCheckpoint` otherwise). ``name`` may be
    timm's ``model.tag``.
    """
    name, name_tag = split_weights_tag(name)
    if name_tag is not None and tag is not None and tag.lower() != name_tag.lower():
        raise ConfigError(f"{name}.{name_tag} names weights {name_tag!r} but tag={tag!r}; give one of them")
    tag = tag or name_tag
    spec, implied = resolve(name)
    src = spec.source(source or implied)
    if weights_file is not None:
        path = check_weights_path(weights_file)
        sha = sha256_file(path)
        weights = None
    else:
        weights = src.find_weights(tag)
        path, sha = find_pretrained(weights, backbone=spec.name, source=src.name, allow_download=allow_download)

    cache = _cache_path(spec.name, src.name, sha, model_kwargs)
    variables = None
    if use_cache and cache.is_file():
        try:
            variables, meta = read_model_file(cache)
        except Exception:  # noqa: BLE001 - a bad cache entry is rebuilt, never trusted
            variables = None
    if variables is None:
        state = read_state_dict(path)
        if checkpoint_num_classes(spec, src, state) is None:
            # A backbone for features (DINOv2, SigLIP): convert it, and cache it without a classifier.
            _, variables = from_state_dict(spec.name, state, src.name, head="new", num_classes=1, **model_kwargs)
            variables = _without_head(variables, spec.head_path)
        else:
            _, variables = from_state_dict(spec.name, state, src.name, **model_kwargs)
        if use_cache:
            try:
                payload = {"meta": _cache_meta(spec.name, src.name, sha, model_kwargs), "variables": variables}
                atomic_write_bytes(cache, serialization.msgpack_serialize(payload))
            except OSError:
                pass  # the cache is an optimisation; a read-only home must not stop the run

    head = traverse_util.flatten_dict(variables["params"])
    if (*spec.head_path, "kernel") not in head:
        ckpt_classes = 0
        if num_classes is None:
            raise _headless(spec, weights, path)
        variables = _with_new_head(variables, spec, src.name, num_classes, seed, model_kwargs)
    else:
        ckpt_classes = int(head[(*spec.head_path, "kernel")].shape[-1])
    if num_classes is not None and num_classes != ckpt_classes and ckpt_classes:
        variables = replace_head(variables, spec.head_path, num_classes, seed)
    n = num_classes or ckpt_classes
    names = None
    if n == ckpt_classes and weights is not None and weights.class_names:
        names = list(known_class_names(weights.class_names))
        if len(names) != n:
            names = None
    model = create_model(spec.name, n, source=src.name, **model_kwargs)
    preprocessing = weights.preprocessing if weights is not None else spec.preprocessing_for(src.name)
    if "img_size" in model_kwargs:
        preprocessing = preprocessing.at_size(int(model_kwargs["img_size"]))
    info = PretrainedInfo(spec.name, src.name, weights.tag if weights else None, str(path), sha, n, ckpt_classes,
                          names, preprocessing, dict(model_kwargs))
    return model, variables, info


def _cache_meta(name: str, source: str, sha256: str, model_kwargs: dict) -> str:
    import json

    from jaxtl.export import FORMAT

    return json.dumps({"format": FORMAT, "backbone": name, "source": source, "sha256": sha256,
                       "model_kwargs": model_kwargs})


def _headless(spec, weights, path) -> HeadlessCheckpoint:
    what = f"{weights.tag} weights" if weights is not None else f"weights in {Path(path).name}"
    return HeadlessCheckpoint(f"the {what} of {spec.name} have no classifier (a backbone for features); "
                              "give the number of classes: num_classes=N (--num-classes N)")


def _without_head(variables: dict, head_path: tuple[str, ...]) -> dict:
    flat = traverse_util.flatten_dict(variables)
    return traverse_util.unflatten_dict({k: v for k, v in flat.items() if k[1:1 + len(head_path)] != head_path})


def _with_new_head(variables: dict, spec, source: str, num_classes: int, seed: int, model_kwargs: dict) -> dict:
    """A headless backbone's variables with a fresh ``num_classes``-way classifier."""
    from jaxtl.models import abstract_variables

    shapes = traverse_util.flatten_dict(abstract_variables(create_model(spec.name, num_classes, source=source,
                                                                        **model_kwargs), spec))
    flat = traverse_util.flatten_dict(variables)
    flat.update(init_head({p: sds for p, sds in shapes.items() if p[1:1 + len(spec.head_path)] == spec.head_path},
                          seed))
    return traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()})


def replace_head(variables: dict, head_path: tuple[str, ...], num_classes: int, seed: int = 0) -> dict:
    """Swap the classifier Dense for a fresh ``num_classes``-way one."""
    if num_classes < 1:
        raise ConfigError(f"num_classes must be positive, got {num_classes}")
    flat = traverse_util.flatten_dict(variables)
    kernel_path = ("params", *head_path, "kernel")
    in_features = flat[kernel_path].shape[0]

    shapes = {kernel_path: jax.ShapeDtypeStruct((in_features, num_classes), np.float32)}
    if ("params", *head_path, "bias") in flat:
        shapes[("params", *head_path, "bias")] = jax.ShapeDtypeStruct((num_classes,), np.float32)
    flat.update(init_head(shapes, seed))
    return traverse_util.unflatten_dict({k: np.asarray(v) for k, v in flat.items()})


def preprocess(images, backbone: str | Preprocessing, *, source: str | None = None,
               tag: str | None = None) -> np.ndarray:
    """Image files or PIL images -> the float32 NHWC batch a backbone expects (its resize, centre crop,
    mean and std, as torchvision's and timm's eval transforms).

    ``backbone`` is a registered name (its weights' preprocessing: ``source`` and ``tag`` pick them),
    an exported model's ``meta`` (from :func:`jaxtl.load_model`) or a :class:`Preprocessing`::

        x = jaxtl.preprocess(["cat.jpg", "dog.png"], "resnet50")
        logits = model.apply(variables, x, train=False)
    """
    if isinstance(backbone, Preprocessing):
        pre = backbone
    elif isinstance(backbone, Mapping):
        pre = Preprocessing.from_dict(backbone.get("preprocessing", backbone))
    else:
        backbone, name_tag = split_weights_tag(backbone)
        spec, implied = resolve(backbone)
        pre = spec.preprocessing_for(source or implied, tag or name_tag)
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    return np.stack([eval_transform(im if isinstance(im, Image.Image) else load_image(im), pre) for im in images])
