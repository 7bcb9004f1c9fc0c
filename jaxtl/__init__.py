"""jaxtl: transfer learning for image classification in pure-functional JAX.

Public API::

    import jaxtl
    model = jaxtl.create_model("resnet50", num_classes=1000)
    variables = jaxtl.convert_state_dict("resnet50", state_dict, source="torchvision")
    logits = model.apply(variables, images, train=False)   # float32 NHWC, normalised
    jaxtl.list_models()
    model, variables, meta = jaxtl.load_model("runs/my-run")        # an exported model
    model, variables, info = jaxtl.load_pretrained("mobilenet_v2")  # published weights, converted once
    x = jaxtl.preprocess(["photo.jpg"], "mobilenet_v2")               # files -> the normalised batch it expects
"""

# Must run before JAX creates its CPU backend: see jaxtl/_xla_flags.py for why.
from jaxtl._xla_flags import apply_default_flags as _apply_default_flags

_apply_default_flags()

# Also before JAX's CPU backend exists: see jaxtl/_host_memory.py for why.
from jaxtl._host_memory import keep_step_memory as _keep_step_memory  # noqa: E402

_STEP_MEMORY_KEPT = _keep_step_memory()  # read by benchmarks/common.py:machine()

from jaxtl.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ConversionError,
    DataError,
    JaxtlError,
    TrainingError,
    UnknownModelError,
    WeightsError,
    WeightsNotFoundError,
)
from jaxtl.registry import Preprocessing, get_spec, list_models  # noqa: E402
from jaxtl.models import create_model, init_variables  # noqa: E402
from jaxtl.conversion import convert_state_dict  # noqa: E402
from jaxtl.weights import read_state_dict  # noqa: E402
from jaxtl.export import load_model, save_model  # noqa: E402
from jaxtl.pretrained import load_pretrained  # noqa: E402
from jaxtl.data.transforms import preprocess  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "create_model",
    "convert_state_dict",
    "list_models",
    "load_model",
    "save_model",
    "load_pretrained",
    "preprocess",
    "get_spec",
    "init_variables",
    "read_state_dict",
    "Preprocessing",
    "JaxtlError",
    "UnknownModelError",
    "ConversionError",
    "WeightsError",
    "WeightsNotFoundError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "TrainingError",
]
