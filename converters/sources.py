"""Reading PyTorch-side checkpoints into {key: numpy array} without a float32 detour.

- safetensors (one file, a directory, or a sharded set with an index): parsed directly and memory-mapped,
  so bf16 stays bf16 (as ml_dtypes.bfloat16) and nothing is read until a tensor is used.
- .pth / .pt / .bin pickles: opened only with torch's weights-only loader; a pickle that needs anything
  beyond tensors and plain containers is refused with UnsafeCheckpointError.
- a mapping name -> array (numpy, jax or torch tensors) passes through.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import struct
from collections.abc import Iterator, Mapping

import ml_dtypes
import numpy as np

from omnijax.checkpoint import CheckpointError

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class SourceCheckpointError(CheckpointError):
    """Original (PyTorch-side) weights could not be read."""


class UnsafeCheckpointError(SourceCheckpointError):
    """A pickle checkpoint needs more than torch's weights-only loader allows."""


class SafetensorsFile(Mapping):
    """Lazy, memory-mapped view of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SourceCheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        self.metadata = header.pop("__metadata__", {}) or {}
        self._header = header
        self._offset = 8 + n
        # A cut download or copy: the header promises more bytes than the file holds (else mmap reads fail later
        # with a numpy "buffer is smaller than requested size" that names no file).
        need = self._offset + max((int(v["data_offsets"][1]) for v in header.values()), default=0)
        size = os.path.getsize(path)
        if size < need:
            raise SourceCheckpointError(f"{path}: truncated safetensors file ({size} bytes, its header needs {need})")
        self._mm = None

    def _buffer(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def shape(self, key):
        return tuple(self._header[key]["shape"])

    def __getitem__(self, key) -> np.ndarray:
        info = self._header[key]
        if info["dtype"] not in _ST_DTYPES:
            raise SourceCheckpointError(f"{self.path}: tensor {key!r} has unsupported dtype {info['dtype']}")
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        count = int(np.prod(info["shape"], dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise SourceCheckpointError(f"{self.path}: tensor {key!r} is truncated or corrupt")
        arr = np.frombuffer(self._buffer(), dtype=dtype, count=count, offset=self._offset + start)
        return arr.reshape(info["shape"])

    def __iter__(self) -> Iterator[str]:
        return iter(self._header)

    def __len__(self):
        return len(self._header)


class MergedMapping(Mapping):
    def __init__(self, parts: list[Mapping]):
        self._where = {}
        for p in parts:
            for k in p:
                if k in self._where:
                    raise SourceCheckpointError(f"key {k!r} appears in more than one checkpoint file")
                self._where[k] = p

    def __getitem__(self, key):
        return self._where[key][key]

    def __iter__(self):
        return iter(self._where)

    def __len__(self):
        return len(self._where)


def _to_numpy(x):
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


class _ArrayMapping(Mapping):
    """Wraps a mapping of tensors of any framework, converting each on access."""

    def __init__(self, d: Mapping):
        self._d = d

    def __getitem__(self, key):
        return _to_numpy(self._d[key])

    def __iter__(self):
        return iter(self._d)

    def __len__(self):
        return len(self._d)


def unwrap_state_dict(obj):
    """{"state_dict": weights, ...} -> weights: training checkpoints (and Casper's .pth files) wrap the weights
    this way, and VideoX-Fun's loaders unwrap that key before load_state_dict. Anything else passes through."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        return obj["state_dict"]
    return obj


def load_torch_pickle(path: str) -> Mapping:
    """Weights-only torch.load; refuses pickles that need arbitrary code."""
    import pickle

    import torch

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        # Name only what the pickle needs; torch's own text suggests weights_only=False, the wrong way here.
        found = re.search(r"GLOBAL (\S+)", str(e))
        needs = f" (it needs {found.group(1)})" if found else ""
        raise UnsafeCheckpointError(
            f"{path}: refused: this pickle needs more than tensors and plain containers{needs}, and omnijax only "
            f"opens checkpoints with torch's weights-only loader. Convert it to safetensors in a trusted "
            f"environment.") from e
    except (RuntimeError, OSError, EOFError) as e:
        raise SourceCheckpointError(f"{path}: not a readable torch checkpoint ({e})") from e
    obj = unwrap_state_dict(obj)
    if not isinstance(obj, Mapping):
        raise SourceCheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return _ArrayMapping(obj)


def open_checkpoint(source) -> Mapping:
    """A path (file or directory) or a mapping -> lazy {key: numpy array}."""
    if isinstance(source, Mapping):
        return _ArrayMapping(unwrap_state_dict(source))
    path = os.fspath(source)
    if not os.path.exists(path):
        raise SourceCheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        index = [f for f in os.listdir(path) if f.endswith(".safetensors.index.json")]
        if index:
            with open(os.path.join(path, index[0])) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
            if len(pickles) == 1:
                return load_torch_pickle(os.path.join(path, pickles[0]))
            raise SourceCheckpointError(f"{path}: no .safetensors files (and not exactly one .pth) in this directory")
        return MergedMapping([SafetensorsFile(os.path.join(path, f)) for f in files])
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    if path.endswith(PICKLE_SUFFIXES):
        return load_torch_pickle(path)
    raise SourceCheckpointError(f"{path}: unknown checkpoint format (expected .safetensors, a directory, or .pth)")


def read_config_json(source) -> dict | None:
    """config.json next to (or inside) a checkpoint path, if any."""
    if isinstance(source, Mapping):
        return None
    path = os.fspath(source)
    d = path if os.path.isdir(path) else os.path.dirname(path)
    f = os.path.join(d, "config.json")
    if os.path.isfile(f):
        with open(f) as fh:
            return json.load(fh)
    return None
