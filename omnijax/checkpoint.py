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
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

FORMAT = 1
# kind -> (model class, config class), imported lazily so one kind does not pull in the others.
MODEL_KINDS = {
    "wan_dit": ("omnijax.models.wan.dit:WanDiT", "omnijax.models.wan.variants:WanConfig"),
    "wan_vae": ("omnijax.models.wan.vae:WanVAE", "omnijax.models.wan.vae:VAEConfig"),
    "umt5": ("omnijax.models.wan.umt5:UMT5Encoder", "omnijax.models.wan.umt5:UMT5Config"),
    "wan_clip": ("omnijax.models.wan.clip:CLIPVisionTower", "omnijax.models.wan.clip:CLIPVisionConfig"),
    "flux_dit": ("omnijax.models.flux.dit:FluxDiT", "omnijax.models.flux.variants:FluxConfig"),
    "flux_vae": ("omnijax.models.flux.vae:FluxVAE", "omnijax.models.flux.vae:FluxVAEConfig"),
    "t5": ("omnijax.models.wan.umt5:UMT5Encoder", "omnijax.models.wan.umt5:UMT5Config"),
    "clip_l": ("omnijax.models.flux.clip_text:CLIPTextModel", "omnijax.models.flux.clip_text:CLIPTextConfig"),
}


def _import(ref: str):
    mod, _, name = ref.partition(":")
    return getattr(importlib.import_module(mod), name)


def model_classes(kind: str):
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    return tuple(_import(r) for r in MODEL_KINDS[kind])


def save_pretrained(directory: str, model: nnx.Module, kind: str, *, overwrite: bool = False, **meta) -> str:
    """Writes `model`'s parameters and config to `directory` atomically. Returns the directory."""
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True (--overwrite) to replace it")
    model_classes(kind)  # validates the kind
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        state = nnx.state(model, nnx.Param)
        dtypes = {np.dtype(v.dtype).name for v in jax.tree.leaves(state)}
        ocp.PyTreeCheckpointer().save(os.path.join(tmp, "params"), nnx.to_pure_dict(state))
        header = {"format": FORMAT, "kind": kind, "config": model.config.to_dict(),
                  "param_dtypes": sorted(dtypes), **meta}
        with open(os.path.join(tmp, "omnijax.json"), "w") as f:
            json.dump(header, f, indent=1)
        if os.path.exists(directory):
            old = directory + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_header(directory: str) -> dict:
    path = os.path.join(directory, "omnijax.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory} is not an omnijax checkpoint (no omnijax.json); convert PyTorch weights with "
            f"`python launch/convert.py --source ... --out {directory}`")
    with open(path) as f:
        header = json.load(f)
    if header.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported checkpoint format {header.get('format')!r} "
                         f"(this omnijax reads {FORMAT})")
    return header


def load_pretrained(directory: str, *, kind: str | None = None, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                    shardings=None):
    """Restores a model written by `save_pretrained`. Returns (config, model).

    Args:
      kind: expected kind (an error if the directory holds another).
      dtype: compute dtype. param_dtype: storage dtype of the non-f32-island params.
      shardings: optional {param path: jax.sharding.Sharding}; restored arrays land there directly.
    """
    header = read_header(directory)
    if kind is not None and header["kind"] != kind:
        raise ValueError(f"{directory} holds a {header['kind']!r} checkpoint, expected {kind!r}")
    model_cls, config_cls = model_classes(header["kind"])
    config = config_cls.from_dict(header["config"])
    abstract = nnx.eval_shape(lambda: model_cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0)))
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
