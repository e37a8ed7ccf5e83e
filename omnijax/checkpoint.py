"""Converted ("pretrained") model directories: an orbax checkpoint of the parameters plus a JSON header.

Layout of DIR:
  omnijax.json   {"format": 1, "kind": "wan_dit", "config": {...}, "param_dtype": "bfloat16", "source": ...}
  params/        orbax PyTree checkpoint of the nnx.Param state (pure dict, dotted paths as nesting)

`save_pretrained` writes into a temporary sibling directory and renames it into place, so DIR is either
complete or absent. `load_pretrained` restores straight into the model's abstract state, optionally sharded
(pass {param path: Sharding}); no full host copy is needed.

Unsharded loads (no `shardings`, one process) of the layout `save_pretrained` writes (OCDBT) skip orbax's restore:
tensorstore reads the arrays into host memory on its own threads, started before the abstract model is built
(Python) so the two overlap, and the arrays go to the device in a few batched `jax.device_put` calls instead of
one per array (`_HostRead`; a bounded window of reads in flight, so no whole host copy either). The values and
dtypes are orbax's: the same stored bytes, and tensorstore's own cast where the stored dtype differs from the
model's (orbax's read spec casts the same way). Any other layout, and every sharded load, goes through orbax.
"""

from __future__ import annotations

import collections
import importlib
import json
import os
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from flax import nnx

from omnijax.io.atomic import atomic_path
from omnijax.layers.init import InitRngs

FORMAT = 1


class CheckpointError(ValueError):
    """The one checkpoint-error family: a converted model, training state or original weight file cannot be read
    or does not fit its target (omnijax.training.checkpoint and converters raise it or subclasses)."""


class NotACheckpointError(CheckpointError, FileNotFoundError):
    """The path holds no checkpoint of the expected kind."""


def _import(ref: str):
    mod, _, name = ref.partition(":")
    return getattr(importlib.import_module(mod), name)


def _ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def save_pretrained(directory: str, model: nnx.Module, kind: str, *, overwrite: bool = False, **meta) -> str:
    """Writes `model`'s parameters and config to `directory` atomically. Returns the directory."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
    with atomic_path(directory, directory=True) as tmp:
        state = nnx.state(model, nnx.Param)
        dtypes = {np.dtype(v.dtype).name for v in jax.tree.leaves(state)}
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, "params"), nnx.to_pure_dict(state))
        # The classes are named in the header so that a reader needs no table of kinds (converters.registry
        # holds the one table; the library does not import it).
        header = {"format": FORMAT, "kind": kind, "model": _ref(type(model)), "config_class": _ref(type(model.config)),
                  "config": model.config.to_dict(),
                  "param_dtypes": sorted(dtypes), **meta}
        with open(os.path.join(tmp, "omnijax.json"), "w") as f:
            json.dump(header, f, indent=1)
    return directory


def is_pretrained(directory: str) -> bool:
    """Whether `directory` is a converted omnijax checkpoint (written by `save_pretrained`)."""
    return os.path.isdir(directory) and os.path.isfile(os.path.join(directory, "omnijax.json"))


def read_header(directory: str) -> dict:
    path = os.path.join(directory, "omnijax.json")
    if not os.path.isfile(path):
        raise NotACheckpointError(
            f"{directory} is not an omnijax checkpoint (no omnijax.json); convert PyTorch weights with "
            f"`python launch/convert.py --source ... --out {directory}`")
    with open(path) as f:
        header = json.load(f)
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported checkpoint format {header.get('format')!r} "
                         f"(this omnijax reads {FORMAT})")
    return header


def load_pretrained(directory: str, *, kind: str | None = None, model_cls=None, config_cls=None,
                    dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, shardings=None):
    """Restores a model written by `save_pretrained`. Returns (config, model).

    Args:
      kind: expected kind (an error if the directory holds another).
      model_cls, config_cls: the classes to build (default: those named in the header; checkpoints written
        before the header named them need them, see converters.registry.load).
      dtype: compute dtype. param_dtype: storage dtype of the non-f32-island params.
      shardings: optional {param path: jax.sharding.Sharding}, or a function of the abstract model returning
        one; restored arrays are read straight into their shards (orbax). Without it (one process), tensorstore
        reads the arrays into host memory (the first ~1 GiB while the abstract model is built, then a bounded
        window) and they are put on the first device in batches (`_HostRead`); committed to it either way.
    Raises:
      CheckpointError: the checkpoint's arrays do not match the model's parameters (missing or unexpected
        names, other shapes; the error lists them).
    """
    header = read_header(directory)
    if kind is not None and header["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {header['kind']!r} checkpoint, expected {kind!r}")
    if model_cls is None or config_cls is None:
        if "model" not in header:
            raise CheckpointError(f"{directory}: the header names no model class; load it through converters.registry")
        model_cls, config_cls = model_cls or _import(header["model"]), config_cls or _import(header["config_class"])
    config = config_cls.from_dict(header["config"])
    params_dir = os.path.join(directory, "params")
    # Started before the build: tensorstore reads on its own threads while Python builds the abstract model.
    host_read = _HostRead.start(params_dir) if shardings is None and jax.process_count() == 1 else None
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0)))
    if callable(shardings):
        shardings = shardings(abstract)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    pure = nnx.to_pure_dict(params)
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    if host_read is not None:
        targets = {_param_name(path): x for path, x in jax.tree_util.tree_flatten_with_path(pure)[0]}
        arrays = host_read.arrays(targets, default)
        restored = jax.tree_util.tree_map_with_path(lambda path, _: arrays[_param_name(path)], pure)
    else:
        def target(path, x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(shardings or {}).get(_param_name(path), default))

        abstract_tree = jax.tree_util.tree_map_with_path(target, pure)
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_tree)
        restored = ocp.PyTreeCheckpointer().restore(params_dir, args=ocp.args.PyTreeRestore(
            item=abstract_tree, restore_args=restore_args))
    nnx.replace_by_pure_dict(params, restored)
    return config, nnx.merge(graphdef, params, rest)


def _param_name(path) -> str:
    """The dotted parameter path of a pure-dict key path ("blocks.0.ffn.linear_1.kernel"): orbax's array name."""
    return ".".join(str(k.key) for k in path)


# ------------------------------------------------------------------------------------- unsharded restore, batched

_FIRST_READ_BYTES = 1 << 30  # reads issued before the abstract build, which they overlap
_READ_BYTES = 256 << 20  # reads in flight after it: tensorstore's buffers are reused instead of fresh memory each
_PUT_BYTES = 256 << 20  # arrays per jax.device_put call: few calls, yet the first transfers start early
_ALIGN = 64  # jax's CPU backend takes a numpy buffer aligned to 64 bytes without copying it (device_put aliases it)


def _aligned_empty(shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + _ALIGN, np.uint8)
    start = -raw.ctypes.data % _ALIGN
    return raw[start:start + n].view(dtype).reshape(shape)


class _HostRead:
    """All arrays of an orbax PyTree checkpoint read into host memory by tensorstore, for one device.

    `start` opens every array and issues the first ~1 GiB of reads, in the checkpoint's order, into 64-byte-aligned
    buffers of the stored dtype; tensorstore's threads decompress and copy them while the caller builds the
    abstract model (no Python runs per array meanwhile). `arrays` checks the names and shapes against the model's,
    then takes the reads in order, keeping ~256 MiB in flight, casts where the model's dtype differs
    (tensorstore's cast, as orbax's read spec does) and puts the arrays on the device in batches of ~256 MiB, so
    that on an accelerator the transfers run while later arrays are still being read.

    Why bounded: with every read issued at once, tensorstore's buffers were fresh memory (most of the compressed
    checkpoint at once, probably: it reads files faster than it decompresses them). On the 2-core CPU VM, where
    fresh memory's first touch is slow, the 1.3B DiT then took 850-960k page faults and 5.7-6.2 s of system time,
    against 500-700k and mostly 3.4-4.8 s bounded (docs/benchmarks.md, session 9).
    It also bounds the host memory in use. The issuing stays on the caller's thread: a reading thread waiting on
    each read had to win the GIL back from the abstract build after every wait, and was no faster (4.3-8.0 s).

    Only the layout `save_pretrained` writes is read here: OCDBT, zarr or zarr3, every leaf an array. For any
    other (`start` returns None) the caller restores with orbax.
    """

    def __init__(self, directory: str, stores: dict):
        self.directory, self._stores = directory, stores
        self._pending = collections.deque(stores.items())  # not yet issued, in the checkpoint's order
        self._in_flight: collections.deque = collections.deque()  # (name, read future, buffer), in issue order
        self._bytes = 0
        self._issue(_FIRST_READ_BYTES)

    def _issue(self, limit: int):
        """Issues reads in order while fewer than `limit` bytes are in flight (at least one)."""
        while self._pending and (self._bytes < limit or not self._in_flight):
            name, store = self._pending.popleft()
            out = _aligned_empty(store.shape, store.dtype.numpy_dtype)
            self._in_flight.append((name, ts.array(out).write(store), out))
            self._bytes += out.nbytes

    def _next(self):
        """The oldest read once it is done (name, buffer); issues the next ones."""
        name, fut, out = self._in_flight.popleft()
        self._bytes -= out.nbytes
        try:
            fut.result()
        except Exception as e:  # tensorstore's own error types
            raise CheckpointError(f"{self.directory}: cannot read array {name!r}: {e}") from e
        self._issue(_READ_BYTES)
        return name, out

    @classmethod
    def start(cls, directory: str) -> _HostRead | None:
        try:
            with open(os.path.join(directory, "_METADATA")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        leaves = list(meta.get("tree_metadata", {}).values())
        if meta.get("use_ocdbt") is not True or not leaves or any(
                leaf["value_metadata"].get("value_type") not in ("jax.Array", "np.ndarray")
                or leaf["value_metadata"].get("skip_deserialize") for leaf in leaves):
            return None
        names = [".".join(str(k["key"]) for k in leaf["key_metadata"]) for leaf in leaves]
        # What orbax's reader does with the same file: one context (its I/O limit and OCDBT node cache), a missing
        # chunk read as the fill value only where the writer skipped arrays equal to it.
        context = ts.Context({"file_io_concurrency": {"limit": 128},
                              "cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}})
        kvstore = {"driver": "ocdbt", "base": f"file://{os.path.abspath(directory)}/", "cache_pool": "cache_pool#ocdbt"}
        spec = {"driver": "zarr3" if meta.get("use_zarr3") else "zarr", "recheck_cached_data": False,
                "recheck_cached_metadata": False,
                "fill_missing_data_reads": not meta.get("store_array_data_equal_to_fill_value", False)}
        opening = {n: ts.open({**spec, "kvstore": {**kvstore, "path": n}}, context=context, open=True, read=True)
                   for n in names}
        stores = {}
        for n, fut in opening.items():
            try:
                stores[n] = fut.result()
            except Exception as e:  # tensorstore's own error types
                raise CheckpointError(f"{directory}: cannot open array {n!r}: {e}") from e
        return cls(directory, stores)

    def arrays(self, targets: Mapping[str, jax.ShapeDtypeStruct], device) -> dict[str, jax.Array]:
        """{name: array on `device`} for every target {name: ShapeDtypeStruct}; every check runs before any put."""
        missing = sorted(set(targets) - set(self._stores))
        unexpected = sorted(set(self._stores) - set(targets))
        shapes = [f"{n} {tuple(self._stores[n].shape)} (model {tuple(t.shape)})" for n, t in targets.items()
                  if n in self._stores and tuple(self._stores[n].shape) != tuple(t.shape)]
        if missing or unexpected or shapes:
            raise CheckpointError(
                f"{self.directory} does not fit the model: {len(missing)} parameters missing from the checkpoint "
                f"{missing[:10]}, {len(unexpected)} arrays not in the model {unexpected[:10]}, "
                f"{len(shapes)} of another shape {shapes[:10]}")
        out, batch, size = {}, [], 0
        for i in range(len(self._stores)):
            name, x = self._next()
            dtype = np.dtype(targets[name].dtype)
            if x.dtype != dtype:
                x = ts.cast(ts.array(x), ts.dtype(dtype.name)).read().result()
            batch.append((name, x))
            size += x.nbytes
            if size >= _PUT_BYTES or i == len(self._stores) - 1:
                names, xs = zip(*batch)
                out.update(zip(names, jax.device_put(list(xs), device)))
                batch, size = [], 0
        return out
