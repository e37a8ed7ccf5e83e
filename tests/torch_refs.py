"""Tiny random PyTorch references built inside tests (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2):
    """Fills every parameter with N(0, scale) (norm weights around 1) so no term is trivially zero or one."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * scale
            p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)
    return module


def to_numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().float().numpy() for k, v in module.state_dict().items()}


def diffusers_wan(*, dim=64, heads=2, layers=2, ffn=128, in_channels=36, text_dim=32, freq_dim=32, image_dim=32,
                  i2v=True, device=None):
    from diffusers import WanTransformer3DModel

    kw = dict(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=dim // heads,
              in_channels=in_channels if i2v else 16, out_channels=16, text_dim=text_dim, freq_dim=freq_dim,
              ffn_dim=ffn, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
              image_dim=image_dim if i2v else None, added_kv_proj_dim=dim if i2v else None, rope_max_seq_len=1024)
    if device is not None:
        with torch.device(device):
            return WanTransformer3DModel(**kw)
    return WanTransformer3DModel(**kw)


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
