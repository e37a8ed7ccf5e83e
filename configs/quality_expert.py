"""Quality Expert: LoRA (rank 64) on all blocks of the frozen Wan2.1-Fun-InP DiT, attention mask C.

  python launch/train.py --config configs/quality_expert.py --workdir runs/quality --config.model_init.dit=...
  python launch/train.py --config configs/quality_expert.py:runlocal --workdir /tmp/quality   # CPU smoke

Under mask C the background set never reaches the loss, so a training step runs the alpha tokens alone.
"""

from configs.common import expert_config


def get_config(arg=None):
    return expert_config("quality", arg)
