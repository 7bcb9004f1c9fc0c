"""LoRA (Hu et al., 2021) as a re-parametrisation of the parameter tree, for every backbone.

A target kernel ``W`` (any shape, read as a matrix ``(fan_in, out)``: a Dense kernel as it is, a
convolution's ``(kh, kw, in, out)`` as ``(kh * kw * in, out)``) is used as::

    W + (alpha / rank) * A @ B        A: (fan_in, rank), B: (rank, out)

computed before ``model.apply``, so no model family changes. ``A`` starts like PEFT's
(Kaiming-uniform, bound 1 / sqrt(fan_in)) and ``B`` at zero: the first step sees the pretrained
model. The factors live under the top-level params key :data:`LORA_KEY`, mirroring the target's
path (``lora/blocks_0/attn/query/{lora_a,lora_b}``); the base kernels are frozen constants of the
step (no gradient, update or optimizer state), and only the factors and the head train.
:func:`merge_factors` folds them into the kernels for export: the exported model is the plain
backbone.

Default targets: the attention query/key/value and output projections of a transformer; in a
network without attention, every 1x1 convolution and Dense kernel below the head (for a CNN, the
dense layers in disguise).

``dropout`` drops input features of the adapter (rows of ``A``) with one mask per target and
step, drawn from the step's key; PEFT draws one per example, which needs the adapter as a
separate branch inside every model.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxtl.errors import ConfigError
from jaxtl.rng import make_key

LORA_KEY = "lora"
FACTOR_A, FACTOR_B = "lora_a", "lora_b"
ATTENTION_TARGETS = r"(^|/)attn/(query|key|value|proj)/kernel$"


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 8.0             # the update is scaled by alpha / rank (PEFT's defaults: 8 and 8)
    targets: str | None = None     # a regular expression over parameter paths; None: the default rule
    dropout: float = 0.0

    def __post_init__(self):
        if self.rank < 1:
            raise ConfigError(f"--lora-rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"--lora-alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None:
            try:
                re.compile(self.targets)
            except re.error as e:
                raise ConfigError(f"--lora-targets {self.targets!r} is not a regular expression ({e})") from None

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _as_matrix(shape: Sequence[int]) -> tuple[int, int]:
    return int(np.prod(shape[:-1])), int(shape[-1])


def select_targets(params: Mapping[str, Any], head_path: Sequence[str], pattern: str | None) -> list[tuple]:
    """The kernel paths LoRA adapts (the head never: it trains in full), in a fixed order."""
    flat = traverse_util.flatten_dict(dict(params))
    head = tuple(head_path)
    kernels = {path: leaf.shape for path, leaf in flat.items()
               if path[-1] == "kernel" and len(leaf.shape) >= 2 and path[:len(head)] != head
               and path[0] != LORA_KEY}
    names = {path: "/".join(path) for path in kernels}
    if pattern is not None:
        chosen = [p for p in kernels if re.search(pattern, names[p])]
        if not chosen:
            examples = ", ".join(sorted(names.values())[:4])
            raise ConfigError(f"--lora-targets {pattern!r} matches no kernel of the backbone; kernel paths look "
                              f"like {examples}")
    else:
        chosen = [p for p in kernels if re.search(ATTENTION_TARGETS, names[p])]
        if not chosen:  # no attention: 1x1 convolutions and Dense kernels
            chosen = [p for p, shape in kernels.items() if all(d == 1 for d in shape[:-2])]
        if not chosen:
            raise ConfigError("the backbone has neither attention projections nor 1x1 convolutions for LoRA's "
                              "default targets; name kernels with --lora-targets REGEX")
    return sorted(chosen)


def init_factors(params: Mapping[str, Any], targets: Sequence[tuple], rank: int, seed: int) -> dict:
    """``{LORA_KEY: ...}``-less tree of the factors of every target: ``A`` Kaiming-uniform, ``B`` zero."""
    flat = traverse_util.flatten_dict(dict(params))
    key = jax.random.fold_in(make_key(seed), 0x10A)
    out = {}
    for i, path in enumerate(targets):
        fan_in, fan_out = _as_matrix(flat[path].shape)
        if rank > min(fan_in, fan_out):
            raise ConfigError(f"--lora-rank {rank} exceeds the rank a {fan_in}x{fan_out} kernel can have "
                              f"({'/'.join(path)}); choose at most {min(fan_in, fan_out)} or other --lora-targets")
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(key, i), (fan_in, rank), jnp.float32, -bound, bound)
        out[path[:-1] + (FACTOR_A,)] = np.asarray(a, dtype=flat[path].dtype)
        out[path[:-1] + (FACTOR_B,)] = np.zeros((rank, fan_out), flat[path].dtype)
    return traverse_util.unflatten_dict(out)


def factor_paths(factors: Mapping[str, Any]) -> list[tuple]:
    """The kernel paths a factor tree adapts."""
    flat = traverse_util.flatten_dict(dict(factors))
    return sorted(path[:-1] + ("kernel",) for path in flat if path[-1] == FACTOR_A)


def apply_factors(params: Mapping[str, Any], scale: float, dropout: float = 0.0,
                  key: jax.Array | None = None) -> dict:
    """``params`` with :data:`LORA_KEY` removed and every target kernel replaced by ``W + scale * A @ B``
    (``A``'s rows dropped with probability ``dropout`` when ``key`` is given). Traceable."""
    params = dict(params)
    factors = params.pop(LORA_KEY, None)
    if not factors:
        return params
    flat = traverse_util.flatten_dict(params)
    fac = traverse_util.flatten_dict(dict(factors))
    for i, path in enumerate(factor_paths(factors)):
        a, b = fac[path[:-1] + (FACTOR_A,)], fac[path[:-1] + (FACTOR_B,)]
        if key is not None and dropout > 0:
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - dropout, (a.shape[0], 1))
            a = jnp.where(keep, a / (1.0 - dropout), 0.0)
        kernel = flat[path]
        delta = (a @ b).reshape(kernel.shape)
        flat[path] = kernel + (scale * delta).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def merge_factors(variables: Mapping[str, Any], scale: float) -> dict:
    """A model's variables with the factors folded into their kernels: the plain backbone (host arrays)."""
    params = jax.device_get(apply_factors(variables["params"], scale))
    return {**variables, "params": jax.tree.map(np.asarray, params)}
