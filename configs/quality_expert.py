"""Quality Expert: LoRA (rank 64) on all blocks of the frozen Casper DiT, attention mask C.

The base is Casper (Wan2.1-Fun-InP with Casper's weights, README "Converting weights"), as for the Effect Expert;
plain Fun-InP is the appendix-E ablation. Data: input.fg_dir and input.bg_dir (or input.source=procedural).

  python launch/train.py --config configs/quality_expert.py --workdir runs/quality \
      --config.input.fg_dir=/data/VideoMatte240K_JPEG_HD --config.input.bg_dir=/data/backgrounds \
      --config.model_init.dit=/ckpt/omnijax/casper_1.3b ...
  python launch/train.py --config configs/quality_expert.py:runlocal --workdir /tmp/quality   # CPU smoke

Under mask C the background set never reaches the loss, so a training step runs the alpha tokens alone.
"""

from configs.common import expert_config


def get_config(arg=None):
    return expert_config("quality", arg)
