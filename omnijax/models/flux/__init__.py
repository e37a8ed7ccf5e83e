"""Flux.1 models: the MMDiT (FluxDiT, with the segment-aware forward) and its LoRA adapters."""

from omnijax.models.flux.dit import FluxDiT, Segment
from omnijax.models.flux.lora import FluxLoRA, lora_spec
from omnijax.models.flux.variants import VARIANTS, FluxConfig, variant

__all__ = ["FluxDiT", "Segment", "FluxLoRA", "lora_spec", "FluxConfig", "variant", "VARIANTS"]
