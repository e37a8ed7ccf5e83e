"""omnijax: layered video/image decomposition with diffusion transformers in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="omnijax",
    version="0.1.0",
    description="Layered video decomposition (EasyOmnimatte) with diffusion transformers in JAX/Flax NNX.",
    python_requires=">=3.11",
    packages=find_packages(include=["omnijax", "omnijax.*", "converters", "converters.*", "data", "data.*",
                                    "configs", "configs.*", "launch", "launch.*", "tasks", "tasks.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.6",
        "orbax-checkpoint>=0.12",
        "einops>=0.8",
        "ml-collections>=1.0",
        "ml-dtypes",
        "numpy>=2",
        "safetensors>=0.6",
        "transformers>=5",
        "grain>=0.2.12",
        "tensorflow-datasets>=4.9.9",
        "tensorboardX>=2.6",
        "av>=14",
        "pillow",
        "tqdm",
        "absl-py",
        "matplotlib",
        "sentencepiece",
    ],
    extras_require={
        # PyTorch references for parity tests and for reading .pth checkpoints (weights-only). Pinned to the
        # release whose CPU wheel the machines provide (pip prefers 2.13.0+cpu); a newer one pulls CUDA wheels.
        # scikit-image is the independent reference of the SSIM/PSNR tests (tests/metrics).
        "test": ["torch==2.13.0", "diffusers==0.42.1", "pytest>=8", "chex", "ruff", "scikit-image>=0.24"],
    },
)
