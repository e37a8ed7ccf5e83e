"""Training data: synthetic omnimatte composition, clip sources, TFDS builder, grain pipelines, latent cache."""
