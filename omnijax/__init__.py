"""omnijax: layered decomposition with diffusion transformers in JAX/Flax NNX."""

__version__ = "0.1.0"
