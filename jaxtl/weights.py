"""Reading PyTorch weight files into numpy, safely and without torch.

* ``.safetensors``: parsed directly (8-byte header length, JSON header, raw data).
* ``.pth`` / ``.pt`` / ``.bin``: PyTorch pickles, in both the zip format (torch
  >= 1.6) and the older sequential format (torchvision's 2018-2019 files, e.g.
  ``mobilenet_v2-b0353104.pth``). They are unpickled with an allow-list, like
  ``torch.load(weights_only=True)``: only ordered dicts, tensors and storages
  may be constructed, so a pickle that asks for anything else (``os.system``,
  ``builtins.eval``, a custom class) is refused before it can run. For formats
  this reader does not parse, ``torch.load(..., weights_only=True)`` is used
  when torch is installed.

Everything returns ``{name: np.ndarray}``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from jaxtl.errors import WeightsError

try:  # shipped with jax
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    _BF16 = None

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
# Upper bound on a single tensor (elements) we accept from a header: a corrupt or
# hostile file must not make us allocate terabytes.
_MAX_TENSOR_ELEMENTS = 2**34

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
if _BF16 is not None:
    _STORAGE_DTYPES["BFloat16Storage"] = _BF16

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
if _BF16 is not None:
    _SAFETENSORS_DTYPES["BF16"] = _BF16


class UnsupportedFormat(Exception):
    """Internal: a well-formed file in a variant this reader does not parse."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_weights_path(path: str | Path) -> Path:
    """The path as a Path, or a WeightsError saying why it cannot be a weights file."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"weights file {path} does not exist; check the path given to --weights-file")
    if path.is_dir():
        raise WeightsError(f"weights path {path} is a directory; pass the .pth/.safetensors file inside it")
    return path


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a weights file into ``{name: array}`` (see the module docstring)."""
    path = check_weights_path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError as e:
        raise WeightsError(f"cannot read weights file {path}: {e.strerror or e}") from None
    if size == 0:
        raise WeightsError(f"weights file {path} is empty (0 bytes); download it again")
    try:
        if path.suffix == ".safetensors" or _looks_like_safetensors(head, size):
            tensors = read_safetensors(path)
        elif head.startswith(b"PK\x03\x04"):
            tensors = _read_torch_zip(path)
        elif head[:1] == b"\x80":
            tensors = _read_torch_legacy(path)
        else:
            raise WeightsError(f"{path} is not a PyTorch or safetensors weights file "
                               f"(unrecognised first bytes {head[:8]!r})")
    except UnsupportedFormat as e:
        tensors = _torch_load_fallback(path, str(e))
    except WeightsError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, ValueError,
            KeyError, IndexError, TypeError, AttributeError, UnicodeDecodeError, OverflowError, MemoryError) as e:
        raise WeightsError(f"weights file {path} is corrupt or truncated ({type(e).__name__}: {_short(e)}); "
                           "download it again") from None
    return unwrap_state_dict(tensors, str(path))


def _short(e: BaseException, n: int = 120) -> str:
    s = str(e).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."


def unwrap_state_dict(obj: Any, where: str = "state dict") -> dict[str, np.ndarray]:
    """Accept the shapes checkpoints come in and return a flat ``{name: array}``.

    Training scripts often save ``{"state_dict": ...}`` or ``{"model": ...}``
    and ``nn.DataParallel`` prefixes every key with ``module.``; both are undone.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{where} holds a {type(obj).__name__}, not a mapping of tensor names to tensors")
    for wrapper in ("state_dict", "model_state_dict", "model", "module", "params"):
        inner = obj.get(wrapper)
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            if not any(_is_array(v) for v in obj.values() if v is not inner):
                obj = inner
                break
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(key, str):
            raise WeightsError(f"{where} has a non-string key {key!r}; expected tensor names")
        arr = to_numpy(value)
        if arr is None:
            raise WeightsError(f"{where}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key] = arr
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module."):]: v for k, v in out.items()}
    return out


def _is_array(v: Any) -> bool:
    return to_numpy(v) is not None


def to_numpy(value: Any) -> np.ndarray | None:
    """A torch tensor, numpy array or jax array as numpy; None for anything else."""
    if isinstance(value, np.ndarray):
        return value
    mod = type(value).__module__
    if mod.startswith("torch"):
        t = value.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import torch

            return t.view(torch.int16).numpy().view(_BF16)
        return t.numpy()
    if mod.startswith("jax") or hasattr(value, "__array__") and hasattr(value, "shape") and hasattr(value, "dtype"):
        return np.asarray(value)
    return None


# ---------------------------------------------------------------------------
# safetensors


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n < size and head[8:9] == b"{"


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    data = path.read_bytes()
    if len(data) < 8:
        raise WeightsError(f"safetensors file {path} is truncated ({len(data)} bytes)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8 or header_len > 100_000_000:
        raise WeightsError(f"safetensors file {path} is corrupt or truncated (header of {header_len} bytes "
                           f"in a {len(data)}-byte file)")
    try:
        header = json.loads(data[8: 8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightsError(f"safetensors file {path} has an unreadable header; download it again") from None
    if not isinstance(header, dict):
        raise WeightsError(f"safetensors file {path} has a malformed header")
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            start, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"safetensors file {path}: tensor {name!r} has an unsupported or malformed entry "
                               f"({str(info)[:80]})") from None
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if any(s < 0 for s in shape) or numel > _MAX_TENSOR_ELEMENTS or end - start != numel * dtype.itemsize \
                or start < 0 or base + end > len(data):
            raise WeightsError(f"safetensors file {path} is corrupt or truncated at tensor {name!r}; download it again")
        out[name] = np.frombuffer(data, dtype=dtype, count=numel, offset=base + start).reshape(shape).copy()
    return out


# ---------------------------------------------------------------------------
# PyTorch pickles with an allow-list


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage placeholder; ``data`` (bytes) is filled in when it is read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        if numel < 0 or numel > _MAX_TENSOR_ELEMENTS:
            raise WeightsError(f"storage {key} claims {numel} elements; the file is corrupt")
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: bytes | None = None


class _TensorRef:
    """A tensor described by the pickle; materialised once storages are read."""

    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset = storage, int(offset)
        self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)

    def materialise(self) -> np.ndarray:
        st = self.storage
        if st.data is None:
            raise WeightsError(f"storage {st.key} has no data; the file is truncated")
        flat = np.frombuffer(st.data, dtype=st.dtype, count=st.numel)
        if any(s == 0 for s in self.size):
            return np.zeros(self.size, st.dtype)
        if len(self.size) != len(self.stride) or any(s < 0 for s in self.stride):
            raise WeightsError("a tensor has an invalid stride; the file is corrupt")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if self.offset < 0 or last >= st.numel:
            raise WeightsError("a tensor reaches past its storage; the file is corrupt or truncated")
        item = st.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=tuple(s * item for s in self.stride), writeable=False)
        return np.array(view)


class _ParameterMarker:  # stands for torch.nn.Parameter / torch.Tensor in _rebuild_from_type_v2
    pass


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    if not isinstance(storage, _Storage):
        raise WeightsError("a tensor refers to something that is not a storage; the file is corrupt")
    return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *rest):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    return func(*args)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch.nn.parameter", "Parameter"): _ParameterMarker,
    ("torch", "Tensor"): _ParameterMarker,
}


class _AllowListUnpickler(pickle.Unpickler):
    def __init__(self, file, path: Path, persistent: Callable[[tuple], Any]):
        super().__init__(file, encoding="utf-8")
        self._path = path
        self._persistent = persistent

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name.endswith("Storage"):
            raise UnsupportedFormat(f"storage type torch.{name}")
        raise WeightsError(
            f"refused to load {self._path}: its pickle asks for {module}.{name}, which is not a tensor type "
            "(such a file can run code when loaded); only load weights from sources you trust, "
            "or convert them to .safetensors")

    def persistent_load(self, pid):
        return self._persistent(pid)


def _storage_from_pid(pid, storages: dict[str, _Storage]) -> _Storage:
    if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
        raise WeightsError(f"unexpected persistent id {str(pid)[:60]}; the file is corrupt")
    storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], int(pid[4])
    if not isinstance(storage_type, _StorageType):
        raise WeightsError("a storage without a known type; the file is corrupt")
    st = storages.get(key)
    if st is None:
        st = storages[key] = _Storage(key, storage_type.dtype, numel)
    if len(pid) > 5 and pid[5] is not None:  # legacy view of a storage
        raise UnsupportedFormat("storage views")
    return st


def _materialise(obj: Any) -> Any:
    if isinstance(obj, _TensorRef):
        return obj.materialise()
    if isinstance(obj, Mapping):
        return {k: _materialise(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def _read_torch_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkls = sorted((n for n in names if n.endswith("data.pkl")), key=len)
        if not pkls:
            if any(n.endswith("constants.pkl") for n in names):
                raise WeightsError(f"{path} is a TorchScript archive, not a state dict; "
                                   "save model.state_dict() with torch.save instead")
            raise WeightsError(f"{path} is a zip file without data.pkl: not a PyTorch checkpoint")
        prefix = pkls[0][: -len("data.pkl")]
        big_endian = False
        if prefix + "byteorder" in names:
            big_endian = zf.read(prefix + "byteorder").strip() == b"big"
        storages: dict[str, _Storage] = {}
        with zf.open(pkls[0]) as fh:
            obj = _AllowListUnpickler(io.BytesIO(fh.read()), path, lambda pid: _storage_from_pid(pid, storages)).load()
        for key, st in storages.items():
            try:
                data = zf.read(f"{prefix}data/{key}")
            except KeyError:
                raise WeightsError(f"{path} is missing tensor data record {key}; the file is corrupt or truncated") \
                    from None
            need = st.numel * st.dtype.itemsize
            if len(data) < need:
                raise WeightsError(f"{path}: tensor data record {key} has {len(data)} bytes, needs {need}; "
                                   "the file is truncated")
            if big_endian and st.dtype.itemsize > 1:
                data = np.frombuffer(data, st.dtype.newbyteorder(">"), st.numel).astype(st.dtype).tobytes()
            st.data = data
    return _materialise(obj)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _read_torch_legacy(path: Path) -> Any:
    with open(path, "rb") as fh:
        raw = fh.read()
    f = io.BytesIO(raw)

    def plain_load():
        return _AllowListUnpickler(f, path, lambda pid: (_ for _ in ()).throw(
            WeightsError(f"{path}: unexpected storage reference in a header pickle; the file is corrupt"))).load()

    magic = plain_load()
    if magic != _LEGACY_MAGIC:
        raise WeightsError(f"{path} starts like a pickle but is not a PyTorch file (no magic number)")
    protocol = plain_load()
    if protocol != 1001:
        raise UnsupportedFormat(f"legacy protocol {protocol}")
    sys_info = plain_load()
    if isinstance(sys_info, Mapping) and not sys_info.get("little_endian", True):
        raise UnsupportedFormat("big-endian legacy file")
    storages: dict[str, _Storage] = {}
    obj = _AllowListUnpickler(f, path, lambda pid: _storage_from_pid(pid, storages)).load()
    keys = plain_load()
    if not isinstance(keys, list):
        raise WeightsError(f"{path}: storage list missing; the file is corrupt")
    for key in keys:
        st = storages.get(str(key))
        if st is None:
            raise WeightsError(f"{path}: data for unknown storage {key}; the file is corrupt")
        header = f.read(8)
        if len(header) < 8:
            raise WeightsError(f"{path} is truncated (storage {key} missing)")
        (numel,) = struct.unpack("<q", header)
        if numel != st.numel:
            raise WeightsError(f"{path}: storage {key} has {numel} elements, the pickle said {st.numel}; "
                               "the file is corrupt")
        nbytes = numel * st.dtype.itemsize
        data = f.read(nbytes)
        if len(data) < nbytes:
            raise WeightsError(f"{path} is truncated (storage {key} has {len(data)} of {nbytes} bytes)")
        st.data = data
    return _materialise(obj)


def _torch_load_fallback(path: Path, why: str) -> Any:
    try:
        import torch
    except ImportError:
        raise WeightsError(f"{path} uses a PyTorch format jaxtl reads only through torch ({why}); "
                           "install the extra: pip install 'jaxtl[torch]'") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"refused to load {path}: torch.load(weights_only=True) rejected it "
                           f"({_short(e, 160)})") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError for most corruption
        raise WeightsError(f"weights file {path} could not be read ({type(e).__name__}: {_short(e)})") from None
