"""Host data-loading throughput of jaxtl's :class:`~jaxtl.data.loader.Loader` alone (no model, no device).

Writes N real-size JPEGs (500x375 or 375x500, quality 90) made from
``skimage.data`` photos with random crops, flips and colour changes (so no
two files are alike and the JPEG decoder does real work) into an
ImageFolder-layout temporary folder, then times whole epochs of the loader:

* ``train``: decode + shorter side to 256 + centre square 256x256, drop_last
  (the random crop to 224 runs on the device, not here);
* ``eval``: decode + torchvision's Resize(256) + CenterCrop(224), padded last batch;

with 2 and 1 worker threads, batch 32, mobilenet_v2's preprocessing.
Images/s counts real images delivered (weight 1); CPU ms/image is the
process's CPU time per image (all threads), which depends less on what else
runs on the machine than images/s does. Each configuration runs one
warm-up epoch, then ``--repeats`` timed epochs; the report gives the median and
the best. The machine may be shared: the load average is recorded with the
results.

    python benchmarks/bench_loader.py             # 300 images, 3 repeats (about a minute on 2 cores)
    python benchmarks/bench_loader.py --quick     # smoke run: 40 small images, 1 repeat

Prints a markdown table; writes benchmarks/results/loader.json (``--quick`` writes loader_quick.json).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

from jaxtl.data.loader import Loader
from jaxtl.data.sources import FileSource, load_dataset
from jaxtl.registry import get_spec

from common import log, write_json

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina", "cat")



def load_photos() -> list[Image.Image]:
    import skimage.data

    photos = []
    for name in PHOTOS:
        try:
            a = getattr(skimage.data, name)()
        except Exception as e:  # noqa: BLE001 - some skimage images need a download
            log(f"  skipping skimage.data.{name}: {type(e).__name__}")
            continue
        photos.append(Image.fromarray(a).convert("RGB"))
    if not photos:
        raise SystemExit("no skimage.data photos available (pip install scikit-image)")
    return photos


def variant(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """A random crop (30-100 % of the side), maybe flipped, colour-shifted, resized to ``size``."""
    w, h = photo.size
    s = rng.uniform(0.3, 1.0)
    cw, ch = max(16, int(w * s)), max(16, int(h * s * rng.uniform(0.8, 1.25)))
    cw, ch = min(cw, w), min(ch, h)
    x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BILINEAR)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.7, 1.3))
    im = ImageEnhance.Color(im).enhance(rng.uniform(0.5, 1.5))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
    hue = rng.integers(0, 3)  # swap channels now and then: a colour change the decoder cannot shortcut
    if hue:
        im = Image.merge("RGB", [im.getchannel(c) for c in np.roll([0, 1, 2], int(hue))])
    return im


def write_images(root: Path, n: int, size: tuple[int, int], classes: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    photos = load_photos()
    total = 0
    for i in range(n):
        d = root / f"class_{i % classes:02d}"
        d.mkdir(parents=True, exist_ok=True)
        wh = size if rng.random() < 0.75 else size[::-1]  # mostly landscape, some portrait
        p = d / f"img_{i:05d}.jpg"
        variant(photos[i % len(photos)], rng, wh).save(p, "JPEG", quality=90)
        total += p.stat().st_size
    return total


def run_epoch(loader: Loader, epoch: int) -> tuple[float, float, int]:
    """(wall seconds, process CPU seconds, real images) of one epoch."""
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for batch in loader.epoch(epoch):
        n += int(batch["weight"].sum())
    return time.perf_counter() - t0, time.process_time() - c0, n


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=None, help="number of JPEGs (default 300; 40 with --quick)")
    ap.add_argument("--repeats", type=int, default=None, help="timed epochs per configuration (default 3)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--backbone", default="mobilenet_v2", help="whose preprocessing to use")
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (small images, 1 repeat)")
    ap.add_argument("--keep", type=Path, default=None, help="write the images here and keep them")
    args = ap.parse_args(argv)
    n = args.n or (40 if args.quick else 300)
    repeats = args.repeats or (1 if args.quick else 3)
    size = (160, 120) if args.quick else (500, 375)
    pre = get_spec(args.backbone).preprocessing

    with tempfile.TemporaryDirectory(prefix="jaxtl-bench-loader-") as tmp:
        root = args.keep or Path(tmp)
        t0 = time.perf_counter()
        nbytes = write_images(root, n, size, classes=5, seed=0)
        log(f"wrote {n} JPEGs ({size[0]}x{size[1]}, quality 90, {nbytes / n / 1024:.0f} KiB each) to {root} "
            f"in {time.perf_counter() - t0:.1f} s")
        # Through the public entry point (the pre-training header scan included), then all files in one source.
        t0 = time.perf_counter()
        ds = load_dataset(str(root), val_fraction=0.2, seed=0)
        scan_s = time.perf_counter() - t0
        assert not ds.skipped, ds.skipped[:3]
        source = FileSource(list(ds.train.paths) + list(ds.val.paths),
                            np.concatenate([ds.train.labels, ds.val.labels]), ds.class_names)

        rows, results = [], []
        for mode in ("train", "eval"):
            for workers in args.workers:
                loader = Loader(source, pre, batch_size=args.batch_size, train=mode == "train", seed=0,
                                workers=workers, prefetch=2)
                run_epoch(loader, 0)  # warm-up: page cache, thread start, first-call costs
                times, cpus, count = [], [], 0
                for r in range(repeats):
                    s, c, count = run_epoch(loader, r + 1)
                    times.append(s)
                    cpus.append(c)
                rates = [count / s for s in times]
                cpu_ms = statistics.median(cpus) * 1000 / count
                res = {"mode": mode, "workers": workers, "batch_size": args.batch_size, "images_per_epoch": count,
                       "epoch_seconds": times, "epoch_cpu_seconds": cpus,
                       "images_per_s_median": statistics.median(rates), "images_per_s_best": max(rates),
                       "cpu_ms_per_image": cpu_ms, "output_size": loader.size, "bad": len(loader.bad)}
                results.append(res)
                rows.append([mode, workers, args.batch_size, count, f"{loader.size}x{loader.size}",
                             f"{statistics.median(rates):.0f}", f"{max(rates):.0f}",
                             f"{statistics.median(times) * 1000 / max(len(loader), 1):.0f}", f"{cpu_ms:.2f}"])
                log(f"  {mode:5s} workers={workers}: {statistics.median(rates):.0f} images/s "
                    f"(epochs {', '.join(f'{t:.2f}' for t in times)} s)")

    headers = ["mode", "workers", "batch", "images/epoch", "output", "images/s (median)", "images/s (best)",
               "ms/batch", "CPU ms/image"]
    table = "\n".join(["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
                      + ["| " + " | ".join(map(str, r)) + " |" for r in rows])
    print(f"\nLoader throughput, {n} JPEGs {size[0]}x{size[1]} q90, {args.backbone} preprocessing "
          f"(resize {pre.resize_size}, crop {pre.input_size}, {pre.interpolation}); header scan of the folder "
          f"{scan_s:.2f} s\n")
    print(table)

    import PIL

    payload = {
        "benchmark": "loader", "quick": args.quick, "n_images": n, "image_size": list(size), "jpeg_quality": 90,
        "mean_file_kib": round(nbytes / n / 1024, 1), "backbone": args.backbone, "preprocessing": pre.to_dict(),
        "repeats": repeats, "scan_seconds": scan_s, "results": results,
        "machine": {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
                    "pillow": PIL.__version__, "numpy": np.__version__,
                    "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "unix_time": time.time(),
    }
    out = write_json("loader_quick.json" if args.quick else "loader.json", payload)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
