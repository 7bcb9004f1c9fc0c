"""PyTorch state dict -> Flax variables, with every key accounted for.

Each Flax leaf asks the source's key map for its PyTorch name (and layout
transform); then the converter checks that every checkpoint tensor was used
exactly once and every Flax leaf got a tensor of the right shape. Anything
else is an error that names the keys: a silent partial load (the bug of one
popular converter, which loaded nothing into a ResNet-18 because module
names differed) cannot happen. The only leaves that may be left out are the
classifier head's, when the caller asks for a new head (``head="new"``).

``python -m jaxtl.convert`` (and ``tools/convert_weights.py``) is the command
line over this module and :mod:`jaxtl.pretrained`.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

from jaxtl.errors import ConfigError, ConversionError
from jaxtl.models import abstract_variables, create_model
from jaxtl.models.layers import dense_init
from jaxtl.registry import BackboneSpec, SourceSpec, default_leaf_transform, resolve
from jaxtl.weights import unwrap_state_dict


def _list(items: list[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def _ref(src: SourceSpec, path: tuple[str, ...]):
    ref = src.key_map(path)
    if isinstance(ref, tuple):
        return ref
    return ref, default_leaf_transform(path)


def head_keys(spec: BackboneSpec, src: SourceSpec, shapes: Mapping[tuple, Any]) -> dict[tuple, str]:
    """Flax head leaves -> PyTorch keys."""
    n = len(spec.head_path)
    return {p: _ref(src, p)[0] for p in shapes if p[0] == "params" and p[1:1 + n] == spec.head_path}


def checkpoint_num_classes(spec: BackboneSpec, src: SourceSpec, arrays: Mapping[str, np.ndarray]) -> int | None:
    """Number of classes of the checkpoint's head, or None if it has none."""
    bias_path = ("params", *spec.head_path, "bias")
    key = _ref(src, bias_path)[0]
    if key in arrays and arrays[key].ndim == 1:
        return int(arrays[key].shape[0])
    kernel_key = _ref(src, ("params", *spec.head_path, "kernel"))[0]
    if kernel_key in arrays and arrays[kernel_key].ndim >= 1:
        return int(arrays[kernel_key].shape[0])
    return None


def from_state_dict(name: str, state_dict: Mapping[str, Any], source: str | None = None, *,
                    head: str = "keep", num_classes: int | None = None, seed: int = 0, **model_kwargs):
    """The Flax model built for these weights and its converted variables: ``(model, variables)``.

        model, variables = jaxtl.from_state_dict("resnet50", torch_model.state_dict(), source="torchvision")
        logits = model.apply(variables, images, train=False)

    ``head="keep"`` converts the checkpoint's classifier as is (``num_classes``,
    if given, must match it). ``head="new"`` keeps the backbone and gives a
    freshly initialised ``num_classes``-way head (from ``seed``): the transfer
    learning case. Any other missing, unexpected or mis-shaped key is a
    :class:`ConversionError` that names it. ``source`` defaults to the one the
    name implies (torchvision's names, or timm's).
    """
    spec, implied = resolve(name)
    src = spec.source(source or implied)
    return _convert(spec, src, state_dict, head, num_classes, seed, model_kwargs)


def convert_state_dict(name: str, state_dict: Mapping[str, Any], source: str | None = None, *,
                       head: str = "keep", num_classes: int | None = None, seed: int = 0, model=None,
                       **model_kwargs) -> dict:
    """:func:`from_state_dict`'s variables alone, ``{"params": ..., "batch_stats": ...}``.

    Where a source's weights need a model built for them (timm's MobileNetV3
    uses another BatchNorm epsilon than torchvision's), pass that ``model``
    (``jaxtl.create_model(name, source=...)``); it is checked against the source.
    Without it such a conversion is refused, since the name's default model
    would give other logits without saying so.
    """
    spec, implied = resolve(name)
    src = spec.source(source or implied)
    _check_model_fits(spec, src, implied, model, model_kwargs)
    return _convert(spec, src, state_dict, head, num_classes, seed, model_kwargs)[1]


def _check_model_fits(spec: BackboneSpec, src: SourceSpec, implied: str, model, model_kwargs: dict) -> None:
    """The model these variables will be applied with computes what ``src``'s weights were trained with.

    Dropout and stochastic-depth rates are training choices, not part of what the weights compute.
    """
    def computed(kwargs):
        return {k: v for k, v in kwargs.items() if "drop" not in k}

    wanted = computed({**src.model_kwargs, **model_kwargs})
    build = f"jaxtl.create_model({spec.name!r}, source={src.name!r})"
    if model is not None:
        wrong = [f"{k}={getattr(model, k)!r} where they need {v!r}" for k, v in sorted(wanted.items())
                 if hasattr(model, k) and getattr(model, k) != v]
        if wrong:
            raise ConversionError(f"the model was not built for {spec.name}'s {src.name} weights: it has "
                                  f"{'; '.join(wrong)}; build it with {build}, or use jaxtl.from_state_dict, which "
                                  "returns the model with its variables")
        return
    default, needed = computed(spec.source(implied).model_kwargs), computed(src.model_kwargs)
    differ = sorted(k for k in set(default) | set(needed) if default.get(k) != needed.get(k))
    if differ:
        raise ConversionError(f"{spec.name}'s {src.name} weights need a model built for them ({', '.join(differ)} "
                              f"differ from jaxtl.create_model({spec.name!r})'s); use model, variables = "
                              f"jaxtl.from_state_dict(...), or pass model={build}")


def _convert(spec: BackboneSpec, src: SourceSpec, state_dict: Mapping[str, Any], head: str,
             num_classes: int | None, seed: int, model_kwargs: dict):
    if head not in ("keep", "new"):
        raise ConfigError(f"head must be 'keep' or 'new', got {head!r}")
    arrays = unwrap_state_dict(state_dict, "state dict")
    if src.rename_keys is not None:
        arrays = src.rename_keys(arrays)
    ignored = {k for k in arrays if any(re.search(p, k) for p in src.ignore_keys)}

    ckpt_classes = checkpoint_num_classes(spec, src, arrays)
    if head == "keep":
        if ckpt_classes is None:
            key = _ref(src, ("params", *spec.head_path, "kernel"))[0]
            if key in arrays:
                raise ConversionError(f"{key} has shape {tuple(arrays[key].shape)}, which is not a classifier "
                                      f"weight; is it a checkpoint of {spec.name}?")
            _refuse_other_architecture(spec, src, arrays, ignored, model_kwargs)
            raise ConversionError(f"the {src.name} checkpoint for {spec.name} has no classifier ({key} is missing); "
                                  "in Python pass head='new' and num_classes=N to start a new head; the command "
                                  "lines need a checkpoint with its classifier")
        if num_classes is not None and num_classes != ckpt_classes:
            raise ConversionError(f"the checkpoint's head has {ckpt_classes} classes but num_classes={num_classes}; "
                                  "pass head='new' to replace the head with a freshly initialised one")
        num_classes = ckpt_classes
    elif num_classes is None:
        raise ConfigError("head='new' needs num_classes (the number of classes of your data)")
    elif ckpt_classes is None:   # no classifier: a backbone for features, or another architecture's file
        _refuse_other_architecture(spec, src, arrays, ignored, model_kwargs)

    model = create_model(spec.name, num_classes, source=src.name, **model_kwargs)
    shapes = traverse_util.flatten_dict(abstract_variables(model, spec))
    new_head = head_keys(spec, src, shapes) if head == "new" else {}

    out: dict[tuple, np.ndarray] = {}
    used: set[str] = set()
    missing: list[str] = []
    wrong_shape: list[str] = []
    for path, sds in shapes.items():
        key, transform = _ref(src, path)
        if path in new_head:
            used.add(key)
            continue
        if key not in arrays:
            missing.append(key)
            continue
        used.add(key)
        value = arrays[key]
        value = transform(value) if transform else value
        if tuple(value.shape) != tuple(sds.shape) and src.adapt is not None:
            adapted = src.adapt(path, value, tuple(sds.shape))
            value = value if adapted is None else adapted
        if tuple(value.shape) != tuple(sds.shape):
            wrong_shape.append(f"{key} {tuple(arrays[key].shape)} (model needs {_torch_like_shape(sds.shape, path)})")
            continue
        out[path] = np.asarray(value, dtype=np.float32)
    unexpected = sorted(set(arrays) - used - ignored)

    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_list(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_list(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} wrong shape(s): {_list(wrong_shape, 3)}")
    if problems:
        hint = "is it a checkpoint of another architecture or source?"
        raise ConversionError(f"cannot load this state dict into {spec.name} ({src.name} names): "
                              + "; ".join(problems) + f"; {hint}")

    if new_head:
        out.update(init_head({p: shapes[p] for p in new_head}, seed))
    return model, traverse_util.unflatten_dict(out)


def _refuse_other_architecture(spec: BackboneSpec, src: SourceSpec, arrays: Mapping[str, Any], ignored: set,
                               model_kwargs: dict) -> None:
    """A file whose keys mostly do not fit ``spec`` is another architecture's, whatever else is wrong
    with it: say that, not that its classifier is missing."""
    shapes = traverse_util.flatten_dict(abstract_variables(create_model(spec.name, 1000, source=src.name,
                                                                        **model_kwargs), spec))
    heads = head_keys(spec, src, shapes)
    expected = {_ref(src, p)[0] for p in shapes if p not in heads}
    missing = expected - set(arrays)
    if len(missing) * 2 > len(expected):
        unexpected = set(arrays) - expected - ignored - set(heads.values())
        raise ConversionError(f"cannot load this state dict into {spec.name} ({src.name} names): "
                              f"{len(missing)} of its {len(expected)} keys are missing ({_list(sorted(missing), 2)}) "
                              f"and {len(unexpected)} are unexpected ({_list(sorted(unexpected), 2)}); is it a "
                              "checkpoint of another architecture? Pass the --backbone it was saved from")


def _torch_like_shape(shape, path) -> tuple:
    """A Flax leaf's shape in PyTorch layout, for error messages."""
    shape = tuple(shape)
    if path[0] == "params" and path[-1] == "kernel":
        if len(shape) == 4:
            return (shape[3], shape[2], shape[0], shape[1])
        if len(shape) == 2:
            return (shape[1], shape[0])
    return shape


def init_head(head_shapes: Mapping[tuple, Any], seed: int = 0) -> dict[tuple, np.ndarray]:
    """A fresh classifier: PyTorch's nn.Linear init for the kernel, zero bias."""
    rng = jax.random.key(seed)
    out = {}
    for i, (path, sds) in enumerate(sorted(head_shapes.items())):
        if path[-1] == "kernel":
            out[path] = np.asarray(dense_init(jax.random.fold_in(rng, i), sds.shape, np.float32))
        else:
            out[path] = np.zeros(sds.shape, np.float32)
    return out
