"""The data layer on real files: decoding, sources, splits, bad files, the loader, the eval transform.

Every image here is written by Pillow into ``tmp_path`` (or taken from
``skimage.data`` for the torchvision comparison), so the tests exercise the
same code paths as a user's image folder.
"""

from __future__ import annotations

import gc
import io
import os
import struct
import sys
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxtl.data import decode
from jaxtl.data.decode import BadImageError, load_image, to_rgb
from jaxtl.data.loader import ArrayLoader, BatchPlan, Loader, train_image_size
from jaxtl.data.sources import (ArraySource, Dataset, FileSource, Source, array_dataset, check_file,
                                digits_dataset, folder_dataset, limit_indices_per_class, load_dataset,
                                scan_files, stratified_split)
from jaxtl.data.transforms import center_crop, eval_crop, eval_transform, resize_shorter_side
from jaxtl.errors import ConfigError, DataError
from jaxtl.data.preprocessing import Preprocessing

PRE = Preprocessing(input_size=16, resize_size=20)  # small, for the loader tests
IDENT = Preprocessing(input_size=8, resize_size=8)  # 8x8 images pass through unchanged


# --------------------------------------------------------------------------- helpers


def _pattern(h: int, w: int, seed: int = 0) -> np.ndarray:
    """An RGB uint8 image with distinct, blocky colours (survives lossless formats exactly)."""
    rng = np.random.default_rng(seed)
    colours = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    ys = np.arange(h) * 4 // h
    xs = np.arange(w) * 4 // w
    return colours[ys[:, None], xs[None, :]]


def _colour(label: int, index: int) -> tuple[int, int, int]:
    """A flat colour that encodes (class, example), recoverable after decoding a PNG."""
    return (30 + 50 * label, (7 * index) % 256, 200)


def _make_folder(root: Path, counts: dict[str, int], size=(24, 20), start: int = 0) -> dict[Path, tuple[int, int]]:
    """ImageFolder layout ``root/<class>/<i>.png``; returns path -> (sorted class id, i)."""
    written = {}
    for label, name in enumerate(sorted(counts)):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(start, start + counts[name]):
            p = d / f"img_{i:03d}.png"
            Image.new("RGB", size, _colour(label, i)).save(p)
            written[p] = (label, i)
    return written


def _png_bytes(w: int, h: int, bit_depth: int = 8, colour_type: int = 2, rows: bytes | None = None) -> bytes:
    """A hand-written PNG: used for 16-bit RGB and for headers that claim a huge size."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, 0)
    data = zlib.compress(rows if rows is not None else b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _jpeg_bytes(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_pattern(size[1], size[0])).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _write_bad_files(d: Path) -> dict[str, Path]:
    """The zoo of files that are not usable images, in folder ``d``."""
    d.mkdir(parents=True, exist_ok=True)
    bad = {
        "zero": d / "zero.jpg",
        "text": d / "text.jpg",
        "bomb": d / "bomb.png",
        "loop": d / "loop.jpg",
    }
    bad["zero"].write_bytes(b"")
    bad["text"].write_text("this is not a JPEG, only a text file named like one\n")
    bad["bomb"].write_bytes(_png_bytes(40_000, 40_000))  # 1.6 Gpixel declared, a few bytes on disk
    os.symlink(bad["loop"].name, bad["loop"])  # loop.jpg -> loop.jpg
    return bad


def _truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in the middle of its scan data: the header is intact, the pixels are not."""
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=90)  # noise: the scan data dwarfs the header
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


# =========================================================================== decoding


@pytest.mark.parametrize("fmt,ext,kw", [
    ("PNG", "png", {}),
    ("BMP", "bmp", {}),
    ("TIFF", "tif", {}),
    ("WEBP", "webp", {"lossless": True}),
    ("GIF", "gif", {}),
    ("PPM", "ppm", {}),
])
def test_lossless_formats_decode_to_exact_rgb(tmp_path, fmt, ext, kw):
    arr = _pattern(30, 40)  # 16 colours: a GIF palette holds them exactly
    p = tmp_path / f"x.{ext}"
    Image.fromarray(arr).save(p, fmt, **kw)
    im = load_image(p)
    assert im.mode == "RGB" and im.size == (40, 30)
    np.testing.assert_array_equal(np.asarray(im), arr)


def test_jpeg_and_lossy_webp_decode_close(tmp_path):
    arr = _pattern(48, 64)
    for name, kw in (("x.jpg", {"quality": 95}), ("x.webp", {"quality": 95})):
        Image.fromarray(arr).save(tmp_path / name, **kw)
        out = np.asarray(load_image(tmp_path / name), np.int32)
        assert out.shape == (48, 64, 3)
        err = np.abs(out - arr)
        assert np.median(err) <= 2 and err.mean() < 8, name  # lossy: close, except at colour edges


def test_uppercase_extension_and_jpeg_named_png_still_decode(tmp_path):
    """The content decides the decoder, not the file name."""
    arr = _pattern(20, 20)
    Image.fromarray(arr).save(tmp_path / "A.PNG", "PNG")
    (tmp_path / "really_a_jpeg.png").write_bytes(_jpeg_bytes((20, 20)))
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "A.PNG")), arr)
    assert load_image(tmp_path / "really_a_jpeg.png").size == (20, 20)
    assert decode.is_image_file("A.JPEG") and not decode.is_image_file("notes.txt")


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grayscale_becomes_rgb_with_equal_channels(tmp_path, mode):
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (8, 1))
    im = Image.fromarray(grey, "L")
    if mode == "1":
        im = im.convert("1", dither=Image.Dither.NONE)
        grey = np.where(grey >= 128, 255, 0).astype(np.uint8)
    im.save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (8, 16, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], grey)


def test_grey_jpeg_becomes_rgb(tmp_path):
    Image.new("L", (16, 16), 77).save(tmp_path / "g.jpg", quality=95)
    out = np.asarray(load_image(tmp_path / "g.jpg"), np.int32)
    assert out.shape == (16, 16, 3) and np.abs(out - 77).max() <= 1


@pytest.mark.parametrize("ext", ["png", "gif"])
def test_palette_with_transparency_is_composited_over_white(tmp_path, ext):
    p = Image.new("P", (10, 10), 0)
    p.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
    p.paste(1, (0, 0, 5, 10))  # left half: red
    p.paste(2, (5, 0, 8, 10))  # then blue; the rest index 0 = transparent black
    p.save(tmp_path / f"p.{ext}", transparency=0)
    assert Image.open(tmp_path / f"p.{ext}").mode == "P"
    out = np.asarray(load_image(tmp_path / f"p.{ext}"))
    assert out[5, 2].tolist() == [255, 0, 0]
    assert out[5, 6].tolist() == [0, 0, 255]
    assert out[5, 9].tolist() == [255, 255, 255]  # transparent -> white, not black


def test_palette_without_transparency(tmp_path):
    arr = _pattern(12, 12)
    Image.fromarray(arr).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(tmp_path / "p.png")
    np.testing.assert_array_equal(np.asarray(load_image(tmp_path / "p.png")), arr)


@pytest.mark.parametrize("ext,kw", [("png", {}), ("webp", {"lossless": True}), ("tif", {})])
def test_rgba_is_composited_over_white(tmp_path, ext, kw):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere...
    rgba[:, :4, 3] = 255  # ...opaque on the left,
    rgba[:, 4:7, 3] = 128  # half transparent in the middle,
    rgba[:, 7:, 3] = 0  # fully transparent on the right
    Image.fromarray(rgba, "RGBA").save(tmp_path / f"a.{ext}", **kw)
    out = np.asarray(load_image(tmp_path / f"a.{ext}"), np.int32)
    assert out[5, 1].tolist() == [255, 0, 0]
    assert out[5, 5, 0] == 255 and abs(int(out[5, 5, 1]) - 127) <= 1 and out[5, 5, 1] == out[5, 5, 2]
    assert out[5, 9].tolist() == [255, 255, 255]


def test_la_is_composited_over_white(tmp_path):
    la = np.stack([np.full((6, 6), 10, np.uint8), np.zeros((6, 6), np.uint8)], -1)
    la[:, :3, 1] = 255
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = np.asarray(load_image(tmp_path / "la.png"))
    assert out[0, 0].tolist() == [10, 10, 10] and out[0, 5].tolist() == [255, 255, 255]


def test_rgb_png_with_transparent_colour_key(tmp_path):
    """A PNG tRNS colour key: pixels of that colour are transparent, so they turn white."""
    arr = np.zeros((6, 6, 3), np.uint8)
    arr[:, :3] = (0, 128, 0)
    Image.fromarray(arr).save(tmp_path / "k.png", transparency=(0, 0, 0))
    assert "transparency" in Image.open(tmp_path / "k.png").info
    out = np.asarray(load_image(tmp_path / "k.png"))
    assert out[0, 0].tolist() == [0, 128, 0] and out[0, 5].tolist() == [255, 255, 255]
    grey = np.full((4, 4), 50, np.uint8)
    grey[:, 2:] = 0
    Image.fromarray(grey).save(tmp_path / "g.png", transparency=0)  # grey PNG with a colour key
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out[0, 0].tolist() == [50, 50, 50] and out[0, 3].tolist() == [255, 255, 255]


def test_cmyk_jpeg_converts_back_to_rgb(tmp_path):
    Image.new("RGB", (32, 16), (200, 30, 40)).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    assert Image.open(tmp_path / "c.jpg").mode == "CMYK"
    out = np.asarray(load_image(tmp_path / "c.jpg"), np.int32)
    assert np.abs(out[8, 16] - [200, 30, 40]).max() <= 3


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_grey_is_scaled_not_clipped(tmp_path, ext):
    values = np.array([[0, 1000, 32768, 65535, 257 * 100, 20000]], np.uint16)
    im = Image.fromarray(values)
    assert im.mode == "I;16"
    im.save(tmp_path / f"g16.{ext}")
    assert Image.open(tmp_path / f"g16.{ext}").mode.startswith("I")
    out = np.asarray(load_image(tmp_path / f"g16.{ext}"))
    expected = np.round(values.astype(np.float64) / 65535 * 255).astype(np.uint8)
    np.testing.assert_array_equal(out[..., 0], expected)  # 20000 -> 78, not clipped to 255
    assert (out[..., 0] == out[..., 2]).all()


def test_16bit_grey_dark_image_is_not_stretched(tmp_path):
    """A dark 16-bit image stays dark (scaled by 65535, not by its own maximum)."""
    Image.fromarray(np.full((4, 4), 2570, np.uint16)).save(tmp_path / "dark.png")
    assert np.asarray(load_image(tmp_path / "dark.png"))[0, 0].tolist() == [10, 10, 10]


def test_16bit_rgb_png_keeps_the_high_byte(tmp_path):
    h, w = 2, 3
    px = np.array([[[0xFFFF, 0x8000, 0x0000], [0x1234, 0xABCD, 0x00FF], [0x7FFF, 0x8001, 0xFF00]]] * h, ">u2")
    rows = b"".join(b"\x00" + px[y].tobytes() for y in range(h))
    (tmp_path / "rgb16.png").write_bytes(_png_bytes(w, h, bit_depth=16, colour_type=2, rows=rows))
    out = np.asarray(load_image(tmp_path / "rgb16.png"), np.int32)
    np.testing.assert_allclose(out[0], np.round(px[0].astype(np.float64) / 257), atol=1)


def test_float_and_32bit_modes_convert(tmp_path):
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    assert to_rgb(f).mode == "RGB"
    i = Image.fromarray(np.array([[0, 100, 255]], np.int32), "I")
    assert np.asarray(to_rgb(i))[0, :, 0].tolist() == [0, 100, 255]


@pytest.mark.parametrize("orientation,red_where", [(1, "left"), (3, "right"), (6, "top"), (8, "bottom")])
def test_exif_orientation_is_applied(tmp_path, orientation, red_where):
    arr = np.zeros((24, 48, 3), np.uint8)  # stored wide, red stripe on the stored left
    arr[:, :12] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.jpg"
    Image.fromarray(arr).save(p, quality=95, exif=exif)
    out = np.asarray(load_image(p), np.int32)
    assert out.shape == ((48, 24, 3) if orientation in (6, 8) else (24, 48, 3))
    red = (out[..., 0] > 200) & (out[..., 1] < 60)
    region = {"left": red[:, :8], "right": red[:, -8:], "top": red[:8], "bottom": red[-8:]}[red_where]
    assert region.all(), f"orientation {orientation}: expected red at the {red_where}"
    assert red.mean() < 0.3


@pytest.mark.parametrize("ext,kw", [("png", {}), ("webp", {"lossless": True}), ("tif", {})])
def test_exif_orientation_in_other_formats(tmp_path, ext, kw):
    arr = np.zeros((24, 48, 3), np.uint8)
    arr[:, :12] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / f"o.{ext}", exif=exif, **kw)
    out = np.asarray(load_image(tmp_path / f"o.{ext}"))
    np.testing.assert_array_equal(out, np.rot90(arr, k=-1))  # 6: rotate 90 degrees clockwise


def test_load_image_returns_a_detached_fully_loaded_image(tmp_path):
    """The file is closed after decoding: the image lives on after the file is gone."""
    Image.fromarray(_pattern(10, 10)).save(tmp_path / "x.png")
    im = load_image(tmp_path / "x.png")
    (tmp_path / "x.png").unlink()
    assert np.asarray(im).shape == (10, 10, 3)


# --------------------------------------------------------------------------- bad files


def _reason(exc_info) -> str:
    return str(exc_info.value)


def test_bad_files_raise_bad_image_error_naming_the_path(tmp_path):
    bad = _write_bad_files(tmp_path)
    bad["truncated"] = _truncated_jpeg(tmp_path / "truncated.jpg")
    (tmp_path / "folder.jpg").mkdir()
    bad["directory"] = tmp_path / "folder.jpg"
    bad["missing"] = tmp_path / "missing.jpg"
    for kind, p in bad.items():
        with pytest.raises(BadImageError) as e:
            load_image(p)
        msg = _reason(e)
        assert str(p) in msg and "\n" not in msg, (kind, msg)
        assert isinstance(e.value, DataError)
    with pytest.raises(BadImageError, match="decompression bomb"):
        load_image(bad["bomb"])
    with pytest.raises(BadImageError, match="truncated"):
        load_image(bad["truncated"])
    with pytest.raises(BadImageError, match="link"):
        load_image(bad["loop"])


def test_check_file_quick_and_full(tmp_path):
    bad = _write_bad_files(tmp_path)
    Image.fromarray(_pattern(8, 8)).save(tmp_path / "good.png")
    trunc = _truncated_jpeg(tmp_path / "truncated.jpg")
    assert check_file(tmp_path / "good.png") is None and check_file(tmp_path / "good.png", full=True) is None
    assert check_file(bad["zero"]) == "empty file (0 bytes)"
    assert "not a readable image" in check_file(bad["text"])
    assert "decompression bomb" in check_file(bad["bomb"])
    assert check_file(bad["loop"]) == "symbolic link loop"
    # the header of a truncated JPEG is fine: only the full decode (--strict, or the loader) finds it
    assert check_file(trunc) is None
    assert "truncated" in check_file(trunc, full=True)
    for p in bad.values():
        assert check_file(p, full=True) is not None, p


@pytest.mark.parametrize("ext", ["png", "jpg", "gif", "bmp", "tif", "webp"])
def test_corrupted_files_raise_only_bad_image_error(tmp_path, ext):
    """Random byte damage: load_image decodes or raises BadImageError, nothing else (the loader
    turns BadImageError into weight 0; any other exception would stop the training)."""
    rng = np.random.default_rng(list(ext.encode()))
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(
        buf, {"jpg": "JPEG", "tif": "TIFF"}.get(ext, ext.upper()))
    data = buf.getvalue()
    p = tmp_path / f"damaged.{ext}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for trial in range(60):
            d = bytearray(data)
            span = 128 if trial % 2 else len(d)  # half the damage hits the header
            for pos in rng.integers(0, min(span, len(d)), rng.integers(1, 5)):
                d[pos] = rng.integers(0, 256)
            p.write_bytes(bytes(d[: len(d) - int(rng.integers(0, 3)) * (trial % 5)]))
            try:
                assert load_image(p).mode == "RGB"
            except BadImageError:
                pass
            check_file(p)  # never raises
            check_file(p, full=True)


def test_decompression_bomb_under_a_lowered_limit(tmp_path, monkeypatch):
    """The limit is jaxtl's MAX_IMAGE_PIXELS (a smaller limit than Pillow's own)."""
    Image.fromarray(_pattern(30, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(BadImageError, match="decompression bomb") as e:
        load_image(tmp_path / "big.png")
    assert "40x30" in str(e.value)
    assert "decompression bomb" in check_file(tmp_path / "big.png")
    Image.fromarray(_pattern(20, 20)).save(tmp_path / "small.png")
    assert load_image(tmp_path / "small.png").size == (20, 20)


def test_pillow_bomb_warning_is_refused_without_an_extra_limit(tmp_path, monkeypatch):
    """Between Pillow's warning and error thresholds the image is refused, not decoded."""
    import PIL.Image

    Image.fromarray(_pattern(30, 40)).save(tmp_path / "big.png")
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # 1200 px: over the warning, under the error
    monkeypatch.setattr(decode, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BadImageError, match="decompression bomb"):
            load_image(tmp_path / "big.png")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="running as root: file permissions do not block reads")
def test_unreadable_file_is_reported_as_permission_denied(tmp_path):
    p = tmp_path / "secret.png"
    Image.fromarray(_pattern(8, 8)).save(p)
    p.chmod(0)
    try:
        assert check_file(p) == "permission denied"
        with pytest.raises(BadImageError, match="permission denied"):
            load_image(p)
    finally:
        p.chmod(0o644)


def test_permission_denied_is_named_even_as_root(tmp_path, monkeypatch):
    """The same reason as with chmod 000, simulated so that it also runs as root."""
    import PIL.Image

    p = tmp_path / "secret.png"
    Image.fromarray(_pattern(8, 8)).save(p)
    real_open = PIL.Image.open

    def guarded_open(fp, *args, **kwargs):
        if Path(fp) == p:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", guarded_open)
    assert check_file(p) == "permission denied"
    with pytest.raises(BadImageError, match="permission denied") as e:
        load_image(p)
    assert str(p) in str(e.value)
    src = FileSource([p, tmp_path / "gone.png"], np.array([0, 1], np.int32), ["a", "b"])
    kept, skipped = scan_files(src, strict=False)
    assert len(kept) == 0 and [line.split(": ", 1)[1] for line in skipped] == ["permission denied", "no such file"]


def test_load_image_from_many_threads_leaves_warning_filters_alone(tmp_path):
    """Loader threads call load_image concurrently: process-wide warning filters must not change."""
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")
    before = list(warnings.filters)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often, as a busy machine does
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: load_image(tmp_path / "tiny.png"), range(4000)))
    finally:
        sys.setswitchinterval(old)
    assert list(warnings.filters) == before


# =========================================================================== folder sources


def test_folder_with_train_and_val(tmp_path):
    train = _make_folder(tmp_path / "train", {"zebra": 3, "Apple": 4, "mango": 2})
    val = _make_folder(tmp_path / "val", {"zebra": 1, "Apple": 2, "mango": 1}, start=100)
    ds = load_dataset(str(tmp_path))
    assert isinstance(ds, Dataset) and ds.skipped == [] and ds.flip_invariant
    assert ds.class_names == ["Apple", "mango", "zebra"]  # sorted as Python (and torchvision) sort
    assert ds.num_classes == 3 and len(ds.train) == 9 and len(ds.val) == 4
    for src, written in ((ds.train, train), (ds.val, val)):
        assert sorted(map(str, src.paths)) == sorted(map(str, written))
        for i in range(len(src)):
            label, idx = written[Path(src.paths[i])]
            assert src.labels[i] == label and src.labels.dtype == np.int32
            im = src.image(i)
            assert im.mode == "RGB" and im.getpixel((3, 3)) == _colour(label, idx)
            assert src.describe(i) == str(src.paths[i])


@pytest.mark.parametrize("val_name", ["valid", "validation", "test"])
def test_folder_val_directory_names(tmp_path, val_name):
    _make_folder(tmp_path / "train", {"a": 2, "b": 2})
    _make_folder(tmp_path / val_name, {"a": 1, "b": 1})
    ds = folder_dataset(tmp_path)
    assert len(ds.train) == 4 and len(ds.val) == 2 and ds.class_names == ["a", "b"]


def test_folder_val_class_order_follows_train(tmp_path):
    """Label ids of the val set are the training ids, whatever is on disk."""
    _make_folder(tmp_path / "train", {"cat": 2, "dog": 2})
    (tmp_path / "val" / "dog").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    Image.new("RGB", (8, 8), (1, 1, 1)).save(tmp_path / "val" / "dog" / "d.png")
    Image.new("RGB", (8, 8), (2, 2, 2)).save(tmp_path / "val" / "cat" / "c.png")
    ds = folder_dataset(tmp_path)
    got = {Path(p).parent.name: int(label) for p, label in zip(ds.val.paths, ds.val.labels)}
    assert got == {"cat": 0, "dog": 1}


def test_folder_listing_ignores_non_images_hidden_files_and_recurses(tmp_path):
    _make_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "a" / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "a" / "sub").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "sub" / "nested.JPG", "JPEG")
    (tmp_path / ".git").mkdir()  # hidden folders are not classes
    (tmp_path / "README.md").write_text("top-level files are ignored")
    ds = folder_dataset(tmp_path, val_fraction=0.3)
    assert ds.class_names == ["a", "b"] and ds.skipped == []
    paths = {Path(p).relative_to(tmp_path).as_posix() for p in list(ds.train.paths) + list(ds.val.paths)}
    assert "a/sub/nested.JPG" in paths and "a/notes.txt" not in paths and "a/.hidden.png" not in paths
    assert len(paths) == 7


def test_folder_split_is_stratified_deterministic_and_seeded(tmp_path):
    written = _make_folder(tmp_path, {"a": 10, "b": 20, "c": 5})
    ds = folder_dataset(tmp_path, val_fraction=0.2, seed=0)
    assert ds.class_names == ["a", "b", "c"]
    tr, va = set(map(str, ds.train.paths)), set(map(str, ds.val.paths))
    assert not tr & va and tr | va == set(map(str, written))
    assert np.bincount(ds.val.labels, minlength=3).tolist() == [2, 4, 1]  # 20 % of every class
    assert np.bincount(ds.train.labels, minlength=3).tolist() == [8, 16, 4]
    for src in (ds.train, ds.val):  # labels still match the files
        for p, label in zip(src.paths, src.labels):
            assert written[Path(p)][0] == label

    again = folder_dataset(tmp_path, val_fraction=0.2, seed=0)
    assert list(map(str, again.val.paths)) == list(map(str, ds.val.paths))
    other = folder_dataset(tmp_path, val_fraction=0.2, seed=1)
    assert set(map(str, other.val.paths)) != va
    assert np.bincount(other.val.labels, minlength=3).tolist() == [2, 4, 1]


def test_stratified_split_properties():
    labels = np.repeat(np.arange(4), [1, 2, 50, 7])
    tr, va = stratified_split(labels, 0.25, seed=3)
    assert not set(tr) & set(va) and sorted(np.concatenate([tr, va])) == list(range(len(labels)))
    assert np.bincount(labels[va], minlength=4).tolist() == [0, 1, 12, 2]  # a 1-image class stays in train
    assert np.bincount(labels[tr], minlength=4).tolist() == [1, 1, 38, 5]
    tr2, va2 = stratified_split(labels, 0.25, seed=3)
    assert (tr == tr2).all() and (va == va2).all()
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            stratified_split(labels, bad, seed=0)


def test_empty_class_folder_is_an_error(tmp_path):
    _make_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class") as e:
        load_dataset(str(tmp_path))
    assert "\n" not in str(e.value)


def test_empty_class_folder_in_train_val_layout_is_an_error(tmp_path):
    _make_folder(tmp_path / "train", {"a": 3, "b": 3})
    _make_folder(tmp_path / "val", {"a": 1, "b": 1})
    (tmp_path / "train" / "c").mkdir()
    with pytest.raises(DataError, match="'?c'?"):
        load_dataset(str(tmp_path))


def test_folder_without_images_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_folder_without_class_folders_is_an_error(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "loose.png")  # images but no class folders
    with pytest.raises(DataError, match="class sub-folders"):
        load_dataset(str(tmp_path))
    with pytest.raises(DataError, match="neither"):
        load_dataset(str(tmp_path / "does_not_exist"))


def test_single_class_is_an_error(tmp_path):
    _make_folder(tmp_path, {"only": 4})
    with pytest.raises(DataError, match="at least 2"):
        load_dataset(str(tmp_path))


def test_val_folder_lacking_a_training_class_is_an_error(tmp_path):
    _make_folder(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    _make_folder(tmp_path / "val", {"a": 1, "b": 1})
    with pytest.raises(DataError, match="lacks training class") as e:
        load_dataset(str(tmp_path))
    assert "c" in str(e.value) and "\n" not in str(e.value)


def test_val_class_folder_that_is_empty_is_an_error(tmp_path):
    _make_folder(tmp_path / "train", {"a": 2, "b": 2})
    _make_folder(tmp_path / "val", {"a": 1})
    (tmp_path / "val" / "b").mkdir()
    with pytest.raises(DataError, match="b"):
        load_dataset(str(tmp_path))


def test_val_class_with_only_unreadable_files_is_an_error(tmp_path):
    """After the bad files are dropped the val set lacks a class: the same error as a missing folder."""
    _make_folder(tmp_path / "train", {"a": 2, "b": 2})
    _make_folder(tmp_path / "val", {"a": 1})
    (tmp_path / "val" / "b").mkdir()
    (tmp_path / "val" / "b" / "broken.jpg").write_text("not an image")
    with pytest.raises(DataError, match="lacks training class"):
        load_dataset(str(tmp_path))


def test_val_folder_with_an_unknown_class_is_an_error(tmp_path):
    _make_folder(tmp_path / "train", {"a": 2, "b": 2})
    _make_folder(tmp_path / "val", {"a": 1, "b": 1, "zzz": 1})
    with pytest.raises(DataError, match="zzz"):
        load_dataset(str(tmp_path))


def test_bad_files_are_skipped_and_reported(tmp_path):
    written = _make_folder(tmp_path, {"a": 5, "b": 5})
    bad = _write_bad_files(tmp_path / "a")
    ds = load_dataset(str(tmp_path), val_fraction=0.2)
    assert len(ds.skipped) == len(bad) == 4
    reported = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in ds.skipped}
    assert set(reported) == {str(p) for p in bad.values()}
    assert reported[str(bad["zero"])] == "empty file (0 bytes)"
    assert "decompression bomb" in reported[str(bad["bomb"])]
    assert reported[str(bad["loop"])] == "symbolic link loop"
    kept = set(map(str, ds.train.paths)) | set(map(str, ds.val.paths))
    assert kept == set(map(str, written))
    assert np.bincount(ds.val.labels).tolist() == [1, 1]  # the split counts the readable images only


def test_bad_files_are_skipped_in_the_train_val_layout(tmp_path):
    _make_folder(tmp_path / "train", {"a": 3, "b": 3})
    _make_folder(tmp_path / "val", {"a": 2, "b": 2})
    (tmp_path / "train" / "b" / "text.jpg").write_text("hello")
    (tmp_path / "val" / "a" / "zero.png").write_bytes(b"")
    ds = load_dataset(str(tmp_path))
    assert sorted(line.split(": ")[0] for line in ds.skipped) == sorted(
        [str(tmp_path / "train" / "b" / "text.jpg"), str(tmp_path / "val" / "a" / "zero.png")])
    assert len(ds.train) == 6 and len(ds.val) == 4


def test_strict_stops_at_a_bad_file_and_names_it(tmp_path):
    _make_folder(tmp_path, {"a": 3, "b": 3})
    trunc = _truncated_jpeg(tmp_path / "b" / "cut.jpg")  # passes the quick check: only strict finds it
    assert load_dataset(str(tmp_path)).skipped == []
    with pytest.raises(DataError) as e:
        load_dataset(str(tmp_path), strict=True)
    assert str(trunc) in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "a" / "z.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"and 1 more bad file"):
        load_dataset(str(tmp_path), strict=True)


def test_class_whose_files_are_all_unreadable_is_an_error(tmp_path):
    _make_folder(tmp_path, {"a": 4, "b": 4})
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.jpg").write_text("nope")
    (tmp_path / "c" / "y.png").write_bytes(b"")
    with pytest.raises(DataError, match="no readable training images for class.*c"):
        load_dataset(str(tmp_path))


def test_scan_files_counts_and_keeps_labels(tmp_path):
    written = _make_folder(tmp_path, {"a": 2, "b": 2})
    bad = _write_bad_files(tmp_path / "b")
    paths = sorted(written) + list(bad.values())
    labels = np.array([written[p][0] for p in sorted(written)] + [1] * len(bad), np.int32)
    kept, skipped = scan_files(FileSource(paths, labels, ["a", "b"]), strict=False, workers=2)
    assert kept.paths == sorted(written) and kept.labels.tolist() == [0, 0, 1, 1]
    assert len(skipped) == 4
    with pytest.raises(DataError, match=r"--strict: .*\(and 3 more bad files\)"):
        scan_files(FileSource(paths, labels, ["a", "b"]), strict=True)


# --------------------------------------------------------------------------- limit per class


def test_limit_per_class(tmp_path):
    _make_folder(tmp_path, {"a": 12, "b": 12, "c": 3})
    full = load_dataset(str(tmp_path), val_fraction=0.25, seed=5)
    ds = load_dataset(str(tmp_path), val_fraction=0.25, seed=5, limit_per_class=4)
    assert np.bincount(full.train.labels).tolist() == [9, 9, 2]
    assert np.bincount(ds.train.labels).tolist() == [4, 4, 2]  # a smaller class keeps all it has
    assert list(map(str, ds.val.paths)) == list(map(str, full.val.paths))  # val is never limited
    kept = [ds.train.describe(i) for i in range(len(ds.train))]
    assert set(kept) <= set(map(str, full.train.paths))
    again = load_dataset(str(tmp_path), val_fraction=0.25, seed=5, limit_per_class=4)
    assert [again.train.describe(i) for i in range(len(again.train))] == kept
    assert ds.train.image(0).mode == "RGB"


def test_limit_indices_per_class_seeded():
    labels = np.repeat(np.arange(3), 20)
    a = limit_indices_per_class(labels, 5, seed=0)
    assert np.bincount(labels[a]).tolist() == [5, 5, 5] and (np.diff(a) > 0).all()
    assert (a == limit_indices_per_class(labels, 5, seed=0)).all()
    assert not (a == limit_indices_per_class(labels, 5, seed=1)).all()
    with pytest.raises(ConfigError):
        limit_indices_per_class(labels, 0, seed=0)


# =========================================================================== digits and arrays


def test_digits():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", val_fraction=0.2, seed=0)
    assert ds.name == "digits" and ds.flip_invariant is False
    assert ds.class_names == [str(i) for i in range(10)]
    assert len(ds.train) + len(ds.val) == 1797
    assert np.bincount(ds.val.labels, minlength=10).min() >= 30  # stratified
    ref = load_digits()
    all_labels = np.concatenate([ds.train.labels, ds.val.labels])
    assert np.bincount(all_labels).tolist() == np.bincount(ref.target).tolist()
    i = 0
    im = ds.train.image(i)
    assert im.mode == "RGB" and im.size == (8, 8)
    a = np.asarray(im)
    assert (a[..., 0] == a[..., 1]).all() and (a[..., 1] == a[..., 2]).all()
    orig = int(ds.train.indices[i])
    np.testing.assert_array_equal(a[..., 0], np.round(ref.images[orig] * 255 / 16).astype(np.uint8))
    assert ds.train.labels[i] == ref.target[orig]
    limited = load_dataset("digits", limit_per_class=20)
    assert np.bincount(limited.train.labels).tolist() == [20] * 10


def test_digits_split_depends_on_seed():
    a, b = digits_dataset(seed=0), digits_dataset(seed=1)
    assert not np.array_equal(a.val.indices, b.val.indices)
    assert np.array_equal(a.val.indices, digits_dataset(seed=0).val.indices)


def test_arrays_uint8_and_float():
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (12, 6, 5, 3), dtype=np.uint8)
    labels = np.arange(12) % 3
    ds = array_dataset(u8, labels, ["x", "y", "z"], val_fraction=0.25)
    assert ds.class_names == ["x", "y", "z"] and len(ds.train) == 9 and len(ds.val) == 3
    i = int(ds.train.indices[0])
    np.testing.assert_array_equal(np.asarray(ds.train.image(0)), u8[i])

    f = u8.astype(np.float32) / 255.0
    src = ArraySource(f, labels, ["x", "y", "z"])
    for j in range(12):
        np.testing.assert_array_equal(np.asarray(src.image(j)), u8[j])
    assert array_dataset(u8, labels).class_names == ["0", "1", "2"]  # names default to the label ids

    grey = rng.integers(0, 256, (4, 5, 5), dtype=np.uint8)
    for imgs in (grey, grey[..., None]):
        im = ArraySource(imgs, [0, 1, 0, 1], ["a", "b"]).image(2)
        assert im.mode == "RGB" and (np.asarray(im)[..., 1] == grey[2]).all()
    rgba = np.zeros((2, 3, 3, 4), np.uint8)
    rgba[..., 0] = 255
    assert np.asarray(ArraySource(rgba, [0, 1], ["a", "b"]).image(0))[0, 0].tolist() == [255, 255, 255]

    ints = ArraySource(u8.astype(np.int64), labels, ["x", "y", "z"])  # numpy's default integer type
    np.testing.assert_array_equal(np.asarray(ints.image(3)), u8[3])

    ds2 = array_dataset(u8[:6], labels[:6], val_images=u8[6:], val_labels=labels[6:])
    assert len(ds2.train) == 6 and len(ds2.val) == 6
    np.testing.assert_array_equal(np.asarray(ds2.val.image(0)), u8[6])


@pytest.mark.parametrize("shape", [(4, 8), (4, 8, 8, 2), (4, 8, 8, 3, 1), (8,)])
def test_arrays_bad_shapes_rejected(shape):
    with pytest.raises(DataError, match="shape"):
        ArraySource(np.zeros(shape, np.uint8), np.zeros(shape[0], np.int32), ["a", "b"])


def test_arrays_bad_values_rejected():
    imgs = np.zeros((4, 8, 8, 3), np.uint8)
    with pytest.raises(DataError, match="labels"):
        ArraySource(imgs, [0, 1, 0], ["a", "b"])  # 3 labels for 4 images
    with pytest.raises(DataError, match="labels must be in"):
        ArraySource(imgs, [0, 1, 2, 0], ["a", "b"])
    with pytest.raises(DataError, match="labels must be in"):
        array_dataset(imgs, [0, 1, -1, 0])
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        ArraySource(np.full((4, 8, 8, 3), 2.0), [0, 1, 0, 1], ["a", "b"])  # float in [0, 255]
    with pytest.raises(DataError, match=r"\[0, 255\]"):
        ArraySource(np.full((4, 8, 8, 3), 300, np.int32), [0, 1, 0, 1], ["a", "b"])
    with pytest.raises(DataError, match="val_labels"):
        array_dataset(imgs, [0, 1, 0, 1], val_images=imgs)
    nan = np.zeros((4, 8, 8, 3), np.float32)
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(DataError, match="finite"):
        ArraySource(nan, [0, 1, 0, 1], ["a", "b"])


# =========================================================================== tfds


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_mock_mnist_gives_rgb_images_and_a_stratified_split(tfds):
    with tfds.testing.mock_data(num_examples=60):
        ds = load_dataset("tfds:mnist", val_fraction=0.25, seed=0)
        assert ds.name == "tfds:mnist" and ds.class_names == [str(i) for i in range(10)]
        assert len(ds.train) + len(ds.val) == 60
        # mock data has no split metadata: the train split is split by the stratified fraction
        whole = ds.train.parent
        tr, va = stratified_split(whole.labels, 0.25, 0)
        assert (ds.train.indices == tr).all() and (ds.val.indices == va).all()
        assert whole.labels.dtype == np.int32 and whole.labels.min() >= 0 and whole.labels.max() < 10
        for i in (0, len(ds.val) - 1):
            im = ds.val.image(i)
            assert isinstance(im, Image.Image) and im.mode == "RGB" and im.size == (28, 28)
            a = np.asarray(im)
            assert (a[..., 0] == a[..., 2]).all()  # grey digits -> equal channels
        assert ds.train.describe(0).startswith("tfds:mnist/train[")
        batch = next(iter(Loader(ds.train, PRE, batch_size=8, train=True, workers=1).epoch(0)))
        assert batch["image"].shape == (8, 20, 20, 3) and batch["weight"].sum() == 8


def test_tfds_mock_cifar10_and_limit(tfds):
    with tfds.testing.mock_data(num_examples=40):
        ds = load_dataset("tfds:cifar10", limit_per_class=1, seed=2)
        assert ds.num_classes == 10  # (mock data built from code: names are the label ids)
        assert np.bincount(ds.train.labels, minlength=10).max() == 1
        im = ds.train.image(0)
        assert im.mode == "RGB" and im.size == (32, 32)


def _write_mnist_metadata(tfds, data_dir: Path, n_train: int, n_test: int) -> None:
    """dataset_info.json with train and test splits, for mock_data's USE_FILES policy."""
    from tensorflow_datasets.core import naming
    from tensorflow_datasets.core import splits as splits_lib

    builder = tfds.builder("mnist", data_dir=str(data_dir))

    def split(name, n):
        return splits_lib.SplitInfo(name=name, shard_lengths=[n], num_bytes=0, filename_template=(
            naming.ShardedFileTemplate(data_dir=builder.data_path, dataset_name="mnist", split=name,
                                       filetype_suffix="array_record")))

    builder.info.set_splits(splits_lib.SplitDict([split("train", n_train), split("test", n_test)]))
    Path(builder.data_dir).mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


def test_tfds_uses_the_test_split_for_validation(tfds, tmp_path):
    _write_mnist_metadata(tfds, tmp_path, 30, 12)
    with tfds.testing.mock_data(num_examples=30, data_dir=str(tmp_path), policy=tfds.testing.MockPolicy.USE_FILES):
        ds = load_dataset("tfds:mnist", data_dir=str(tmp_path))
        assert ds.train.name == "tfds:mnist/train" and ds.val.name == "tfds:mnist/test"
        assert len(ds.train) == 30 and ds.val.image(0).mode == "RGB"
        assert ds.val.describe(3) == "tfds:mnist/test[3]"


def test_tfds_not_prepared_names_the_dataset_and_folder_and_downloads_nothing(tfds, tmp_path, monkeypatch):
    calls = []

    def no_download(self, *args, **kwargs):
        calls.append(self.name)
        raise AssertionError("tried to download")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", no_download)
    data_dir = tmp_path / "tfds_data"
    with pytest.raises(DataError) as e:
        load_dataset("tfds:mnist", data_dir=str(data_dir))
    msg = str(e.value)
    assert "mnist" in msg and str(data_dir) in msg and "not prepared" in msg, msg
    assert "\n" not in msg and "tried to download" not in msg
    assert calls == []  # no network use: an unprepared dataset is reported, never downloaded


def test_tfds_unknown_dataset(tfds, tmp_path):
    with pytest.raises(DataError, match="no_such_dataset_xyz"):
        load_dataset("tfds:no_such_dataset_xyz", data_dir=str(tmp_path))


# =========================================================================== loader


class IndexSource(Source):
    """Example i is a flat image whose red channel is i (so a batch says which examples it holds)."""

    def __init__(self, n: int, num_classes: int = 3, size: int = 8, bad: tuple[int, ...] = ()):
        self.n, self.size, self.bad = n, size, set(bad)
        self.labels = (np.arange(n) % num_classes).astype(np.int32)
        self.class_names = [str(c) for c in range(num_classes)]
        self.calls = 0

    def image(self, i):
        self.calls += 1
        if i in self.bad:
            raise BadImageError(f"example {i}: broken on purpose")
        return Image.new("RGB", (self.size, self.size), (i, 255 - i, 7))


def _ids(batch) -> np.ndarray:
    return batch["image"][:, 0, 0, 0].astype(np.int64)


def _epoch(loader, epoch=0, **kw):
    return list(loader.epoch(epoch, **kw))


def test_loader_same_seed_same_batches_and_new_order_each_epoch():
    src = IndexSource(40)
    mk = lambda seed, workers=2: Loader(src, IDENT, batch_size=8, train=True, seed=seed, workers=workers)
    a, b = _epoch(mk(0)), _epoch(mk(0, workers=1))
    assert len(a) == 5
    for x, y in zip(a, b):
        for k in ("image", "label", "weight"):
            np.testing.assert_array_equal(x[k], y[k])
    order0 = np.concatenate([_ids(x) for x in a])
    order1 = np.concatenate([_ids(x) for x in _epoch(mk(0), epoch=1)])
    other_seed = np.concatenate([_ids(x) for x in _epoch(mk(1))])
    assert sorted(order0) == sorted(order1) == list(range(40))
    assert not (order0 == order1).all() and not (order0 == other_seed).all()
    assert (order0 == mk(0).order(0)).all()
    for x in a:  # labels travel with their images
        assert (x["label"] == _ids(x) % 3).all() and x["image"].dtype == np.uint8


def test_loader_train_drops_the_last_partial_batch():
    src = IndexSource(10)
    loader = Loader(src, IDENT, batch_size=4, train=True, seed=0)
    batches = _epoch(loader)
    assert len(loader) == len(batches) == 2
    ids = np.concatenate([_ids(b) for b in batches])
    assert len(set(ids.tolist())) == 8 and all((b["weight"] == 1).all() for b in batches)
    with pytest.raises(ConfigError, match="fewer than one batch"):
        Loader(IndexSource(3), IDENT, batch_size=4, train=True)


def test_loader_eval_pads_masks_and_counts_every_example_once():
    src = IndexSource(10)
    loader = Loader(src, IDENT, batch_size=4, train=False)
    batches = _epoch(loader)
    assert len(loader) == len(batches) == 3
    assert batches[-1]["weight"].tolist() == [1, 1, 0, 0]
    counted = np.concatenate([_ids(b)[b["weight"] > 0] for b in batches])
    assert counted.tolist() == list(range(10))  # not shuffled, each exactly once
    last = batches[-1]
    assert (last["image"][2:] != 0).any()  # padding repeats real images (no blank slots)
    assert set(_ids(last)[2:].tolist()) <= {8, 9}
    assert all(b["image"].shape == (4, 8, 8, 3) for b in batches)


@pytest.mark.parametrize("train,n", [(True, 37), (False, 37), (False, 3)])
def test_loader_process_slices_cover_each_global_batch_exactly(train, n):
    src = IndexSource(n)
    kw = dict(batch_size=8, train=train, seed=4, workers=1)
    single = _epoch(Loader(src, IDENT, **kw), epoch=2)
    p0 = _epoch(Loader(src, IDENT, process_index=0, process_count=2, **kw), epoch=2)
    p1 = _epoch(Loader(src, IDENT, process_index=1, process_count=2, **kw), epoch=2)
    assert len(single) == len(p0) == len(p1)
    seen = []
    for s, a, b in zip(single, p0, p1):
        assert a["image"].shape[0] == b["image"].shape[0] == 4
        np.testing.assert_array_equal(np.concatenate([a["weight"], b["weight"]]), s["weight"])
        real = np.concatenate([_ids(a)[a["weight"] > 0], _ids(b)[b["weight"] > 0]])
        np.testing.assert_array_equal(real, _ids(s)[s["weight"] > 0])
        seen += real.tolist()
    if train:
        assert len(seen) == len(set(seen)) == (n // 8) * 8
    else:
        assert sorted(seen) == list(range(n))
    with pytest.raises(ConfigError, match="divisible"):
        Loader(src, IDENT, batch_size=6, train=False, process_count=4)


def test_loader_resumes_from_a_batch():
    src = IndexSource(24)
    loader = Loader(src, IDENT, batch_size=4, train=True, seed=9)
    full = _epoch(loader, epoch=3)
    src.calls = 0
    tail = _epoch(loader, epoch=3, start_batch=4)
    assert len(tail) == 2 and src.calls == 8  # skipped batches are not decoded
    for x, y in zip(full[4:], tail):
        np.testing.assert_array_equal(x["image"], y["image"])


def test_loader_train_ships_a_resized_centre_square_and_eval_the_exact_crop(tmp_path):
    arr = np.asarray(Image.fromarray(_pattern(30, 50)).resize((50, 30)))
    src = ArraySource(arr[None], np.array([0]), ["a"])
    pre = Preprocessing(input_size=12, resize_size=15)
    assert train_image_size(pre) == 15
    t = next(iter(Loader(src, pre, batch_size=1, train=True).epoch(0)))
    e = next(iter(Loader(src, pre, batch_size=1, train=False).epoch(0)))
    im = Image.fromarray(arr)
    expected_t = np.asarray(center_crop(resize_shorter_side(im, 15), 15))
    np.testing.assert_array_equal(t["image"][0], expected_t)
    np.testing.assert_array_equal(e["image"][0], eval_crop(im, pre))
    assert t["image"].shape == (1, 15, 15, 3) and e["image"].shape == (1, 12, 12, 3)


def test_loader_bad_image_gets_weight_zero_and_a_copy_of_another_image(tmp_path):
    written = _make_folder(tmp_path, {"a": 4, "b": 3})
    trunc = _truncated_jpeg(tmp_path / "b" / "cut.jpg")
    ds = load_dataset(str(tmp_path), val_fraction=0.2)
    assert ds.skipped == []  # the header looks fine, so the scan keeps it
    paths = sorted(written) + [trunc]
    labels = np.array([written[p][0] for p in sorted(written)] + [1], np.int32)
    src = FileSource(paths, labels, ["a", "b"])
    for train in (True, False):
        loader = Loader(src, Preprocessing(input_size=16, resize_size=16), batch_size=8, train=train, seed=1)
        (batch,) = _epoch(loader)
        slot = int(np.flatnonzero(loader.order(0) == 7)[0])
        assert batch["weight"][slot] == 0 and batch["weight"].sum() == 7
        assert list(loader.bad) == [str(trunc)] and "truncated" in loader.bad[str(trunc)]
        others = [j for j in range(8) if j != slot]
        copies = [j for j in others if np.array_equal(batch["image"][j], batch["image"][slot])]
        assert copies, "the bad slot should hold a copy of another image of the batch"
        assert batch["label"][slot] == batch["label"][copies[0]]
        assert (batch["image"][slot] != 0).any()


def test_loader_all_bad_batch_and_bad_in_eval():
    src = IndexSource(6, bad=(0, 1, 2, 3))
    loader = Loader(src, IDENT, batch_size=4, train=False)
    first, second = _epoch(loader)
    assert first["weight"].tolist() == [0, 0, 0, 0]
    assert second["weight"].tolist() == [1, 1, 0, 0]
    assert sorted(loader.bad) == [f"example {i}" for i in range(4)]
    assert "broken on purpose" in loader.bad["example 2"]


def test_loader_other_errors_reach_the_consumer():
    class Exploding(IndexSource):
        def image(self, i):
            if i == 5:
                raise RuntimeError("disk on fire")
            return super().image(i)

    with pytest.raises(RuntimeError, match="disk on fire"):
        _epoch(Loader(Exploding(12), IDENT, batch_size=4, train=False))


def _loader_threads():
    return [t for t in threading.enumerate() if t.name == "jaxtl-loader" and t.is_alive()]


def test_loader_stops_its_thread_when_the_consumer_stops():
    src = IndexSource(200)
    loader = Loader(src, IDENT, batch_size=4, train=True, prefetch=2)
    it = loader.epoch(0)
    next(it)
    it.close()
    gc.collect()
    deadline = time.time() + 5
    while _loader_threads() and time.time() < deadline:
        time.sleep(0.02)
    assert not _loader_threads()
    assert src.calls < 100  # prefetch is bounded: the epoch was not decoded to the end


def test_loader_put_is_applied():
    loader = Loader(IndexSource(8), IDENT, batch_size=4, train=False, put=lambda b: ("put", b["weight"].sum()))
    assert _epoch(loader) == [("put", 4.0), ("put", 4.0)]


def test_array_loader_matches_the_image_loader_order_and_padding():
    n = 11
    feats = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    labels = (np.arange(n) % 3).astype(np.int32)
    weight = np.ones(n, np.float32)
    weight[4] = 0.0  # a bad image found while caching stays masked
    for train in (True, False):
        arr = list(ArrayLoader(feats, labels, weight, batch_size=4, train=train, seed=3).epoch(1))
        img = _epoch(Loader(IndexSource(n), IDENT, batch_size=4, train=train, seed=3), epoch=1)
        assert len(arr) == len(img) == (2 if train else 3)
        for a, b in zip(arr, img):
            np.testing.assert_array_equal(a["image"][:, 0][b["weight"] > 0], _ids(b)[b["weight"] > 0])
            expect_w = b["weight"] * (_ids(b) != 4)
            np.testing.assert_array_equal(a["weight"], expect_w)
    plan = BatchPlan(11, 4, train=False)
    assert [n_real for _, n_real in plan.local_slices(0)] == [4, 4, 3]
    with pytest.raises(ConfigError):
        BatchPlan(10, 0, train=False)


def test_loader_on_a_real_folder(tmp_path):
    _make_folder(tmp_path, {"a": 9, "b": 9}, size=(40, 28))
    ds = load_dataset(str(tmp_path), val_fraction=0.25)
    tr = _epoch(Loader(ds.train, PRE, batch_size=4, train=True, seed=0))
    va = _epoch(Loader(ds.val, PRE, batch_size=4, train=False))
    assert len(ds.train) == 14 and len(ds.val) == 4  # 25 % of 9 -> 2 val images per class
    assert len(tr) == 3 and len(va) == 1 and sum(b["weight"].sum() for b in va) == len(ds.val)
    for b in tr:
        assert b["image"].shape == (4, 20, 20, 3)
        # each flat image keeps its class colour through the resize
        for j in range(4):
            assert b["image"][j, 10, 10, 0] == _colour(int(b["label"][j]), 0)[0]


# =========================================================================== eval transform


def test_resize_and_crop_rules():
    im = Image.new("RGB", (500, 375))
    assert resize_shorter_side(im, 256).size == (341, 256)  # int(256 * 500 / 375) = 341
    assert resize_shorter_side(Image.new("RGB", (375, 500)), 256).size == (256, 341)
    same = Image.new("RGB", (256, 300))
    assert resize_shorter_side(same, 256) is same
    assert center_crop(Image.new("RGB", (341, 256)), 224).size == (224, 224)
    # smaller than the crop: zero padding, image centred
    small = center_crop(Image.new("RGB", (4, 6), (9, 9, 9)), 8)
    a = np.asarray(small)
    assert small.size == (8, 8) and a[0, 0].tolist() == [0, 0, 0] and a[4, 4].tolist() == [9, 9, 9]
    pre = Preprocessing(input_size=10, resize_size=12)
    out = eval_transform(Image.new("RGB", (30, 20), (255, 0, 0)), pre)
    assert out.shape == (10, 10, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0, 0], (np.array([1, 0, 0]) - pre.mean) / np.array(pre.std), rtol=1e-5)


def _skimage_photos():
    import skimage.data

    photos = {name: getattr(skimage.data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")}
    photos["camera(grey)"] = skimage.data.camera()[::2, 1::3]  # 256x171 grey, odd sizes
    return {k: Image.fromarray(v).convert("RGB") for k, v in photos.items()}


@pytest.mark.torch
@pytest.mark.parametrize("pre", [
    Preprocessing(224, 256, interpolation="bilinear"),
    Preprocessing(224, 248, interpolation="bicubic"),
    Preprocessing(227, 235, interpolation="bilinear"),  # odd crop offsets
    Preprocessing(180, 160, interpolation="bilinear"),  # crop larger than the resize: padding
], ids=lambda p: f"{p.resize_size}-{p.input_size}-{p.interpolation}")
def test_eval_transform_matches_torchvision(pre):
    pytest.importorskip("skimage")
    import torch
    from torchvision import transforms as T

    mode = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}[pre.interpolation]
    crop = T.Compose([T.Resize(pre.resize_size, interpolation=mode), T.CenterCrop(pre.input_size)])
    full = T.Compose([crop, T.ToTensor(), T.Normalize(pre.mean, pre.std)])
    for name, im in _skimage_photos().items():
        want_crop = np.asarray(crop(im))
        np.testing.assert_array_equal(eval_crop(im, pre), want_crop, err_msg=name)
        want = full(im).permute(1, 2, 0).numpy()
        got = eval_transform(im, pre)
        assert got.shape == want.shape == (pre.input_size, pre.input_size, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0, err_msg=name)
    assert torch.is_tensor(full(im))


@pytest.mark.torch
def test_eval_loader_on_jpeg_files_matches_torchvision(tmp_path):
    """The whole path (JPEG file -> loader batch) against torchvision's ImageFolder-style loading."""
    pytest.importorskip("skimage")
    from torchvision import transforms as T
    from torchvision.datasets.folder import pil_loader

    photos = _skimage_photos()
    for k, (name, im) in enumerate(photos.items()):
        d = tmp_path / ("a" if k % 2 else "b")
        d.mkdir(exist_ok=True)
        im.save(d / f"{name.split('(')[0]}.jpg", quality=90)
    pre = Preprocessing(224, 256)
    ds = load_dataset(str(tmp_path), val_fraction=0.5)
    src = FileSource(list(ds.train.paths) + list(ds.val.paths),
                     np.concatenate([ds.train.labels, ds.val.labels]), ds.class_names)
    batches = _epoch(Loader(src, pre, batch_size=2, train=False))
    got = np.concatenate([b["image"][b["weight"] > 0] for b in batches])
    tv = T.Compose([T.Resize(256), T.CenterCrop(224)])
    want = np.stack([np.asarray(tv(pil_loader(str(p)))) for p in src.paths])
    np.testing.assert_array_equal(got, want)


def test_folder_with_only_a_train_subfolder_is_split(tmp_path):
    """root/train/<class>/... without a val folder: split train, never read "train" as a class."""
    _make_folder(tmp_path / "train", {"cat": 5, "dog": 5})
    ds = folder_dataset(tmp_path, val_fraction=0.2, seed=0)
    assert ds.class_names == ["cat", "dog"]
    assert len(ds.train) == 8 and len(ds.val) == 2
