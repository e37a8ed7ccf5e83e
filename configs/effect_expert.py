"""Effect Expert: LoRA (rank 128) on the last K blocks of the frozen Casper DiT, attention mask B.

The base is Casper (paper §4: Wan2.1-Fun-InP with Casper's effect-removal weights, converted by
`launch/convert.py --casper` / `--casper-lora`, README "Converting weights"); the plain Fun-InP DiT is the
paper's appendix-E ablation, which fails to capture effects. Training data: VideoMatte240K-style foregrounds and
background videos (input.fg_dir, input.bg_dir); procedural toy clips only with --config.input.source=procedural.

  python launch/train.py --config configs/effect_expert.py --workdir runs/effect \
      --config.input.fg_dir=/data/VideoMatte240K_JPEG_HD --config.input.bg_dir=/data/backgrounds \
      --config.model_init.dit=/ckpt/omnijax/casper_1.3b --config.model_init.vae=/ckpt/Wan2.1_VAE.pth \
      --config.model_init.umt5=/ckpt/umt5.pth --config.model_init.tokenizer=/ckpt/google/umt5-xxl \
      --config.model_init.clip=/ckpt/clip.pth
  python launch/train.py --config configs/effect_expert.py:runlocal --workdir /tmp/effect   # CPU smoke, ~1 min

Paper setting: AdamW lr 1e-3, 8000 steps, alpha-latent flow matching. Step time at 1.3B / 81x480x832 on one
H100: see docs/benchmarks.md.
"""

from configs.common import expert_config


def get_config(arg=None):
    return expert_config("effect", arg)
