"""Model families: wan (DiT, VAE, umT5, CLIP vision tower)."""
