"""DiffDecompose (Flux.1 + LoRA r128, In-Context Decomposition with LPEC): the data and prompt part.

    python launch/preview_layers.py --out sheet.png                       # look at the training data
    python launch/train.py --config configs/diffdecompose.py --workdir runs/ddecomp     # once the task lands

The DiffDecompose task module and its trainer wiring are issue #18's second half and not here yet: this file
already fixes what the data side provides (`input`), the prompt of the paper with the blending type (`prompt`)
and the paper's optimisation numbers (LoRA rank 128, batch 1, lr 1e-4, 30k steps; 50k for the 512x1024
subtasks). `data.alphablend.dataset_from_config(config.input)` builds the data source,
`data.alphablend.prompts_from_config(config.prompt)` the per-subtask prompts to embed once.

Colon-args (`configs/diffdecompose.py:subtasks=watermark+xray,res=1024x512,runlocal`):
  subtasks  '+'-separated subset of flare, occlusion, watermark, glassware, cell, xray (default: all six)
  res       512 (default) | WxH   training size; the paper: 512x512 for flare / occlusion / watermark and
            "512x1024" for glassware / cell / xray (orientation not stated)
  logo      a LOGO variant folder (e.g. /data/logo/10khigh): train on LOGO instead of synthesis, 256x256
  runlocal  (flag) 64x64 procedural data, batch 1
"""

from __future__ import annotations

import ml_collections

from data.alphablend import DESCRIPTIONS, PROMPT_TEMPLATE, SUBTASKS


def parse_arg(arg: str | None) -> dict:
    out = dict(subtasks="+".join(SUBTASKS), res="512", logo="", runlocal=False)
    for item in filter(None, (arg or "").split(",")):
        key, _, value = item.partition("=")
        if key not in out:
            raise ValueError(f"unknown config arg {key!r}; known: {', '.join(out)}")
        out[key] = True if key == "runlocal" and not value else value
    bad = [s for s in out["subtasks"].split("+") if s not in SUBTASKS]
    if bad:
        raise ValueError(f"unknown subtasks {bad}; known: {'+'.join(SUBTASKS)}")
    return out


def get_config(arg=None):
    a = parse_arg(arg)
    c = ml_collections.ConfigDict()
    c.seed = 0
    w, _, h = a["res"].partition("x")
    height, width = (int(h), int(w)) if h else (int(w), int(w))
    if a["logo"]:
        height = width = 256  # the LOGO protocol's size
    # Samples carry composite / foreground / background [H, W, 3] and a `subtask` id (data/alphablend.py).
    # fg_dir / bg_dir: "" = procedural layers; fg_alpha: "channel" (RGBA files) or "luminance" (light on black).
    c.input = dict(source="logo" if a["logo"] else "procedural", subtasks=tuple(a["subtasks"].split("+")),
                   height=height, width=width, batch_size=1, num_threads=4, fg_dir="", bg_dir="",
                   fg_alpha="channel", logo_root=a["logo"], logo_split="train", latent_cache="",
                   conditioning_cache="")
    # The paper's template; descriptions: subtask -> (foreground, background, blending type).
    c.prompt = dict(template=PROMPT_TEMPLATE, descriptions={s: list(DESCRIPTIONS[s]) for s in SUBTASKS})
    c.lora = dict(rank=128, alpha=128.0)
    c.lr = 1e-4
    c.total_steps = 50_000 if height != width else 30_000
    if a["runlocal"]:
        c.input.update(height=64, width=64, num_threads=0)
        c.lora.update(rank=4, alpha=4.0)
        c.total_steps = 4
    return c
