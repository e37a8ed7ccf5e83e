"""Evaluation metrics (numpy, host-side): image quality of decomposed layers."""
