"""Model families (one per file) and the helpers that build them from the registry."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.errors import ConfigError
from jaxtl.registry import BackboneSpec, resolve
from jaxtl.rng import make_key

# Importing a family registers its backbones.
from jaxtl.models import resnet  # noqa: F401,E402
from jaxtl.models import vit  # noqa: F401,E402
from jaxtl.models import mobilenet  # noqa: F401,E402
from jaxtl.models import vgg  # noqa: F401,E402
from jaxtl.models import densenet  # noqa: F401,E402
from jaxtl.models import efficientnet  # noqa: F401,E402
from jaxtl.models import convnext  # noqa: F401,E402
from jaxtl.models import dinov2  # noqa: F401,E402
from jaxtl.models import clip  # noqa: F401,E402
from jaxtl.models import siglip  # noqa: F401,E402
from jaxtl.models import dinov3  # noqa: F401,E402

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
           "float16": jnp.float16, "fp16": jnp.float16}


def as_dtype(dtype: Any) -> Any:
    if isinstance(dtype, str):
        try:
            return _DTYPES[dtype.lower()]
        except KeyError:
            raise ConfigError(f"unknown dtype {dtype!r}; use float32 or bfloat16") from None
    return dtype


def create_model(name: str, num_classes: int = 1000, *, source: str | None = None, dtype: Any = jnp.float32,
                 **kwargs):
    """Build the Flax module of a registered backbone.

    ``source`` selects the weight source's architecture details (for example
    BatchNorm eps, which differs between torchvision's and timm's MobileNetV3);
    it defaults to the source the name implies. ``dtype`` is the compute dtype;
    parameters are always float32.
    """
    spec, implied = resolve(name)
    src = spec.source(source or implied)
    if not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    model_kwargs = {**src.model_kwargs, **kwargs}
    try:
        return spec.constructor(num_classes=int(num_classes), dtype=as_dtype(dtype), **model_kwargs)
    except TypeError as e:
        raise ConfigError(f"{spec.name} does not accept these options: {e}") from None


def has_option(spec: BackboneSpec, option: str) -> bool:
    """Whether the backbone's module takes ``option`` (a field or constructor argument)."""
    import dataclasses
    import inspect

    ctor = spec.constructor
    target = getattr(ctor, "func", ctor)
    try:
        return option in inspect.signature(target).parameters or any(
            f.name == option for f in dataclasses.fields(target))
    except (TypeError, ValueError):
        return False


def built_for_one_size(spec: BackboneSpec) -> bool:
    """Whether the backbone is built for one image size (a ViT's ``img_size``) rather than taking any."""
    return has_option(spec, "img_size")


def input_size_of(model, spec: BackboneSpec) -> int:
    """The image side a model expects (ViTs are built for one size)."""
    size = getattr(model, "img_size", None)
    return int(size) if size else spec.preprocessing.input_size


def dummy_input(model, spec: BackboneSpec, batch: int = 1):
    size = input_size_of(model, spec)
    return jnp.zeros((batch, size, size, 3), jnp.float32)


def abstract_variables(model, spec: BackboneSpec) -> dict:
    """Shapes and dtypes of ``model.init``'s variables, without computing them."""
    return jax.eval_shape(lambda: model.init(jax.random.key(0), dummy_input(model, spec), train=False))


def init_variables(model, spec: BackboneSpec, rng: jax.Array | int = 0) -> dict:
    """Freshly initialised variables (``{"params", "batch_stats"}``), jitted."""
    if isinstance(rng, int):
        rng = make_key(rng)
    x = dummy_input(model, spec)
    return jax.jit(lambda r: model.init(r, x, train=False))(rng)
