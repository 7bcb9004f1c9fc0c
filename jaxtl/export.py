"""The exported-model folder: what the converter writes and training exports.

A folder holds ``model.msgpack`` (variables and metadata in one file, written
to a temporary name and renamed, so a crash never leaves a half-written model
in place of a good one) and ``meta.json`` (the same metadata, for people).
``load_model(folder)`` returns ``(model, variables, meta)``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
from flax import serialization, traverse_util

from jaxtl.errors import CheckpointError, JaxtlError
from jaxtl.models import abstract_variables, create_model
from jaxtl.registry import get_spec

FORMAT = "jaxtl-model/1"
MODEL_FILE = "model.msgpack"
META_FILE = "meta.json"


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (``/proc/self/status``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new file, never half of one.

    The file gets the permissions a plain ``open`` would give it (0666 less the umask), not the
    0600 of the temporary file it is written as."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_numpy_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: np.asarray(x), tree)


def save_model(directory: str | Path, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> Path:
    """Write an exported model; ``meta`` needs at least backbone and num_classes."""
    for key in ("backbone", "num_classes"):
        if key not in meta:
            raise ValueError(f"meta needs {key!r}")
    directory = Path(directory)
    write_variables_file(directory / MODEL_FILE, variables, meta)
    try:
        atomic_write_bytes(directory / META_FILE, (json.dumps({"format": FORMAT, **meta}, indent=2) + "\n").encode())
    except OSError as e:
        raise CheckpointError(f"cannot write the model to {directory}: {e.strerror or e}; "
                              "check free space and permissions") from None
    return directory / MODEL_FILE


def write_variables_file(path: Path, variables: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    """Variables and a little metadata in one file, written atomically (:func:`read_model_file` reads it)."""
    payload = {"meta": json.dumps({"format": FORMAT, **meta}), "variables": to_numpy_tree(dict(variables))}
    try:
        atomic_write_bytes(Path(path), serialization.msgpack_serialize(payload))
    except OSError as e:
        raise CheckpointError(f"cannot write {path}: {e.strerror or e}; check free space and permissions") from None


def read_variables_file(path: Path) -> dict:
    return read_model_file(Path(path))[0]


def read_model_file(path: Path) -> tuple[dict, dict]:
    try:
        payload = serialization.msgpack_restore(path.read_bytes())
        meta = json.loads(payload["meta"])
        variables = payload["variables"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except (OSError, ValueError, KeyError, TypeError, Exception) as e:  # msgpack raises its own types
        if isinstance(e, JaxtlError):
            raise
        raise CheckpointError(f"{path} is not a readable jaxtl model ({type(e).__name__}); "
                              "export or convert it again") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {meta.get('format')!r}; this jaxtl reads {FORMAT}")
    return variables, meta


def load_model(directory: str | Path):
    """Read an exported model: returns ``(model, variables, meta)``.

    ``meta`` holds backbone, source, num_classes, class_names, preprocessing
    (and where the weights came from).
    """
    directory = Path(directory)
    path = directory / MODEL_FILE if directory.is_dir() else directory
    if not path.exists():
        raise CheckpointError(f"no jaxtl model at {directory} (expected {MODEL_FILE}); "
                              "pass the --output folder of a training run or of python -m jaxtl.convert")
    variables, meta = read_model_file(path)
    model = create_model(meta["backbone"], int(meta["num_classes"]), source=meta.get("source"),
                         **meta.get("model_kwargs", {}))
    expected = traverse_util.flatten_dict(abstract_variables(model, get_spec(meta["backbone"])))
    got = traverse_util.flatten_dict(variables)
    bad = [("/".join(k), tuple(v.shape), tuple(got[k].shape)) for k, v in expected.items()
           if k in got and tuple(got[k].shape) != tuple(v.shape)]
    if expected.keys() != got.keys() or bad:
        missing = sorted("/".join(k) for k in expected.keys() - got.keys())[:3]
        raise CheckpointError(f"{path} does not fit {meta['backbone']} with {meta['num_classes']} classes "
                              f"(missing {missing}, wrong shapes {bad[:2]}); it was written by another version?")
    return model, variables, meta
