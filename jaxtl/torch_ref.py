"""The PyTorch reference models (needs the ``jaxtl[torch]`` extra).

Used by ``python -m jaxtl.convert --verify``, the parity tests and the
benchmarks: the same backbone built by torchvision or timm, so jaxtl's output
can be compared with the real thing.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxtl.errors import ConfigError
from jaxtl.registry import resolve


def require_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        raise ConfigError("this needs PyTorch; install the extra: pip install 'jaxtl[torch]'") from None
    import torch

    return torch


def build_torch_model(name: str, source: str | None = None, num_classes: int | None = None, **kwargs: Any):
    """torchvision / timm model of a registered backbone, randomly initialised, eval mode."""
    require_torch()
    spec, implied = resolve(name)
    src = spec.source(source or implied)
    kw = {**src.torch_kwargs, **kwargs}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if src.name == "torchvision":
        try:
            import torchvision
        except Exception as e:  # noqa: BLE001 - a torch/torchvision mismatch raises RuntimeError
            raise ConfigError(f"torchvision cannot be imported ({str(e)[:80]}); install the extra: "
                              "pip install 'jaxtl[torch]' (it needs torchvision>=0.29)") from None
        model = torchvision.models.get_model(src.model_name, weights=None, **kw)
    elif src.name == "timm":
        try:
            import timm
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"timm cannot be imported ({str(e)[:80]}); install the extra: pip install 'jaxtl[torch]'") \
                from None
        model = timm.create_model(src.model_name, pretrained=False, **kw)
    else:  # pragma: no cover - registry only knows these two
        raise ConfigError(f"no PyTorch reference for source {src.name!r}")
    return model.eval()


def load_torch_reference(name: str, source: str | None, state: dict, *, img_size: int | None = None,
                         num_classes: int | None = None, **kwargs: Any):
    """The PyTorch model with ``state`` loaded the way its library loads it.

    With ``img_size`` a ViT is built for that size and the checkpoint's
    position embedding is resampled by the library itself (timm's
    ``checkpoint_filter_fn``, torchvision's ``interpolate_embeddings``): the
    reference for jaxtl's own resampling. CNNs take any size as they are.
    ``kwargs`` go to the model's constructor (``depth=2``).
    """
    torch = require_torch()
    spec, implied = resolve(name)
    src = spec.source(source or implied)
    if src.rename_keys is not None:  # e.g. torchvision's legacy DenseNet names, which PyTorch remaps itself
        state = src.rename_keys(dict(state))
    state = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)))
             for k, v in state.items()}
    if img_size and src.adapt is not None:   # a position embedding to resample
        if src.name == "timm":
            from timm.models.vision_transformer import checkpoint_filter_fn

            model = build_torch_model(name, src.name, num_classes, img_size=img_size, **kwargs)
            state = checkpoint_filter_fn(dict(state), model)
        else:
            from torchvision.models.vision_transformer import interpolate_embeddings

            model = build_torch_model(name, src.name, num_classes, image_size=img_size, **kwargs)
            patch = int(model.patch_size)
            state = interpolate_embeddings(img_size, patch, dict(state))
    else:
        model = build_torch_model(name, src.name, num_classes, **kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"PyTorch could not load these weights into {src.model_name} either "
                          f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})")
    return model.eval()


def torch_forward(model, images_nhwc: np.ndarray, train: bool = False) -> np.ndarray:
    """Run a torch model on NHWC float32 images; returns numpy logits."""
    torch = require_torch()
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc, np.float32).transpose(0, 3, 1, 2)))
    model.train(train)
    with torch.no_grad():
        return model(x).float().numpy()


def torch_features(name: str, source: str | None, model, images_nhwc: np.ndarray) -> np.ndarray:
    """What jaxtl's ``features_only=True`` computes, from the torch model (eval mode):
    the source's ``reference_features`` where it has one, else the model's output
    (a headless timm model returns its pooled features)."""
    torch = require_torch()
    spec, implied = resolve(name)
    src = spec.source(source or implied)
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc, np.float32).transpose(0, 3, 1, 2)))
    model.eval()
    with torch.no_grad():
        out = src.reference_features(model, x) if src.reference_features is not None else model(x)
    return out.float().numpy()
