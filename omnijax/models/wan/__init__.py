"""Wan2.1 models: the DiT (WanDiT), and (by module) the VAE, umT5 and CLIP vision tower."""

from omnijax.models.wan.dit import WanDiT
from omnijax.models.wan.variants import VARIANTS, WanConfig, variant

__all__ = ["WanDiT", "WanConfig", "variant", "VARIANTS"]
