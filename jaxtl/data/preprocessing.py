"""How images are prepared for a backbone: the published weights' evaluation recipe."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)   # CLIP's training statistics, timm's constants
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Preprocessing:
    """How images were prepared when the weights were trained / evaluated.

    Evaluation: resize the shorter side to ``resize_size`` with
    ``interpolation``, center-crop ``input_size``, scale to [0, 1], subtract
    ``mean`` and divide by ``std`` (torchvision's and timm's eval transforms).
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    def at_size(self, input_size: int) -> "Preprocessing":
        """The same recipe at another input size, keeping the crop ratio."""
        resize = int(round(input_size / self.crop_pct))
        return Preprocessing(input_size, resize, self.mean, self.std, self.interpolation)

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_size": self.input_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocessing":
        return cls(
            int(d["input_size"]),
            int(d["resize_size"]),
            tuple(d["mean"]),
            tuple(d["std"]),
            str(d.get("interpolation", "bilinear")),
        )


def timm_preprocessing(input_size: int = 224, crop_pct: float = 0.875, interpolation: str = "bicubic",
                       mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Preprocessing:
    """timm's eval transform: resize to floor(input_size / crop_pct), center crop."""
    return Preprocessing(input_size, int(input_size / crop_pct), tuple(mean), tuple(std), interpolation)
