"""``python -m jaxtl.predict``: top-k classes for image files.

    python -m jaxtl.predict --backbone mobilenet_v2 photo.jpg other.png   # published ImageNet weights
    python -m jaxtl.predict --checkpoint runs/digits photo.jpg             # a model you trained or converted

Each image gets the backbone's own evaluation preprocessing (e.g. resize 256,
center crop 224, ImageNet mean/std for torchvision's MobileNetV2 weights).
An unreadable file is reported by path and the others are still predicted.

``--tta N`` averages the softmax probabilities over N views of each image (:mod:`jaxtl.tta`: 2 adds
the horizontal mirror, 5 the corner crops, 10 both). A model whose meta holds a temperature
(``python -m jaxtl.evaluate --calibrate --write``) has its logits divided by it before the softmax.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from jaxtl.cli import run_cli
from jaxtl.errors import ConfigError, DataError
from jaxtl.data.preprocessing import Preprocessing


@dataclass
class Predictor:
    """A model, its variables, its preprocessing and its class names, ready to classify."""

    model: Any
    variables: Any
    preprocessing: Preprocessing
    class_names: list[str] | None
    batch_size: int = 32
    tta: int = 1                       # views per image, probabilities averaged (jaxtl.tta)
    temperature: float | None = None   # divides the logits (temperature scaling, jaxtl.calibration)

    def __post_init__(self):
        import jax

        from jaxtl import tta

        model, n, t, size = self.model, tta.check_views(self.tta), self.temperature, self.preprocessing.input_size
        if n == 1 and t is None:
            self._forward = jax.jit(lambda v, x: jax.nn.softmax(model.apply(v, x, train=False), axis=-1))
        else:
            self._forward = jax.jit(lambda v, x: tta.mean_probabilities(
                tta.view_logits(lambda v_, x_: model.apply(v_, x_, train=False), v, x, size, n), t))

    @classmethod
    def from_checkpoint(cls, directory: str | Path, tta: int = 1) -> "Predictor":
        from jaxtl import tta as tta_views
        from jaxtl.calibration import stored_temperature
        from jaxtl.export import load_model

        model, variables, meta = load_model(directory)
        config = Path(directory) / "config.json"
        saved = json.loads(config.read_text()) if config.is_file() else {}
        tta_views.check_views(tta, tta_views.flips_allowed(saved, meta), str(directory))
        return cls(model, variables, Preprocessing.from_dict(meta["preprocessing"]), meta.get("class_names"),
                   tta=tta, temperature=stored_temperature(meta))

    def prepare(self, image) -> np.ndarray:
        """A PIL image -> the normalised float32 HWC input :meth:`probabilities` takes (for five crops, the
        ``resize_size`` centre square they are cut from)."""
        from jaxtl.data.transforms import eval_transform
        from jaxtl.tta import loader_preprocessing

        return eval_transform(image, loader_preprocessing(self.preprocessing, self.tta))

    @classmethod
    def from_pretrained(cls, backbone: str, source: str | None = None, tag: str | None = None,
                        weights_file: str | None = None, allow_download: bool = True) -> "Predictor":
        from jaxtl.errors import HeadlessCheckpoint
        from jaxtl.pretrained import load_pretrained

        try:
            model, variables, info = load_pretrained(backbone, source, tag=tag, weights_file=weights_file,
                                                     allow_download=allow_download)
        except HeadlessCheckpoint:
            raise ConfigError(f"{backbone}'s weights have no classifier, so there are no classes to predict; "
                              f"train a head first (python -m jaxtl.train --backbone {backbone} --strategy "
                              "feature_extract --data DIR), then predict with --checkpoint") from None
        return cls(model, variables, info.preprocessing, info.class_names)

    def probabilities(self, images_nhwc: np.ndarray) -> np.ndarray:
        """Normalised float32 NHWC (:meth:`prepare`) -> class probabilities, in batches."""
        out = []
        for i in range(0, len(images_nhwc), self.batch_size):
            chunk = images_nhwc[i:i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size and len(images_nhwc) > self.batch_size:  # one compiled shape
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            out.append(np.asarray(self._forward(self.variables, chunk))[:n])
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def name(self, index: int) -> str:
        if self.class_names and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"

    def top_k(self, probs: np.ndarray, k: int) -> list[list[tuple[str, int, float]]]:
        k = min(k, probs.shape[-1])
        order = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        return [[(self.name(int(j)), int(j), float(p[j])) for j in row] for p, row in zip(probs, order)]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxtl.predict", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--backbone", help="a registered backbone with published weights, e.g. mobilenet_v2")
    what.add_argument("--checkpoint", help="a folder written by python -m jaxtl.train or python -m jaxtl.convert")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP, GIF, WebP, ...)")
    p.add_argument("--source", choices=["torchvision", "timm"], default=None, help="weights source for --backbone")
    p.add_argument("--tag", default=None, help="which published weights for --backbone (e.g. IMAGENET1K_V1)")
    p.add_argument("--weights-file", default=None, help="a local .pth/.safetensors file for --backbone")
    p.add_argument("--top-k", type=int, default=5, help="how many classes to print per image (default 5)")
    p.add_argument("--tta", type=int, default=1, metavar="N",
                   help="test-time augmentation: average the softmax over N views - 1 (default, none), 2 (+ "
                        "horizontal flip), 5 (centre and corner crops), 10 (5 crops and their flips)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    p.add_argument("--no-download", action="store_true", help="never download weights")
    return p


def predict(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from jaxtl.data.decode import BadImageError, load_image
    from jaxtl.tta import VIEW_NAMES, check_views

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be at least 1, got {args.top_k}")
    check_views(args.tta)
    if args.checkpoint:
        predictor = Predictor.from_checkpoint(args.checkpoint, tta=args.tta)
    else:
        predictor = Predictor.from_pretrained(args.backbone, args.source, args.tag, args.weights_file,
                                              allow_download=not args.no_download)
        predictor = replace(predictor, tta=args.tta) if args.tta != 1 else predictor
    said = []
    if predictor.temperature is not None:
        said.append(f"calibrated (T = {predictor.temperature:.4g})")
    if predictor.tta != 1:
        said.append(f"test-time augmentation: {VIEW_NAMES[predictor.tta]}, probabilities averaged")
    if said and not args.json:  # JSON lines carry the same in each object instead
        print("; ".join(said))
    arrays, good, bad = [], [], []
    for path in args.images:
        try:
            arrays.append(predictor.prepare(load_image(path)))
            good.append(path)
        except BadImageError as e:
            bad.append(str(e))
    if good:
        results = predictor.top_k(predictor.probabilities(np.stack(arrays)), args.top_k)
        for path, top in zip(good, results):
            if args.json:
                extra = {"temperature": predictor.temperature} if predictor.temperature is not None else {}
                extra.update({"tta": predictor.tta} if predictor.tta != 1 else {})
                print(json.dumps({"image": path, "top_k": [{"class": n, "index": i, "probability": round(p, 6)}
                                                          for n, i, p in top], **extra}))
            else:
                print(path)
                for rank, (name, index, prob) in enumerate(top, 1):
                    print(f"  {rank}. {name:<32} {prob:7.4f}  (class {index})")
    for msg in bad:
        print(f"skipped {msg}", file=sys.stderr)
    if bad and not good:
        raise DataError(f"none of the {len(bad)} image(s) could be read")
    if bad:
        print(f"{len(bad)} of {len(args.images)} image(s) skipped", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(predict, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
