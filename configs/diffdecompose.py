"""DiffDecompose (Flux.1 + LoRA r128, In-Context Decomposition with LPEC), trained by launch/train.py.

    python launch/preview_layers.py --out sheet.png                       # look at the training data
    python launch/train.py --config configs/diffdecompose.py:runlocal --workdir /tmp/dd       # tiny, CPU
    python launch/train.py --config configs/diffdecompose.py --workdir runs/dd \
        --config.model_init.dit=/ckpt/flux1-dev.safetensors --config.model_init.vae=/ckpt/ae.safetensors \
        --config.model_init.t5=/ckpt/t5 --config.model_init.t5_tokenizer=/ckpt/t5_tokenizer \
        --config.model_init.clip=/ckpt/clip-l --config.model_init.clip_tokenizer=/ckpt/clip_tokenizer \
        --config.input.conditioning_cache=/ckpt/dd_cond

The task is tasks/diffdecompose.py (model: omnijax/diffdecompose/). The paper's numbers: LoRA rank 128, batch 1,
lr 1e-4, 30k steps (50k for the 512x1024 subtasks). `data.alphablend.dataset_from_config(config.input)` builds
the data source, `data.alphablend.prompts_from_config(config.prompt)` the six per-subtask prompts embedded once.

Colon-args (`configs/diffdecompose.py:subtasks=watermark+xray,res=1024x512,runlocal`):
  subtasks  '+'-separated subset of flare, occlusion, watermark, glassware, cell, xray (default: all six)
  res       512 (default) | WxH   training size; the paper: 512x512 for flare / occlusion / watermark and
            "512x1024" for glassware / cell / xray (orientation not stated)
  logo      a LOGO variant folder (e.g. /data/logo/10khigh): train on LOGO instead of synthesis, 256x256
  runlocal  (flag) tiny random Flux / VAE / T5 / CLIP, f32, 64x64 procedural data, batch 1, 4 steps (CPU)
  learn     (flag) the small-scale learning check (benchmarks/learn_diffdecompose.py): the "small" Flux DiT
            trained from scratch (train_base), bf16 on f32 weights, 128x128 watermarks, tiny T5 / CLIP stand-ins
            (random, so the one prompt embedding is a constant input), batch 16; set model_init.vae to a trained VAE
            (omnijax.training.autoencoder). With runlocal too: the tiny DiT (built through the same dit_variant
            path), 32x32, a few steps (CPU tests).

train_base: train every DiT weight (and the adapters) instead of the adapters alone (Models.wrt = nnx.Param);
the trained DiT is then exported too (WORKDIR/dit, a converted folder for model_init.dit / --dit).
model.dit_variant: with model_init.dit = "tiny", the random DiT takes this Flux size row (variants.py, e.g.
"small") instead of the tiny one, its latent / text widths fitted to the VAE and the text encoders.
"""

from __future__ import annotations

import ml_collections

from data.alphablend import DESCRIPTIONS, PROMPT_TEMPLATE, SUBTASKS
from omnijax.models.flux.lora import IMAGE_STREAM_TARGETS


def parse_arg(arg: str | None) -> dict:
    out = dict(subtasks="+".join(SUBTASKS), res="512", logo="", runlocal=False, learn=False)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config arg {key!r}; known: {', '.join(out)}")
        out[key] = True if key in ("runlocal", "learn") and not value else value
    bad = [s for s in out["subtasks"].split("+") if s not in SUBTASKS]
    if bad:
        raise ValueError(f"unknown subtasks {bad}; known: {'+'.join(SUBTASKS)}")
    return out


def get_config(arg=None):
    a = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.task = "tasks.diffdecompose"
    c.seed = 0
    w, _, h = a["res"].partition("x")
    height, width = (int(h), int(w)) if h else (int(w), int(w))
    if a["logo"]:
        height = width = 256  # the LOGO protocol's size
    # Samples carry composite / foreground / background [H, W, 3] and a `subtask` id (data/alphablend.py).
    # fg_dir / bg_dir: "" = procedural layers; fg_alpha: "channel" (RGBA files) or "luminance" (light on black).
    # conditioning_cache: a folder for the six prompt embeddings (T5 + CLIP run once, later runs load neither).
    # vae_sample: train on a posterior draw of each image per step instead of the posterior mean.
    # latent_cache: a folder written by launch/cache_layer_latents.py; training then never runs the VAE encoder.
    # opacity: (low, high) replacing every subtask's opacity range of the procedural source; () = the paper's.
    # watermark_size: (low, high) side of a watermark's box in pixels at 512 px (scaled to the size); () = the
    # paper's 96-128.
    c.input = dict(source="logo" if a["logo"] else "procedural", subtasks=tuple(a["subtasks"].split("+")),
                   height=height, width=width, batch_size=1, num_threads=4, fg_dir="", bg_dir="",
                   fg_alpha="channel", logo_root=a["logo"], logo_split="train", conditioning_cache="",
                   vae_sample=False, latent_cache="", opacity=(), watermark_size=())
    # The paper's template; descriptions: subtask -> (foreground, background, blending type).
    c.prompt = dict(template=PROMPT_TEMPLATE, descriptions={s: list(DESCRIPTIONS[s]) for s in SUBTASKS})
    c.text = dict(max_length=512)  # T5 tokens (dev's 512)
    # remat: recompute each Flux block in the backward pass (True, False or a jax.checkpoint_policies name). Off by
    # default: at 3 x 512^2 + 512 text, LoRA rank 128, the dev-size step without recompute took 279.5 ms and 53.3 GB
    # against 387.7 ms and 28.1 GB with it (H200, docs/benchmarks.md "Flux.1 MMDiT"), so it fits an 80 GB card;
    # set True for larger images or smaller cards.
    # param_dtype: the DiT's stored weights ("" = dtype); vae_dtype: the VAE's compute and weights ("" = dtype).
    c.model = dict(dtype="bf16", remat=False, attention="auto", dit_variant="", param_dtype="", vae_dtype="")
    c.train_base = False  # True: every weight trains (a DiT from scratch), not only the LoRA adapters
    # Weights (converters.registry.load): "tiny", a converted folder (launch/convert.py --kind flux_dit ...) or the
    # original files (flux1-dev.safetensors, ae.safetensors, T5 / CLIP folders); tokenizers: folders or "tiny".
    # lora: a Flux LoRA file to start from (omnijax.models.flux.lora_files), "" = fresh adapters.
    c.model_init = dict(dit="", vae="", t5="", clip="", t5_tokenizer="", clip_tokenizer="", lora="")
    # Paper: rank 128 (alpha = rank: scale 1) on the image stream (OminiControl's target list, spec §4.1).
    c.lora = dict(rank=128, alpha=128.0, targets=IMAGE_STREAM_TARGETS, param_dtype="f32")
    # In-Context Decomposition: the foreground's own position ids ("panel" = (0, r, c + w/2), "axis0" = (1, r, c);
    # fixed between training and sampling, stored with the LoRA), LoRA switches of (composite, foreground,
    # background) -- (True, False, False) is OminiControl's condition-only ablation -- and the composite's guidance.
    c.icd = dict(fg_ids="panel", lora_on=(True, True, True), composite_guidance=1.0)
    # t ~ sigmoid(N(0, 1)) (OminiControl) or uniform; guidance 1 while training a dev model (spec §3.5);
    # weights of the (foreground, background) flow-matching terms.
    c.loss = dict(t_sampling="logit_normal", guidance=1.0, weights=(1.0, 1.0), nonfinite_patience=3)
    c.schedule = dict(warmup_steps=0, decay_type="constant")
    c.optax = dict(b1=0.9, b2=0.999, eps=1e-8)
    c.lr = 1e-4
    c.wd = 0.0
    c.grad_clip_norm = 1.0
    c.mesh = dict(data=-1, fsdp=1, context=1, tensor=1)  # the paper trains on one GPU
    c.sharding_rules = "flux"  # omnijax.sharding's Flux rules (fsdp / tensor); with fsdp = tensor = 1 replicated
    c.total_steps = 50_000 if height != width else 30_000
    c.log_steps = 10
    c.ckpt_steps = 1000
    c.keep_ckpt = 3
    # export_formats: omnijax.models.flux.lora_files.FORMATS. peft loads in both diffusers loaders at the right scale
    # (alpha folded), comfy in ComfyUI, kohya in sd-scripts (README, "LoRA files").
    c.evals = dict(preview_steps=2000, export_formats=("omnijax", "peft", "comfy", "kohya"))
    # Sampling (the trainer's previews): guidance on the noisy layers and text; mu of the time shift from one layer's
    # tokens or both.
    c.sampler = dict(steps=28, guidance=3.5, mu_tokens="layer")
    if a["learn"]:
        learn_preset(c, tiny=bool(a["runlocal"]))
        return c
    if a["runlocal"]:
        c.input.update(height=64, width=64, num_threads=0)
        c.text.max_length = 16
        c.model.update(dtype="f32", remat=False, attention="xla")
        c.model_init = dict(dit="tiny", vae="tiny", t5="tiny", clip="tiny", t5_tokenizer="tiny",
                            clip_tokenizer="tiny", lora="")
        c.lora.update(rank=4, alpha=4.0)
        c.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
        c.total_steps, c.log_steps, c.ckpt_steps = 4, 1, 2
        c.evals.update(preview_steps=4)
        c.sampler.steps = 2
    return c


def learn_preset(c, *, tiny: bool) -> None:
    """The small-scale learning check (see the module docstring): a DiT trained from scratch on watermarks."""
    c.input.update(subtasks=("watermark",), height=32 if tiny else 128, width=32 if tiny else 128,
                   batch_size=2 if tiny else 16, num_threads=0 if tiny else 12)
    # 128x128 through the tiny VAE (x2): 64x64 latents, 1024 tokens per layer, 3 x 1024 + 16 text tokens.
    c.text.max_length = 16  # the tiny T5 stand-in: the prompt embedding is a constant input
    # bf16 compute on f32 weights (Adam updates of a from-scratch model fall below bf16's resolution); the VAE in
    # f32, so that its round trip (the ceiling of every decoded layer) is not limited by bf16.
    c.model.update(dtype="f32" if tiny else "bf16", param_dtype="f32", vae_dtype="f32", remat=False,
                   attention="xla" if tiny else "auto", dit_variant="tiny" if tiny else "small")
    c.model_init = dict(dit="tiny", vae="tiny", t5="tiny", clip="tiny", t5_tokenizer="tiny", clip_tokenizer="tiny",
                        lora="")
    c.train_base = True
    c.lora.update(rank=4, alpha=4.0)  # kept (the task's model has adapters) but small: the base does the work
    c.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
    # Trained and sampled at guidance 1: a from-scratch model has never seen another guidance value.
    c.loss.update(guidance=1.0, nonfinite_patience=5)
    c.sampler.update(steps=28, guidance=1.0)
    c.schedule = dict(warmup_steps=1 if tiny else 100, decay_type="cosine", end_factor=0.1)
    c.lr = 3e-4
    c.total_steps = 4 if tiny else 2000
    c.log_steps = 1 if tiny else 10
    c.ckpt_steps = c.total_steps  # one checkpoint, at the end (the evaluation restores it)
    c.evals.update(preview_steps=c.total_steps, export_formats=("omnijax",))
    c.sampler.steps = 2 if tiny else 28
