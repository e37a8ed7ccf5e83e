"""PyTorch -> Flax weight conversion: one engine (engine.py), one key table per model (tables/).

Public loaders (DESIGN.md): load_wan_dit, load_wan_vae, load_umt5, load_wan_clip, load_flux_dit, load_flux_vae,
load_t5 (T5 v1.1), load_clip_text (CLIP-L text). Each takes a path or a mapping name -> array and returns
(config, model). Imports are lazy so that one model's loader does not
pull in the others.
"""

from converters.engine import ConversionError
from converters.sources import CheckpointError, UnsafeCheckpointError

_LOADERS = {
    "load_wan_dit": "converters.wan_dit",
    "load_wan_vae": "converters.wan_vae",
    "load_umt5": "converters.umt5",
    "load_wan_clip": "converters.clip",
    "load_flux_dit": "converters.flux_dit",
    "load_flux_vae": "converters.flux_vae",
    "load_t5": "converters.umt5",
    "load_clip_text": "converters.clip_text",
}

__all__ = ["ConversionError", "CheckpointError", "UnsafeCheckpointError", *_LOADERS]


def __getattr__(name):
    if name in _LOADERS:
        import importlib

        return getattr(importlib.import_module(_LOADERS[name]), name)
    raise AttributeError(name)
