"""Builders shared by the expert configs (big_vision style: one file per job, no copies).

Colon-args (`configs/effect_expert.py:base=wan21_14b,frames=33,runlocal`) move several fields at once:
  base      wan21_1_3b (default) | wan21_14b   which Casper base, i.e. Wan2.1-Fun-InP size (dims, K, mesh)
            | small                            the from-scratch learning check (benchmarks/learn_omnimatte.py):
                                               the "small-inp" DiT pretrained by configs/inpaint_base.py, the
                                               procedural clips, one device, f32, minutes of steps
  res       480 (default; small: 128x128) | 720 | WxH   training resolution (height; 480p is 832 wide)
  frames    81 (default; small: 17)            pixel frames per clip (4k+1)
  runlocal  (flag)                             tiny random models, procedural data, CPU, a few steps
Everything else is `--config.key=value`.

Training data: outside runlocal the composites are made from real clips, `--config.input.fg_dir` (VideoMatte240K
layout, fgr/ + pha/) and `--config.input.bg_dir` (background videos), and the trainer stops with one line when they
are missing. The built-in procedural clips (toy data: moving shapes) are used only when asked for by name,
`--config.input.source=procedural`, or with `runlocal`.
"""

from __future__ import annotations

import ml_collections

BASES = {
    # remat per expert: blocks recomputed in the backward pass, chosen from measurements at 81x480x832 on one
    # H100 80GB (docs/benchmarks.md): the Effect Expert fits without (34 GB peak); the Quality Expert recomputing
    # its first 10 blocks peaks at 60 GB and is 13 % faster than recomputing all 30. 14B: everything.
    "wan21_1_3b": dict(variant="1.3b-inp", mesh=dict(data=-1, fsdp=1, context=1, tensor=1),
                       remat=dict(effect=0, quality=10)),
    "wan21_14b": dict(variant="14b-inp", mesh=dict(data=1, fsdp=-1, context=1, tensor=1),
                      remat=dict(effect=-1, quality=-1)),
    # 10 M parameters at 17x128x128 (320 tokens per set): nothing to recompute, one device.
    "small": dict(variant="small-inp", mesh=dict(data=1, fsdp=1, context=1, tensor=1),
                  remat=dict(effect=0, quality=0), res="128x128", frames=17),
}
RESOLUTIONS = {"480": (480, 832), "720": (720, 1280)}


def override(config, overrides: dict):
    """Sets {dotted key: value} in `config` ("input.frames": 17); a key the config lacks is a KeyError. Returns it."""
    for key, value in overrides.items():
        node, (*path, leaf) = config, key.split(".")
        for part in path:
            node = node[part]
        if leaf not in node:
            raise KeyError(f"the config has no field {key}")
        node[leaf] = value
    return config


def parse_arg(arg: str | None) -> dict:
    out = dict(base="wan21_1_3b", res=None, frames=None, runlocal=False)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config arg {key!r}; known: {', '.join(out)}")
        out[key] = True if key == "runlocal" and not value else (int(value) if key == "frames" else value)
    if out["base"] not in BASES:
        raise ValueError(f"base must be one of {list(BASES)}, got {out['base']!r}")
    out["res"] = out["res"] or BASES[out["base"]].get("res", "480")
    out["frames"] = out["frames"] or BASES[out["base"]].get("frames", 81)
    return out


def small_base(c, *, steps: int, batch_size: int = 4) -> None:
    """The settings every `base=small` job shares (the learning check; benchmarks/learn_omnimatte.py): procedural
    clips made on the host by 8 threads, f32 (the model is small; no precision question), no previews (the
    benchmark evaluates held-out clips itself), omnijax-format exports only, `steps` steps."""
    c.input.update(source="procedural", batch_size=batch_size, num_threads=8)
    c.model.update(dtype="f32", attention="auto")
    c.schedule.warmup_steps = min(100, max(1, steps // 20))
    c.total_steps, c.log_steps, c.ckpt_steps, c.keep_ckpt = steps, 10, 500, 1
    c.evals.update(preview_steps=10**9, export_formats=("omnijax",))


def _resolution(res: str) -> tuple[int, int]:
    if res in RESOLUTIONS:
        return RESOLUTIONS[res]
    w, _, h = res.partition("x")
    return int(h), int(w)


def expert_config(expert: str, arg: str | None) -> ml_collections.ConfigDict:
    """The full training config of one expert ("effect" or "quality")."""
    a = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.task = "omnimatte"  # tasks/omnimatte.py; a TASKS key or a dotted module path (tasks/__init__.py)
    c.seed = 0
    height, width = _resolution(a["res"])
    # latent_cache: a folder written by launch/cache_latents.py; training then reads VAE posteriors from it and
    # never runs the VAE encoder ("" = encode the pixel composites every step). vae_sample: x0 latents are a
    # fresh posterior sample per step (the reference's `.sample()`), False: the posterior mean.
    # source: "videomatte" (fg_dir + bg_dir, both required) or "procedural" (toy data, only by name; runlocal).
    # num_threads: reader threads; num_workers: worker processes making composites (grain, spawned), for hosts whose
    # threads cannot keep up (the composites are numpy/scipy work that mostly holds the GIL).
    c.input = dict(source="videomatte", batch_size=1, frames=a["frames"], height=height, width=width,
                   num_threads=4, num_workers=0, fg_dir="", bg_dir="", conditioning_cache="", latent_cache="",
                   vae_sample=True)
    # remat: trainable blocks that recompute their forward in the backward pass (-1 all, 0 none, n the first n
    # adapted ones); see EasyOmnimatte.__call__. Lower it for shorter clips, raise it if the step runs out of memory.
    # context_method: how the branch self-attention splits tokens over a mesh "context" axis > 1 (auto | ulysses |
    # ring, omnijax.parallel.context); fixed when the model is built.
    c.model = dict(variant=BASES[a["base"]]["variant"], dtype="bf16", remat=BASES[a["base"]]["remat"][expert],
                   attention="auto", context_method="auto")
    # Weights (converters.registry.load): a converted folder (python launch/convert.py ...), the original files, or
    # "tiny" (random weights; the DiT is then a random model.variant). The same names as the CLIs' flags.
    c.model_init = dict(dit="", vae="", umt5="", clip="", tokenizer="")
    c.lora = dict(rank=128 if expert == "effect" else 64, alpha=128.0 if expert == "effect" else 64.0,
                  targets=("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"), param_dtype="f32")
    # name: a row of omnijax.omnimatte.experts.EXPERT_KINDS (its attention mask and adapted blocks follow from it).
    # K = number of last blocks the Effect Expert adapts: 0 = round(num_layers / 3); or `analysis`, a JSON written
    # by launch/analyze_blocks.py (set one of the two).
    c.expert = dict(name=expert, k=0, analysis="")
    c.schedule = dict(warmup_steps=100, decay_type="constant")
    c.optax = dict(b1=0.9, b2=0.999, eps=1e-8)
    c.lr = 1e-3
    c.wd = 1e-2
    c.grad_clip_norm = 1.0
    c.loss = dict(shift=5.0, max_abs_error=50.0, nonfinite_patience=1)
    c.mesh = dict(BASES[a["base"]]["mesh"])
    c.sharding_rules = "fsdp"
    c.total_steps = 8000
    c.log_steps = 10
    c.ckpt_steps = 500
    c.keep_ckpt = 3
    c.evals = dict(preview_steps=1000, export_formats=("omnijax", "kohya", "peft", "comfy"))
    # The preview's sampler (the expert being trained stands in for both experts there).
    c.sampler = dict(steps=4, tau=0.5)
    if a["base"] == "small":
        small_base(c, steps=1500)
    if a["runlocal"]:
        c.input.update(source="procedural", batch_size=1, frames=9, height=64, width=64, num_threads=0, num_workers=0)
        c.model.update(variant="tiny-inp", dtype="f32", remat=0, attention="xla")
        c.model_init = dict(dit="tiny", vae="tiny", umt5="tiny", clip="tiny", tokenizer="tiny")
        c.lora.update(rank=4, alpha=4.0)
        c.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
        c.schedule.warmup_steps = 2
        c.total_steps, c.log_steps, c.ckpt_steps = 4, 1, 2
        c.evals.update(preview_steps=4)
        c.sampler.steps = 2
    return c
