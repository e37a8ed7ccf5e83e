"""Shared primitives: attention dispatch, RoPE, norms, embeddings, linear layers."""
