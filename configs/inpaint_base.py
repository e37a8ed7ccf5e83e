"""The inpainting base (tasks/inpaint.py): a Wan Fun-InP DiT trained from scratch, every weight, to predict the clean
background of a synthetic composite from [removal mask ; input-video latent] + CLIP of frame 0.

This is the first model stage of the learning check (benchmarks/learn_omnimatte.py, docs/learning.md): no
Fun-InP / Casper weights can be downloaded here, so a small base is pretrained on the procedural clips and the
experts then train on it through configs/effect_expert.py / quality_expert.py with `:base=small`.

  python launch/train.py --config configs/inpaint_base.py --workdir runs/base \
      --config.model_init.vae=runs/vae --config.model_init.umt5=runs/umt5 --config.model_init.clip=runs/clip
  python launch/train.py --config configs/inpaint_base.py:runlocal --workdir /tmp/base     # tiny, CPU

Expected on one H200 at the defaults (17x128x128, batch 8, 4000 steps; benchmarks/learn_omnimatte.py runs 2500):
a few minutes, bounded by making the composites on the host (set --config.input.num_workers to the free cores).

Colon args as configs/common.py (base=small is the default here; res, frames, runlocal). The VAE, umT5 and CLIP
are frozen; model_init.dit="tiny" means a random init of model.variant (training from scratch) or a converted
folder to continue from.
"""

from configs.common import expert_config, parse_arg, small_base


def get_config(arg=None):
    arg = arg if arg and "base=" in arg else f"base=small,{arg or ''}"
    a, c = parse_arg(arg), expert_config("effect", arg)  # the expert's input/model/optimizer fields, no adapters
    c.task = "inpaint"
    del c.lora, c.expert
    # masked_prob: the share of samples in Fun-InP's masked form (object and shadow removed, the video blacked out
    # there); the rest see the whole composite with the coarse object removed, as the omnimatte sampler feeds the
    # base (omnijax.omnimatte.training.inpaint_pixels).
    c.input.masked_prob = 0.5
    c.model_init.dit = "tiny"  # a random init of model.variant: training from scratch
    c.lr = 5e-4
    c.wd = 1e-2
    if not a["runlocal"]:
        small_base(c, steps=4000, batch_size=8)
        c.schedule.update(decay_type="cosine", end_factor=0.1)
    c.sampler.steps = 2 if a["runlocal"] else 16
    return c
