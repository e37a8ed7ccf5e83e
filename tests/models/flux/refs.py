"""Tiny diffusers FluxTransformer2DModel references and inputs for the Flux tests (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch

from tests.torch_refs import randomize_

TINY = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=32, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(8, 12, 12))


def diffusers_flux(guidance: bool = True, seed: int = 0, **overrides):
    """A tiny random FluxTransformer2DModel (f32) matching variant("tiny") / variant("tiny-schnell")."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    ref = FluxTransformer2DModel(**{**TINY, "guidance_embeds": guidance, **overrides})
    return randomize_(ref, seed=seed).eval()


def image_ids(h: int, w: int, axis0: float = 0.0, dr: float = 0.0, dc: float = 0.0) -> np.ndarray:
    """[h*w, 3] ids (axis0, row + dr, col + dc) in row-major order (spec §1.9)."""
    r, c = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([np.full(h * w, axis0), r.ravel() + dr, c.ravel() + dc], -1).astype(np.float32)


def inputs(b=2, h=3, w=5, s=7, channels=16, ctx=32, vec=24, seed=0):
    r = np.random.default_rng(seed)
    return dict(img=r.standard_normal((b, h * w, channels)).astype(np.float32), img_ids=image_ids(h, w),
                txt=r.standard_normal((b, s, ctx)).astype(np.float32), txt_ids=np.zeros((s, 3), np.float32),
                timesteps=np.array([0.93, 0.21][:b], np.float32), y=r.standard_normal((b, vec)).astype(np.float32),
                guidance=np.array([3.5, 1.0][:b], np.float32))


def torch_forward(ref, x: dict, guidance: bool = True) -> np.ndarray:
    t = lambda a: torch.from_numpy(np.asarray(a))
    with torch.no_grad():
        out = ref(hidden_states=t(x["img"]), encoder_hidden_states=t(x["txt"]), pooled_projections=t(x["y"]),
                  timestep=t(x["timesteps"]), img_ids=t(x["img_ids"]), txt_ids=t(x["txt_ids"]),
                  guidance=t(x["guidance"]) if guidance else None, return_dict=False)[0]
    return out.numpy()
