"""CLIP ViT vision tower (Wan2.1's image encoder, open-clip xlm-roberta-large ViT-H/14; shared/spec/wan.md §3.5).

Wan conditions on the hidden states after the first 31 of the 32 blocks (`use_31_block`): patch embedding
(no bias) + class token + absolute positions -> pre-LayerNorm -> 31 pre-LN blocks, with no post-norm and no
projection. So this tower builds only the blocks it runs (`config.output_layer`); the checkpoint's last
block, post-norm and projection are ignored by the converter.

Axis letters: B batch, H/W image or patch-grid size, C channels (RGB), P patch size, L tokens (1 + grid²),
N heads, K head dim, D width, F MLP dim. Images are channels-last [B, H, W, C].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omnijax.layers.attention import attention
from omnijax.layers.linear import Linear
from omnijax.layers.norms import LayerNorm

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # ViT-H/14 in Wan (nn.GELU)
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP weights
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Vision tower hyper-parameters (defaults: ViT-H/14 as Wan uses it).

    num_layers is the checkpoint's depth; output_layer is how many blocks run (Wan: all but the last).
    """

    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    num_layers: int = 32
    num_heads: int = 16
    mlp_dim: int = 5120
    activation: str = "gelu"
    eps: float = 1e-5
    output_layer: int = 31

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown CLIP activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 0 < self.output_layer <= self.num_layers:
            raise ValueError(f"output_layer must be in 1..num_layers ({self.num_layers}), got {self.output_layer}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid ** 2

    def replace(self, **kw) -> CLIPVisionConfig:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CLIPVisionConfig:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown CLIPVisionConfig fields: {sorted(unknown)}")
        return cls(**d)


CLIP_VARIANTS = {
    "vit-h-14": {},
    # Width 32 = the tiny Wan DiT's image_dim; still 224/14 so the DiT sees 257 image tokens.
    "tiny": dict(width=32, num_layers=3, num_heads=4, mlp_dim=64, output_layer=2),
}


def clip_variant(name: str, **overrides) -> CLIPVisionConfig:
    """CLIPVisionConfig by name ("vit-h-14" or "tiny"); keyword overrides replace fields."""
    if name not in CLIP_VARIANTS:
        raise ValueError(f"unknown CLIP variant {name!r}; known: {', '.join(CLIP_VARIANTS)}")
    return CLIPVisionConfig(**{**CLIP_VARIANTS[name], **overrides})


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection ([D, 3D], output laid out (3, N, K)).

    `causal` masks keys after the query (the CLIP text tower, omnijax.models.flux.clip_text); it runs XLA's
    kernel, as the 77-token text sequence costs nothing next to the rest of a pipeline.
    """

    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, backend: str = "auto",
                 causal: bool = False):
        self.num_heads, self.backend, self.causal = config.num_heads, backend, causal
        self.qkv = Linear(config.width, 3 * config.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj = Linear(config.width, config.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        b, l, d = x.shape
        q, k, v = jnp.unstack(self.qkv(x).reshape(b, l, 3, self.num_heads, d // self.num_heads), axis=2)
        if self.causal:
            out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        else:
            out = attention(q, k, v, backend=self.backend)
        return self.proj(out.reshape(b, l, d))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.act = ACTIVATIONS[config.activation]
        self.fc1 = Linear(config.width, config.mlp_dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = Linear(config.mlp_dim, config.width, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CLIPBlock(nnx.Module):
    """Pre-LN block: x + attn(norm1(x)), then x + mlp(norm2(x)). Reads config.{width, num_heads, mlp_dim,
    activation, eps}, which the text tower's config has too."""

    def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs, backend: str = "auto",
                 causal: bool = False):
        self.norm1 = LayerNorm(config.width, eps=config.eps, param_dtype=param_dtype)
        self.attn = CLIPAttention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=backend,
                                  causal=causal)
        self.norm2 = LayerNorm(config.width, eps=config.eps, param_dtype=param_dtype)
        self.mlp = CLIPMLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionTower(nnx.Module):
    """Normalised images [B, S, S, 3] (S = image_size) -> hidden states [B, 1 + (S/P)², D] after output_layer blocks.

    Args:
      config: CLIPVisionConfig.
      dtype, param_dtype: compute and storage types (LayerNorm statistics and softmax stay f32).
      rngs: parameter initialisation.
      attn_backend: omnijax.layers.attention backend ("auto": cuDNN on GPU for bf16, its 80-wide heads being
        outside fa3's; XLA otherwise).
    """

    def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs: nnx.Rngs,
                 attn_backend: str = "auto"):
        c = config
        self.config, self.dtype = c, dtype
        scale = c.width ** -0.5
        self.patch_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (c.patch_size, c.patch_size, 3, c.width), param_dtype) * scale)
        self.cls_embedding = nnx.Param(jax.random.normal(rngs.params(), (c.width,), param_dtype) * scale)
        self.pos_embedding = nnx.Param(jax.random.normal(rngs.params(), (c.num_tokens, c.width), param_dtype) * scale)
        self.pre_norm = LayerNorm(c.width, eps=c.eps, param_dtype=param_dtype)
        self.blocks = nnx.List([CLIPBlock(c, dtype=dtype, param_dtype=param_dtype, rngs=rngs, backend=attn_backend)
                                for _ in range(c.output_layer)])

    def embed(self, pixels):
        """[B, S, S, 3] -> [B, L, D] tokens (class token first, then patches in row-major order)."""
        c = self.config
        if pixels.ndim != 4 or pixels.shape[1:] != (c.image_size, c.image_size, 3):
            raise ValueError(f"CLIP expects normalised images [B, {c.image_size}, {c.image_size}, 3], got "
                             f"{list(pixels.shape)}; use preprocess_frames first")
        b, g, p = pixels.shape[0], c.grid, c.patch_size
        patches = pixels.astype(self.dtype).reshape(b, g, p, g, p, 3)
        kernel = self.patch_embedding[...].astype(self.dtype)
        x = jnp.einsum("bhpwqc,pqcd->bhwd", patches, kernel,
                       preferred_element_type=jnp.float32 if self.dtype == jnp.float32 else None)
        x = x.reshape(b, g * g, c.width).astype(self.dtype)
        cls = jnp.broadcast_to(self.cls_embedding[...].astype(self.dtype), (b, 1, c.width))
        return jnp.concatenate([cls, x], axis=1) + self.pos_embedding[...].astype(self.dtype)[None]

    def __call__(self, pixels):
        x = self.pre_norm(self.embed(pixels))
        for block in self.blocks:
            x = block(x)
        return x


# ---------------------------------------------------------------------------------------------------------
# Wan's preprocessing: frames in [-1, 1] -> bicubic squash to 224² -> [0, 1] -> CLIP mean/std.

@functools.lru_cache(maxsize=32)
def bicubic_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
    """[out, in] float64 weights of PyTorch's bicubic interpolation (align_corners=False, no antialias).

    Output pixel o samples the input at (o + 0.5) * in/out - 0.5 with Keys' cubic kernel (a = -0.75);
    taps beyond the border repeat the edge pixel. `jax.image.resize` differs (a = -0.5, and it
    antialiases when shrinking), hence this explicit form.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    t = src - base

    def kernel(d):  # Keys' cubic convolution kernel of |distance| d
        d = np.abs(d)
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return np.where(d <= 1, near, np.where(d < 2, far, 0.0))

    m = np.zeros((out_size, in_size))
    rows = np.arange(out_size)
    for tap in (-1, 0, 1, 2):
        idx = np.clip(base + tap, 0, in_size - 1).astype(np.int64)
        np.add.at(m, (rows, idx), kernel(t - tap))
    return m


def resize_bicubic(images, size: tuple[int, int]):
    """Bicubic resize of [B, H, W, C] to [B, size[0], size[1], C] in f32, as torch F.interpolate(bicubic)."""
    _, h, w, _ = images.shape
    mh = jnp.asarray(bicubic_matrix(h, size[0]), jnp.float32)
    mw = jnp.asarray(bicubic_matrix(w, size[1]), jnp.float32)
    x = images.astype(jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", mh, x, precision=jax.lax.Precision.HIGHEST)
    return jnp.einsum("pw,bowc->bopc", mw, x, precision=jax.lax.Precision.HIGHEST)


def preprocess_frames(frames, image_size: int = 224):
    """Wan's CLIP input: frames [B, H, W, 3] in [-1, 1] -> normalised [B, image_size, image_size, 3] f32.

    The aspect ratio is squashed (no crop) and bicubic overshoot is not clipped, as in the reference.
    """
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [B, H, W, 3] in [-1, 1], got shape {list(frames.shape)}")
    x = resize_bicubic(frames, (image_size, image_size)) * 0.5 + 0.5
    return (x - jnp.asarray(CLIP_MEAN, jnp.float32)) / jnp.asarray(CLIP_STD, jnp.float32)


@nnx.jit
def clip_encode(model, frames):
    return model(preprocess_frames(frames, model.config.image_size))


def compile_encode(model: CLIPVisionTower, shape: tuple) -> None:
    """Compiles (or loads from the persistent cache) the program `encode_frames` runs on float32 frames of `shape`
    ([B, H, W, 3]), without running it."""
    clip_encode.lower(model, jax.ShapeDtypeStruct(tuple(shape), jnp.float32)).compile()


def encode_frames(model: CLIPVisionTower, frames) -> np.ndarray:
    """CLIP features for the DiT: frames [B, H, W, 3] in [-1, 1] -> [B, L, D] (Wan: [B, 257, 1280])."""
    frames = np.asarray(frames, np.float32)  # copied with device_put: jnp.asarray compiles a program for it
    return np.asarray(clip_encode(model, jax.device_put(frames)))
