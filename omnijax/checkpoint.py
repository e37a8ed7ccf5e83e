"""Converted ("pretrained") model directories: an orbax checkpoint of the parameters plus a JSON header.

Layout of DIR:
  omnijax.json   {"format": 1, "kind": "wan_dit", "config": {...}, "param_dtype": "bfloat16", "source": ...}
  params/        orbax PyTree checkpoint of the nnx.Param state (pure dict, dotted paths as nesting)

`save_pretrained` writes into a temporary sibling directory and renames it into place, so DIR is either
complete or absent. `load_pretrained` restores straight into the model's abstract state, optionally sharded
(pass {param path: Sharding}); no full host copy is needed.
"""

from __future__ import annotations

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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
        one; restored arrays are read straight into their shards.
    """
    header = read_header(directory)
    if kind is not None and header["kind"] != kind:
        raise CheckpointError(f"{directory} holds a {header['kind']!r} checkpoint, expected {kind!r}")
    if model_cls is None or config_cls is None:
        if "model" not in header:
            raise CheckpointError(f"{directory}: the header names no model class; load it through converters.registry")
        model_cls, config_cls = model_cls or _import(header["model"]), config_cls or _import(header["config_class"])
    config = config_cls.from_dict(header["config"])
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=InitRngs(0)))
    if callable(shardings):
        shardings = shardings(abstract)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def target(path, x):
        key = ".".join(str(k.key) for k in path)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=(shardings or {}).get(key, default))

    abstract_tree = jax.tree_util.tree_map_with_path(target, nnx.to_pure_dict(params))
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_tree)
    restored = ocp.PyTreeCheckpointer().restore(os.path.join(directory, "params"),
                                                args=ocp.args.PyTreeRestore(item=abstract_tree,
                                                                            restore_args=restore_args))
    nnx.replace_by_pure_dict(params, restored)
    return config, nnx.merge(graphdef, params, rest)
