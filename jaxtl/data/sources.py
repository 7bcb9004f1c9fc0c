"""Data sources behind one interface, picked by ``--data``.

* a folder in torchvision's ``ImageFolder`` layout (one sub-folder per class),
  with ``train/`` and ``val/`` sub-folders or split by a fixed-seed stratified
  fraction; class names are the sorted folder names;
* ``digits``: scikit-learn's 1,797 handwritten digits (8x8 grey, 10 classes),
  upsampled to RGB: the offline default that needs no download;
* ``tfds:NAME``: a prepared tensorflow-datasets dataset read through
  ``tfds.data_source`` (ArrayRecord, random access, no TensorFlow needed);
* numpy arrays (images, labels) for library users.

A source gives ``len``, ``labels`` (int32), ``class_names`` and ``image(i)``
(a PIL RGB image). Files that cannot be images are found before training
(``scan``) and reported by path with a count; ``strict`` stops instead.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxtl.data import decode
from jaxtl.data.decode import IMAGE_EXTENSIONS, UNREADABLE_FORMAT, BadImageError, file_error_reason, load_image, to_rgb
from jaxtl.data.domains import SHIFTS
from jaxtl.errors import ConfigError, DataError

VAL_DIR_NAMES = ("val", "valid", "validation", "test")


class Source:
    """Random access to labelled images."""

    class_names: list[str]
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self, i: int) -> str:
        return f"example {i}"

    def subset(self, indices: Sequence[int]) -> "Source":
        return Subset(self, np.asarray(indices, np.int64))


@dataclass
class Subset(Source):
    parent: Source
    indices: np.ndarray

    def __post_init__(self):
        self.class_names = self.parent.class_names
        self.labels = self.parent.labels[self.indices]

    def image(self, i: int) -> Image.Image:
        return self.parent.image(int(self.indices[i]))

    def describe(self, i: int) -> str:
        return self.parent.describe(int(self.indices[i]))


@dataclass
class FileSource(Source):
    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]

    def image(self, i: int) -> Image.Image:
        return load_image(self.paths[i])

    def describe(self, i: int) -> str:
        return str(self.paths[i])


@dataclass
class ArraySource(Source):
    """Images as an array: uint8 (N, H, W[, C]) in [0, 255] or float in [0, 1]."""

    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]

    def __post_init__(self):
        images = np.asarray(self.images)
        if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4)):
            raise DataError(f"images must be (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got shape {images.shape}")
        if len(images) != len(self.labels):
            raise DataError(f"{len(images)} images but {len(self.labels)} labels")
        if images.dtype != np.uint8 and np.issubdtype(images.dtype, np.integer):
            # Integer arrays (numpy's default int64, uint16...) holding 0..255 are 8-bit images,
            # not "float images".
            if images.size and (images.min() < 0 or images.max() > 255):
                raise DataError(f"integer images must be in [0, 255]; got {images.dtype} values from "
                                f"{images.min()} to {images.max()}")
            images = images.astype(np.uint8)
        if images.dtype != np.uint8:
            if images.size and (np.nanmin(images) < 0 or np.nanmax(images) > 1.0 or not np.isfinite(images).all()):
                raise DataError("float images must be finite and in [0, 1]; pass uint8 for [0, 255]")
            images = np.round(images * 255.0).astype(np.uint8)
        self.images = images
        self.labels = np.asarray(self.labels, np.int32)
        _check_labels(self.labels, len(self.class_names))

    def image(self, i: int) -> Image.Image:
        a = self.images[i]
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return to_rgb(Image.fromarray(a))


class TfdsSource(Source):
    """A split of a prepared tensorflow-datasets dataset via ``tfds.data_source``."""

    def __init__(self, data_source: Any, class_names: list[str], image_key: str = "image", label_key: str = "label",
                 name: str = "tfds"):
        self.ds, self.image_key, self.label_key, self.name = data_source, image_key, label_key, name
        self.class_names = class_names
        n = len(data_source)
        # Labels are read once (small); images on demand.
        self.labels = np.asarray([int(data_source[i][label_key]) for i in range(n)], np.int32)

    def image(self, i: int) -> Image.Image:
        a = np.asarray(self.ds[int(i)][self.image_key])
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        return to_rgb(Image.fromarray(a.astype(np.uint8) if a.dtype != np.uint8 else a))

    def describe(self, i: int) -> str:
        return f"{self.name}[{i}]"


@dataclass
class Dataset:
    """Train and validation sources with shared class names, plus what was skipped."""

    train: Source
    val: Source
    class_names: list[str]
    name: str
    skipped: list[str] = field(default_factory=list)  # "path: reason" of files that are not images
    flip_invariant: bool = True  # False where a mirror image changes the class (digits)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _check_labels(labels: np.ndarray, num_classes: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"labels must be in [0, {num_classes}); got values from {labels.min()} to {labels.max()}")


# ---------------------------------------------------------------------------
# Splitting and limiting


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, val): each class split by the same fraction, fixed seed."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"validation fraction must be in (0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * val_fraction))
        if len(idx) >= 2:
            n_val = min(max(n_val, 1), len(idx) - 1)
        else:
            n_val = 0
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def limit_indices_per_class(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices keeping at most ``n`` examples of each class (fixed seed)."""
    if n < 1:
        raise ConfigError(f"--limit-per-class must be >= 1, got {n}")
    rng = np.random.default_rng(seed + 7919)
    keep = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        keep.append(np.sort(idx[rng.permutation(len(idx))[:n]]))
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------
# Image folders


def _list_class_dir(d: Path) -> list[Path]:
    files = []
    for root, dirs, names in os.walk(d, followlinks=False):
        dirs.sort()
        for name in sorted(names):
            if Path(name).suffix.lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                files.append(Path(root) / name)
    return files


def _read_folder(root: Path, class_names: list[str] | None = None) -> tuple[list[Path], np.ndarray, list[str]]:
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist or is not a folder")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
        raise DataError(f"{root} has no class sub-folders; expected the ImageFolder layout {root}/<class>/<image>")
    names = class_names or found
    paths, labels, empty = [], [], []
    for label, name in enumerate(names):
        d = root / name
        files = _list_class_dir(d) if d.is_dir() else []
        if not files:
            empty.append(name)
        paths += files
        labels += [label] * len(files)
    if empty and class_names is None:
        raise DataError(f"class folder(s) with no images in {root}: {', '.join(empty[:5])} "
                        f"(image extensions: {' '.join(IMAGE_EXTENSIONS)}); remove them or add images")
    if not paths:
        raise DataError(f"no images found under {root}")
    return paths, np.asarray(labels, np.int32), names


def check_file(path: Path, full: bool = False) -> str | None:
    """None if ``path`` looks like a usable image, else the reason.

    The quick check (header: opens, size under the bomb limit, readable) runs
    before every training; ``full`` decodes every pixel (``--strict``).
    """
    try:
        if full:
            load_image(path)
            return None
        st = path.stat()
        if st.st_size == 0:
            return "empty file (0 bytes)"
        # decode.MAX_IMAGE_PIXELS is read here at call time (it was imported by value, so a
        # lowered limit reached load_image but not this check).
        limit = decode.MAX_IMAGE_PIXELS
        with Image.open(path) as im:
            if im.width * im.height > limit:
                return f"{im.width}x{im.height} pixels is over the {limit} limit (decompression bomb?)"
            if im.width < 1 or im.height < 1:
                return "image has no pixels"
        return None
    except BadImageError as e:
        return str(e).split(": ", 1)[-1]
    except Image.DecompressionBombError as e:  # Pillow refuses over twice its limit: say so
        return f"refused as a decompression bomb ({e})"
    except UnidentifiedImageError:
        return UNREADABLE_FORMAT
    except OSError as e:
        reason = file_error_reason(e)
        if reason:
            return reason
        if "truncat" in str(e).lower():
            return f"truncated or corrupt image ({str(e)[:60]})"
        return f"not a readable image ({type(e).__name__}: {str(e)[:60]})"
    except Exception as e:  # noqa: BLE001 - Pillow raises many types on hostile input
        return f"not a readable image ({type(e).__name__})"


def scan_files(source: FileSource, *, strict: bool, workers: int = 4,
               progress: Callable[[int], None] | None = None) -> tuple[FileSource, list[str]]:
    """Drop files that are not images (reported as "path: reason"); ``strict`` raises at the first."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        reasons = list(pool.map(lambda p: check_file(p, full=strict), source.paths))
    bad = [f"{p}: {r}" for p, r in zip(source.paths, reasons) if r is not None]
    if bad and strict:
        raise DataError(f"--strict: {bad[0]}" + (f" (and {len(bad) - 1} more bad files)" if len(bad) > 1 else ""))
    keep = [i for i, r in enumerate(reasons) if r is None]
    kept = FileSource([source.paths[i] for i in keep], source.labels[keep], source.class_names)
    return kept, bad


def folder_dataset(root: str | Path, *, val_fraction: float = 0.2, seed: int = 0, strict: bool = False) -> Dataset:
    root = Path(root)
    val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    if (root / "train").is_dir() and val_dir is not None:
        paths, labels, names = _read_folder(root / "train")
        train = FileSource(paths, labels, names)
        vpaths, vlabels, vnames = _read_folder(val_dir, class_names=None)
        unknown = sorted(set(vnames) - set(names))
        if unknown:
            raise DataError(f"{val_dir} has class folder(s) that {root / 'train'} lacks: {', '.join(unknown[:5])}")
        missing = sorted(set(names) - set(vnames))
        if missing:
            raise DataError(f"{val_dir} lacks training class(es) {', '.join(missing[:5])}; every class needs "
                            "validation images (or drop the val folder to split train by --val-fraction)")
        # Re-read with the training class order so label ids agree.
        vpaths, vlabels, _ = _read_folder(val_dir, class_names=names)
        val = FileSource(vpaths, vlabels, names)
    else:
        # Only a train/ folder (no val): split it, rather than reading "train" as a class.
        split_root = root / "train" if (root / "train").is_dir() and _only_subfolder(root, "train") else root
        paths, labels, names = _read_folder(split_root)
        whole = FileSource(paths, labels, names)
        whole, bad = scan_files(whole, strict=strict)
        if len(whole) == 0:
            raise DataError(f"none of the {len(bad)} image files under {split_root} is readable (first: {bad[0]}); "
                            "Git LFS pointer files look like this: fetch the images (git lfs pull) or point --data "
                            "at real images")
        tr, va = stratified_split(whole.labels, val_fraction, seed)
        train = FileSource([whole.paths[i] for i in tr], whole.labels[tr], names)
        val = FileSource([whole.paths[i] for i in va], whole.labels[va], names)
        _require_all_classes(train, val, names, root)
        return Dataset(train, val, names, str(root), bad)
    train, bad_train = scan_files(train, strict=strict)
    val, bad_val = scan_files(val, strict=strict)
    _require_all_classes(train, val, names, root)
    # The same rule as for a missing val class folder, once unreadable files are dropped
    # (a val class folder holding only broken files would otherwise pass silently).
    missing = [names[c] for c in range(len(names)) if c not in set(val.labels.tolist())]
    if missing:
        raise DataError(f"{val_dir} lacks training class(es) {', '.join(missing[:5])} once unreadable files are "
                        "skipped; every class needs validation images (or drop the val folder to split train "
                        "by --val-fraction)")
    return Dataset(train, val, names, str(root), bad_train + bad_val)


def _only_subfolder(root: Path, name: str) -> bool:
    subs = [p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return subs == [name]


def _require_all_classes(train: Source, val: Source, names: list[str], where: Any) -> None:
    have = set(np.unique(train.labels).tolist())
    lacking = [names[c] for c in range(len(names)) if c not in have]
    if lacking:
        raise DataError(f"no readable training images for class(es) {', '.join(lacking[:5])} in {where}")
    if len(val) == 0:
        raise DataError(f"no validation images in {where}; add a val/ folder or more images per class")


# ---------------------------------------------------------------------------
# digits, tfds, arrays


def mirror_changes_class(name: str | None) -> bool:
    """Whether the class of the ``--data`` set ``name`` changes with a mirror image, known without
    loading it: the digits and their shifted domains (their :attr:`Dataset.flip_invariant` is False)."""
    return name == "digits" or name in SHIFTS


def digits_dataset(*, val_fraction: float = 0.2, seed: int = 0, shifted: bool | str = False) -> Dataset:
    """scikit-learn's handwritten digits: 8x8 grey levels 0..16 -> uint8 RGB.

    ``shifted``: a target domain of :mod:`jaxtl.data.domains` - ``True`` or
    ``"digits-shifted"`` (MNIST-M style), ``"digits-inverted"`` (inverted, re-tinted).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - a core dependency
        raise DataError("the digits set needs scikit-learn: pip install scikit-learn") from None
    d = load_digits()
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    images = np.repeat(images[..., None], 3, axis=-1)
    name = "digits"
    if shifted:
        name = "digits-shifted" if shifted is True else shifted
        if name not in SHIFTS:
            raise DataError(f"unknown digits shift {name!r}; choose from {', '.join(SHIFTS)}")
        images = SHIFTS[name](images)
    names = [str(c) for c in d.target_names]
    whole = ArraySource(images, d.target.astype(np.int32), names)
    tr, va = stratified_split(whole.labels, val_fraction, seed)
    return Dataset(whole.subset(tr), whole.subset(va), names, name, flip_invariant=not mirror_changes_class(name))


def array_dataset(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str] | None = None, *,
                  val_images: np.ndarray | None = None, val_labels: np.ndarray | None = None,
                  val_fraction: float = 0.2, seed: int = 0, name: str = "arrays") -> Dataset:
    labels = np.asarray(labels, np.int32)
    n = int(labels.max()) + 1 if labels.size else 0
    names = list(class_names) if class_names is not None else [str(i) for i in range(n)]
    train = ArraySource(images, labels, names)
    if val_images is not None:
        if val_labels is None:
            raise DataError("val_images needs val_labels")
        return Dataset(train, ArraySource(val_images, val_labels, names), names, name)
    tr, va = stratified_split(train.labels, val_fraction, seed)
    return Dataset(train.subset(tr), train.subset(va), names, name)


def tfds_dataset(name: str, *, data_dir: str | None = None, val_fraction: float = 0.2, seed: int = 0) -> Dataset:
    try:
        import tensorflow_datasets as tfds
    except ImportError:  # pragma: no cover - a core dependency
        raise DataError("tfds: datasets need tensorflow-datasets: pip install tensorflow-datasets") from None
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except Exception as e:  # noqa: BLE001 - tfds raises DatasetNotFoundError and friends
        raise DataError(f"tfds: unknown dataset {name!r} ({str(e).splitlines()[0][:100]})") from None
    info = builder.info
    splits = list(info.splits.keys())
    try:
        label_feature = info.features["label"]
        class_names = list(label_feature.names)
    except Exception:  # noqa: BLE001
        raise DataError(f"tfds:{name} has no 'label' ClassLabel feature; jaxtl needs (image, label) datasets") \
            from None
    image_key = "image" if "image" in info.features else next(
        (k for k, f in info.features.items() if type(f).__name__ == "Image"), None)
    if image_key is None:
        raise DataError(f"tfds:{name} has no image feature")
    try:
        val_split = next((s for s in ("validation", "test") if s in splits), None)
        # download=False: an unprepared dataset is reported, not downloaded and built here
        # (that needs TensorFlow; the default download=True started a download and then failed
        # with an unrelated import error).
        train_ds = tfds.data_source(name, split="train", data_dir=data_dir, download=False)
        val_ds = tfds.data_source(name, split=val_split, data_dir=data_dir, download=False) if val_split else None
    except Exception as e:  # noqa: BLE001
        looked = getattr(builder, "data_dir", None) or where
        try:
            prepared = builder.is_prepared()
        except Exception:  # noqa: BLE001
            prepared = False
        # tfds' own message for missing data talks about file formats; only show it when
        # something *is* there (e.g. prepared as TFRecord rather than ArrayRecord).
        msg = (str(e).splitlines()[0][:120] if str(e) else type(e).__name__) if prepared else "no prepared data"
        raise DataError(f"tfds:{name} is not prepared in {where} (looked in {looked}: {msg}); prepare it with "
                        f"`tfds build {name} --file_format=array_record` (needs network and TensorFlow) "
                        "or pass --data-dir") from None
    train = TfdsSource(train_ds, class_names, image_key, "label", f"tfds:{name}/train")
    if val_ds is not None:
        val = TfdsSource(val_ds, class_names, image_key, "label", f"tfds:{name}/{val_split}")
        return Dataset(train, val, class_names, f"tfds:{name}")
    tr, va = stratified_split(train.labels, val_fraction, seed)
    return Dataset(train.subset(tr), train.subset(va), class_names, f"tfds:{name}")


def load_dataset(spec: str, *, data_dir: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                 limit_per_class: int | None = None, strict: bool = False) -> Dataset:
    """``--data``: a folder path, ``digits`` (``digits-shifted``, ``digits-inverted``: shifted domains)
    or ``tfds:NAME``."""
    if spec == "digits" or spec in SHIFTS:
        ds = digits_dataset(val_fraction=val_fraction, seed=seed, shifted=False if spec == "digits" else spec)
    elif spec.startswith("tfds:"):
        ds = tfds_dataset(spec[5:], data_dir=data_dir, val_fraction=val_fraction, seed=seed)
    else:
        if not Path(spec).exists():
            raise DataError(f"--data {spec!r} is neither 'digits', 'tfds:NAME' nor an existing folder")
        ds = folder_dataset(spec, val_fraction=val_fraction, seed=seed, strict=strict)
    if ds.num_classes < 2:
        raise DataError(f"{ds.name} has {ds.num_classes} class; classification needs at least 2")
    if limit_per_class is not None:
        keep = limit_indices_per_class(ds.train.labels, limit_per_class, seed)
        ds.train = ds.train.subset(keep)
    return ds
