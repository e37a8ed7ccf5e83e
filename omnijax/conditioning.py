"""A disk cache of conditioning embeddings: umT5 prompt embeddings and first-frame CLIP features.

Each entry is one safetensors file holding a tensor "embedding" ([L, D] text rows cut to the prompt's true
token count, or [L, D] CLIP tokens of one frame), named by a SHA-256 content hash of
(kind, encoder identity, input). The encoder identity covers its class, config and a fingerprint of its
weights, so a different checkpoint or size never reads another's entries. Files are written to a
temporary name and renamed, so readers never see half an entry and concurrent writers are harmless.

Layout: DIR/{text,image}/ab/abcdef....safetensors. The trainer and the decompose CLI use `Conditioner`
(or `EmbeddingCache.get_or_compute`) to read what is cached and compute what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from omnijax.io.atomic import atomic_path, atomic_write

KINDS = ("text", "image")
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CacheError(ValueError):
    """A cache entry could not be read or written."""


# ---------------------------------------------------------------------------------------------------------
# Minimal safetensors I/O (one or a few float tensors + string metadata).

def write_safetensors(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None):
    """Writes `tensors` to `path` atomically (omnijax.io.atomic: a temporary sibling, then rename)."""
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise CacheError(f"cannot store {name!r} of dtype {arr.dtype}; supported: {sorted(_DTYPES)}")
        blob = arr.tobytes()
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format aligns the data section to 8 bytes
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for blob in blobs:
            f.write(blob)
        f.flush()
        os.fsync(f.fileno())


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a safetensors file written by `write_safetensors` (or any float one)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        metadata = header.pop("__metadata__", {}) or {}
        out = {}
        for name, info in header.items():
            dtype = np.dtype(_DTYPES[info["dtype"]])
            start, end = info["data_offsets"]
            count = int(np.prod(info["shape"], dtype=np.int64))
            if end - start != count * dtype.itemsize or 8 + n + end > len(data):
                raise CacheError(f"tensor {name!r} is truncated")
            out[name] = np.frombuffer(data, dtype, count, 8 + n + start).reshape(info["shape"]).copy()
        return out, metadata
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
        raise CacheError(f"{path}: unreadable cache entry ({e})") from e


# ---------------------------------------------------------------------------------------------------------
# Encoder identity.

def params_fingerprint(model: nnx.Module, samples: int = 256) -> str:
    """SHA-256 over every parameter's path, shape, dtype and `samples` evenly strided values.

    Exact values are hashed (no sums), so the fingerprint is the same on every device; reading a few
    values per tensor keeps it cheap for multi-GB models.
    """
    state = nnx.state(model, nnx.Param)
    flat = sorted(((".".join(map(str, p)), v.get_value()) for p, v in nnx.to_flat_state(state)), key=lambda t: t[0])

    def strided(x):
        flat_x = x.reshape(-1)
        return flat_x[:: max(1, flat_x.size // samples)][:samples]

    picked = jax.jit(lambda xs: [strided(x) for x in xs])([x for _, x in flat])
    h = hashlib.sha256()
    for (path, x), s in zip(flat, picked):
        h.update(f"{path}:{tuple(x.shape)}:{jnp.dtype(x.dtype).name};".encode())
        h.update(np.asarray(jax.device_get(s)).tobytes())
    return h.hexdigest()


def encoder_identity(model: nnx.Module, extra: Mapping | None = None) -> str:
    """A stable id for an encoder: class name, config (to_dict), compute dtype, weights fingerprint, `extra`."""
    config = getattr(model, "config", None)
    desc = {
        "class": type(model).__name__,
        "config": config.to_dict() if hasattr(config, "to_dict") else repr(config),
        "dtype": jnp.dtype(getattr(model, "dtype", jnp.float32)).name,
        "params": params_fingerprint(model),
        "extra": dict(extra or {}),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of a tokenizer's class, vocabulary and special tokens ("" for None): prompts map to ids by it."""
    if tokenizer is None:
        return ""
    desc = {"class": type(tokenizer).__name__, "vocab": sorted(tokenizer.get_vocab().items()),
            "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", [])))}
    return hashlib.sha256(json.dumps(desc, ensure_ascii=False).encode()).hexdigest()


def _frame_bytes(frame: np.ndarray) -> bytes:
    frame = np.ascontiguousarray(frame)
    return f"{frame.dtype.str}{frame.shape}".encode() + frame.tobytes()


# ---------------------------------------------------------------------------------------------------------

class EmbeddingCache:
    """Content-addressed store of embeddings under `directory` (created on first write)."""

    def __init__(self, directory: str):
        self.directory = os.fspath(directory)

    @staticmethod
    def key(kind: str, content: bytes, encoder_id: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown cache kind {kind!r}; choose one of {KINDS}")
        h = hashlib.sha256()
        for part in (kind.encode(), encoder_id.encode(), content):
            h.update(len(part).to_bytes(8, "little") + part)  # length-prefixed: no ambiguous concatenations
        return h.hexdigest()

    def path(self, kind: str, key: str) -> str:
        return os.path.join(self.directory, kind, key[:2], f"{key}.safetensors")

    def load(self, kind: str, key: str) -> np.ndarray | None:
        """The cached array, or None when absent or unreadable (a broken entry is recomputed, then replaced)."""
        path = self.path(kind, key)
        if not os.path.isfile(path):
            return None
        try:
            tensors, _ = read_safetensors(path)
        except CacheError:
            return None
        return tensors.get("embedding")

    def store(self, kind: str, key: str, array, metadata: Mapping[str, str] | None = None) -> str:
        path = self.path(kind, key)
        write_safetensors(path, {"embedding": np.asarray(array)}, {"kind": kind, **(metadata or {})})
        return path

    def get_or_compute(self, kind: str, content: bytes, encoder_id: str, compute: Callable[[], np.ndarray],
                       metadata: Mapping[str, str] | None = None) -> np.ndarray:
        """The cached entry for (kind, content, encoder_id), or compute() stored under it."""
        key = self.key(kind, content, encoder_id)
        hit = self.load(kind, key)
        if hit is not None:
            return hit
        value = np.asarray(compute())
        self.store(kind, key, value, metadata)
        return value

    def get_or_compute_many(self, kind: str, contents: Sequence[bytes], encoder_id: str,
                            compute: Callable[[list[int]], Sequence[np.ndarray]],
                            metadata: Callable[[int], Mapping[str, str]] | None = None) -> list[np.ndarray]:
        """Batched form: compute(indices) runs once on the missing, de-duplicated inputs (in order)."""
        keys = [self.key(kind, c, encoder_id) for c in contents]
        found = {k: self.load(kind, k) for k in dict.fromkeys(keys)}
        first = {}
        for i, k in enumerate(keys):
            if found[k] is None:
                first.setdefault(k, i)
        if first:
            todo = list(first.values())
            values = compute(todo)
            if len(values) != len(todo):
                raise CacheError(f"compute returned {len(values)} arrays for {len(todo)} inputs")
            for i, v in zip(todo, values):
                found[keys[i]] = np.asarray(v)
                self.store(kind, keys[i], v, metadata(i) if metadata else None)
        return [found[k] for k in keys]


@dataclasses.dataclass
class Conditioner:
    """Prompt embeddings and CLIP features through an (optional) EmbeddingCache.

    Args:
      cache: an EmbeddingCache, or None to always compute.
      text_encoder, tokenizer: a UMT5Encoder and a transformers tokenizer (needed only for cache misses).
      image_encoder: a CLIPVisionTower (needed only for cache misses).
      max_length: the token budget (Wan: 512).
    """

    cache: EmbeddingCache | None = None
    text_encoder: nnx.Module | None = None
    tokenizer: object = None
    image_encoder: nnx.Module | None = None
    max_length: int = 512
    batch_size: int = 8
    text_id: str | None = None
    image_id: str | None = None

    def _id(self, which: str) -> str:
        model = self.text_encoder if which == "text" else self.image_encoder
        attr = f"{which}_id"
        if getattr(self, attr) is None:
            if model is None:
                raise ValueError(f"no {which} encoder given (needed for its identity and for cache misses)")
            extra = {"max_length": self.max_length, "tokenizer": tokenizer_fingerprint(self.tokenizer)} \
                if which == "text" else None
            setattr(self, attr, encoder_identity(model, extra))
        return getattr(self, attr)

    def text(self, prompts: Sequence[str]) -> list[np.ndarray]:
        """[L_i, D] embeddings per prompt (true token count incl. EOS); the empty prompt is one shared entry."""
        from omnijax.models.wan.umt5 import encode_prompts

        prompts = list(prompts)
        if any(not isinstance(p, str) for p in prompts):
            raise TypeError("prompts must be strings")

        def compute(idx):
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("prompt embeddings are not cached and no text encoder/tokenizer was given")
            return encode_prompts(self.text_encoder, self.tokenizer, [prompts[i] for i in idx], self.max_length,
                                  batch_size=self.batch_size)

        if self.cache is None:
            return compute(list(range(len(prompts))))
        return self.cache.get_or_compute_many("text", [p.encode() for p in prompts], self._id("text"), compute,
                                              lambda i: {"prompt": prompts[i]})

    def image(self, frames) -> np.ndarray:
        """CLIP features [B, L, D] of frames [B, H, W, 3] in [-1, 1] (Wan: the first frame of each clip)."""
        from omnijax.models.wan.clip import encode_frames

        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [B, H, W, 3] in [-1, 1], got shape {list(frames.shape)}")

        def compute(idx):
            if self.image_encoder is None:
                raise ValueError("CLIP features are not cached and no image encoder was given")
            return list(encode_frames(self.image_encoder, frames[np.asarray(idx)]))

        if self.cache is None:
            return np.stack(compute(list(range(len(frames)))))
        return np.stack(self.cache.get_or_compute_many("image", [_frame_bytes(f) for f in frames], self._id("image"),
                                                       compute))


ENCODERS_FILE = "encoders.json"  # in a cache folder: the identities of the encoders that filled it


def source_stamp(path: str) -> list:
    """What identifies a weights source without reading it: every file's path, size, mtime and inode."""
    path = os.path.realpath(path)
    files = [path] if os.path.isfile(path) else sorted(os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs)
    return [(f, st.st_size, st.st_mtime_ns, st.st_ino) for f in files for st in [os.stat(f)]]


def umt5_sources(umt5: str, tokenizer: str, dtype: str) -> list:
    """The identity of a umT5 encoder loaded from these files in this dtype (`text_alias_path`'s `sources`)."""
    return [source_stamp(umt5), source_stamp(tokenizer), dtype]


def text_alias_path(cache: str, sources) -> str:
    """Where, in the embedding cache folder `cache`, the umT5 identity (`Conditioner.text_id`) of these exact
    sources is remembered, so that a later run whose prompt embedding is cached never loads umT5 (22 GB at full
    size) nor its tokenizer. `sources`: `umt5_sources(...)`, or any JSON-able identity (a tiny model's seed)."""
    key = hashlib.sha256(json.dumps(sources, default=str).encode()).hexdigest()
    return os.path.join(cache, "sources", f"umt5-{key}.json")


def remember_text_id(cache: str, sources, text_id: str) -> None:
    """Records `text_id` as the identity of `sources` (see `text_alias_path`)."""
    atomic_write(text_alias_path(cache, sources), json.dumps({"text_id": text_id}))


def cached_text_id(cache: str, sources, prompt: str) -> str | None:
    """The umT5 identity of `sources` when both it and `prompt`'s embedding are already cached, else None."""
    try:
        with open(text_alias_path(cache, sources)) as f:
            text_id = json.load(f)["text_id"]
    except (TypeError, OSError, ValueError, KeyError):
        return None
    emb = EmbeddingCache(cache)
    return text_id if emb.load("text", emb.key("text", prompt.encode(), text_id)) is not None else None


def fill_cache(cond: Conditioner, prompts: Sequence[str] = (), frame_files: Sequence[str] = (), *,
               text_source: str = "", image_source: str = "", progress: bool = True) -> dict:
    """Encodes `prompts` (in batches of cond.batch_size) and the first frame of each image or video file into
    cond's cache, skipping cached entries, then records the encoders' identities in DIR/encoders.json (merged with
    what the file holds), so that a reader without the models (Conditioner(text_id=..., image_id=...)) finds the
    entries. `text_source` / `image_source` are recorded beside the identities. Returns that record."""
    from tqdm.auto import tqdm

    from omnijax.io.video import read_video

    if cond.cache is None:
        raise ValueError("fill_cache needs a Conditioner with a cache")
    for start in tqdm(range(0, len(prompts), cond.batch_size), desc="prompts", unit="batch", disable=not progress):
        cond.text(list(prompts[start:start + cond.batch_size]))
    for path in tqdm(frame_files, desc="first frames", unit="frame", disable=not progress):
        frame = read_video(path, max_frames=1)[0][:1]  # uint8 [1, H, W, 3]; images too
        cond.image(frame.astype(np.float32) / 127.5 - 1.0)
    ids_path = os.path.join(cond.cache.directory, ENCODERS_FILE)
    ids = {}
    if os.path.isfile(ids_path):
        with open(ids_path) as f:
            ids = json.load(f)
    if prompts:
        ids["text"] = {"id": cond.text_id, "source": text_source, "max_length": cond.max_length,
                       "config": cond.text_encoder.config.to_dict()}
    if frame_files:
        ids["image"] = {"id": cond.image_id, "source": image_source, "config": cond.image_encoder.config.to_dict()}
    atomic_write(ids_path, json.dumps(ids, indent=1))
    return ids
