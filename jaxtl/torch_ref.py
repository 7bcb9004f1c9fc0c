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


def torch_forward(model, images_nhwc: np.ndarray, train: bool = False) -> np.ndarray:
    """Run a torch model on NHWC float32 images; returns numpy logits."""
    torch = require_torch()
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(images_nhwc, np.float32).transpose(0, 3, 1, 2)))
    model.train(train)
    with torch.no_grad():
        return model(x).float().numpy()
