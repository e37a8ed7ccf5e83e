"""Effect Expert: LoRA (rank 128) on the last K blocks of the frozen Wan2.1-Fun-InP DiT, attention mask B.

  python launch/train.py --config configs/effect_expert.py --workdir runs/effect \
      --config.model_init.dit=/ckpt/omnijax/wan_dit_1.3b_inp --config.model_init.vae=/ckpt/Wan2.1_VAE.pth \
      --config.model_init.umt5=/ckpt/umt5.pth --config.model_init.tokenizer=/ckpt/google/umt5-xxl \
      --config.model_init.clip=/ckpt/clip.pth
  python launch/train.py --config configs/effect_expert.py:runlocal --workdir /tmp/effect   # CPU smoke, ~1 min

Paper setting: AdamW lr 1e-3, 8000 steps, alpha-latent flow matching. Step time at 1.3B / 81x480x832 on one
H100: see docs/benchmarks.md.
"""

from configs.common import expert_config


def get_config(arg=None):
    return expert_config("effect", arg)
