"""Video and image I/O."""
