"""Evaluation preprocessing, identical to torchvision's ``Resize -> CenterCrop -> ToTensor -> Normalize``.

Identical means the same pixels: Pillow does the resize (antialiased, as
torchvision does on PIL images), the crop offsets are rounded the way
torchvision rounds them, and the result is float32 NHWC normalised with the
backbone's mean and std.
"""

from __future__ import annotations


import numpy as np
from PIL import Image

from jaxtl.data.preprocessing import Preprocessing

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def resample_filter(name: str):
    return _RESAMPLE[name.lower()]


def resize_shorter_side(im: Image.Image, size: int, interpolation: str = "bilinear") -> Image.Image:
    """torchvision ``Resize(size)``: shorter side -> size, longer side truncated proportionally."""
    w, h = im.size
    short, long = (w, h) if w <= h else (h, w)
    if short == size:
        return im
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return im.resize((new_w, new_h), resample_filter(interpolation))


def center_crop(im: Image.Image, size: int) -> Image.Image:
    """torchvision ``CenterCrop(size)`` (pads with zeros when the image is smaller)."""
    w, h = im.size
    if w < size or h < size:
        canvas = Image.new(im.mode, (max(w, size), max(h, size)))
        canvas.paste(im, ((max(w, size) - w) // 2, (max(h, size) - h) // 2))
        im, (w, h) = canvas, canvas.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def eval_crop(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    """Resize + center crop as uint8 HWC (what the loader ships to the device)."""
    im = center_crop(resize_shorter_side(im, pre.resize_size, pre.interpolation), pre.input_size)
    return np.asarray(im, dtype=np.uint8)


def normalize(images_uint8, pre: Preprocessing, xp=np):
    """uint8 NHWC -> float32 NHWC with the backbone's mean/std (numpy or jax.numpy)."""
    mean = xp.asarray(pre.mean, xp.float32) * 255.0
    inv_std = 1.0 / (xp.asarray(pre.std, xp.float32) * 255.0)
    return (xp.asarray(images_uint8).astype(xp.float32) - mean) * inv_std


def eval_transform(im: Image.Image, pre: Preprocessing) -> np.ndarray:
    """One image -> float32 HWC, normalised: the input a pretrained backbone expects."""
    return normalize(eval_crop(im, pre), pre)
