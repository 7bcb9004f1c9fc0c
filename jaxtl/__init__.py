"""jaxtl: transfer learning for image classification in pure-functional JAX.

Public API::

    import jaxtl
    result = jaxtl.train(data="photos/", backbone="resnet50", strategy="finetune", epochs=5, output="runs/pets")
    model, variables = jaxtl.from_state_dict("resnet50", state_dict, source="torchvision")  # or "timm"
    logits = model.apply(variables, images, train=False)   # float32 NHWC, normalised
    jaxtl.list_models()
    model, variables, meta = jaxtl.load_model("runs/my-run")        # an exported model
    model, variables, info = jaxtl.load_pretrained("mobilenet_v2")  # published weights, converted once
    x = jaxtl.preprocess(["photo.jpg"], "mobilenet_v2")               # files -> the normalised batch it expects
"""

from jaxtl.errors import (
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
from jaxtl.data.preprocessing import Preprocessing
from jaxtl.registry import get_spec, list_models
from jaxtl.models import create_model, init_variables
from jaxtl.conversion import convert_state_dict, from_state_dict
from jaxtl.weights import read_state_dict
from jaxtl.export import load_model, save_model
from jaxtl.pretrained import load_pretrained, preprocess
from jaxtl import ops, runtime
from jaxtl.optim import OptimConfig
from jaxtl.strategies import Strategy
from jaxtl.training.config import TrainConfig
from jaxtl.training.loop import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "train",
    "TrainConfig",
    "TrainResult",
    "Strategy",
    "OptimConfig",
    "ops",
    "runtime",
    "create_model",
    "convert_state_dict",
    "from_state_dict",
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
