"""Optimizer from a config: gradient clipping by global norm, then AdamW on a warmup + constant/cosine schedule.

Config fields (top-level vocabulary of shared/CONVENTIONS.md; defaults next to the code):
  lr              peak learning rate (required).
  wd              decoupled weight decay, multiplied by the current lr as torch.optim.AdamW does (0.0).
  grad_clip_norm  clip the global gradient norm to this before AdamW (None/0: off).
  total_steps     length of the schedule (needed for cosine).
  schedule        dict(warmup_steps=0, decay_type="constant"|"cosine", end_factor=0.0 (cosine floor as a
                  fraction of lr), warmup_init=0.0 (first step's lr as a fraction of lr)).
  optax           dict(b1=0.9, b2=0.999, eps=1e-8) passed to optax.adamw.
The paper's experts: lr 1e-3, AdamW, 8000 steps (easyomnimatte.md §3).
"""

from __future__ import annotations

from collections.abc import Mapping

import optax


def _get(config, key, default=None):
    if isinstance(config, Mapping):
        return config.get(key, default)
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def make_schedule(config) -> optax.Schedule:
    """lr(step): linear warmup from warmup_init·lr to lr over warmup_steps, then constant or cosine to end_factor·lr."""
    lr = _get(config, "lr")
    if lr is None:
        raise ValueError("optimizer config needs 'lr'")
    sched = dict(_get(config, "schedule", None) or {})
    unknown = set(sched) - {"warmup_steps", "decay_type", "end_factor", "warmup_init"}
    if unknown:
        raise ValueError(f"unknown schedule fields {sorted(unknown)}")
    warmup = int(sched.get("warmup_steps", 0))
    decay = sched.get("decay_type", "constant")
    total = _get(config, "total_steps")
    init = float(sched.get("warmup_init", 0.0)) * lr
    if decay == "constant":
        main = optax.constant_schedule(lr)
    elif decay == "cosine":
        if total is None or int(total) <= warmup:
            raise ValueError(f"a cosine schedule needs total_steps > warmup_steps ({total} vs {warmup})")
        main = optax.cosine_decay_schedule(lr, int(total) - warmup, alpha=float(sched.get("end_factor", 0.0)))
    else:
        raise ValueError(f"unknown schedule decay_type {decay!r}; choose 'constant' or 'cosine'")
    if warmup <= 0:
        return main
    # As diffusers' constant_with_warmup: step 0 runs at warmup_init·lr (0 by default), step `warmup` at lr.
    ramp = optax.linear_schedule(init, lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns (tx, schedule) built from the config fields described in the module docstring."""
    schedule = make_schedule(config)
    adam = dict(_get(config, "optax", None) or {})
    unknown = set(adam) - {"b1", "b2", "eps", "eps_root"}
    if unknown:
        raise ValueError(f"unknown optax (adamw) fields {sorted(unknown)}")
    parts = []
    clip = _get(config, "grad_clip_norm", None)
    if clip:
        parts.append(optax.clip_by_global_norm(float(clip)))
    parts.append(optax.adamw(schedule, weight_decay=float(_get(config, "wd", 0.0) or 0.0), **adam))
    return optax.chain(*parts), schedule
