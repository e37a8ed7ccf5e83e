"""DiffDecompose's In-Context Decomposition on the segment-aware FluxDiT (paper §3.3; shared/spec/flux.md §4.3).

Axis letters: B batch, h/w latent grid, Z latent channels, L packed tokens of one layer ((h/2)(w/2)), P packed
features (4Z), S text tokens, D text width, V pooled width, A position-id axes (3).

One joint attention over [text; c_z; c_x; c_y] (Flux-native order; the paper's [c_z; c_x; c_y; c_T] is the same
computation, attention having no notion of token order beyond the position ids):
- c_z: the clean composite latent, modulated with timestep 0 (OminiControl's condition convention) and guidance
  `composite_guidance`; it never receives noise and its output is discarded.
- c_x: the noisy foreground layer, c_y: the noisy background layer, both at the sample's t (the text stream too).
Layer Position Encoding Cloning (LPEC): c_y reuses c_z's position ids (0, r, c), so background and composite
share one coordinate frame; c_x keeps ids of its own (`fg_ids`, fixed between training and sampling):
  "panel" (0, r, c + w/2): a second panel to the right (IC-LoRA tiling, the spec's default);
  "axis0" (1, r, c): pixel-aligned rows/columns on another first-axis index (Kontext-style).
Without distinct foreground ids c_x and c_y would be exchangeable (same weights, timestep and ids).
LoRA: one FluxLoRA (rank 128 in the paper) whose adapters act on the image-stream segments whose switch is on
(`lora_on` for composite, foreground, background); (True, False, False) is OminiControl's condition-only mode.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from omnijax.models.flux.dit import FluxDiT, Segment
from omnijax.models.flux.lora import FluxLoRA
from omnijax.models.flux.vae import image_ids, pack_latents
from omnijax.training.loss import noisy_latents, velocity_target

F32 = jnp.float32
FG_ID_SCHEMES = ("panel", "axis0")
SEGMENTS = ("composite", "foreground", "background")


@dataclasses.dataclass(frozen=True)
class ICDSettings:
    """Static choices of the In-Context Decomposition (kept with checkpoints and LoRA files)."""

    fg_ids: str = "panel"
    lora_on: tuple[bool, bool, bool] = (True, True, True)  # composite, foreground, background
    composite_guidance: float = 1.0

    def __post_init__(self):
        if self.fg_ids not in FG_ID_SCHEMES:
            raise ValueError(f"fg_ids must be one of {FG_ID_SCHEMES}, got {self.fg_ids!r}")
        if len(self.lora_on) != 3:
            raise ValueError(f"lora_on needs one switch per segment {SEGMENTS}, got {self.lora_on!r}")
        object.__setattr__(self, "lora_on", tuple(bool(x) for x in self.lora_on))

    def to_dict(self) -> dict:
        return dict(fg_ids=self.fg_ids, lora_on=list(self.lora_on), composite_guidance=self.composite_guidance)

    @classmethod
    def from_dict(cls, d) -> ICDSettings:
        d = dict(d)
        return cls(fg_ids=d.get("fg_ids", "panel"), lora_on=tuple(d.get("lora_on", (True, True, True))),
                   composite_guidance=float(d.get("composite_guidance", 1.0)))


def layer_ids(h: int, w: int, fg_ids: str = "panel", batch: int = 1):
    """LPEC position ids of the three segments for an h x w latent: (composite, foreground, background), each
    [batch, (h/2)(w/2), 3] f32; the background's are the composite's."""
    if fg_ids not in FG_ID_SCHEMES:
        raise ValueError(f"fg_ids must be one of {FG_ID_SCHEMES}, got {fg_ids!r}")
    ids_z = image_ids(h, w, batch=batch)
    if fg_ids == "panel":
        ids_x = ids_z + jnp.asarray([0.0, 0.0, float(w // 2)], F32)
    else:
        ids_x = image_ids(h, w, batch=batch, axis0=1.0)
    return ids_z, ids_x, ids_z


class DiffDecomposer(nnx.Module):
    """The frozen FluxDiT plus the trainable FluxLoRA (its only nnx.LoRAParam variables) and the ICD settings.

    `__call__(z_c, x_fg, x_bg, t, txt, y, guidance, grid=(h, w))` -> (v_fg, v_bg), packed [B, L, P].
    """

    def __init__(self, dit: FluxDiT, lora: FluxLoRA | None, settings: ICDSettings = ICDSettings()):
        self.dit = dit
        self.lora = lora
        self.settings = settings

    @property
    def config(self):
        return self.dit.config

    def __call__(self, z_c, x_fg, x_bg, t, txt, y, guidance=None, *, grid: tuple[int, int],
                 attention_backend: str = "auto", remat: bool | str = False):
        """Velocities of the two noisy layers.

        Args:
          z_c: [B, L, P] packed clean composite latent; x_fg, x_bg: [B, L, P] noisy layer latents at t.
          t: [B] (or scalar) sigma in [0, 1] of both noisy layers (and the text stream's modulation).
          txt: [B, S, D] T5 context; y: [B, V] pooled CLIP vector.
          guidance: [B] or scalar guidance strength of the noisy layers and the text (dev models); None for schnell.
          grid: (h, w) latent size (static), for the position ids.
        Returns:
          (v_fg, v_bg), each [B, L, P] in the model's dtype.
        """
        s, b = self.settings, z_c.shape[0]
        h, w = grid
        if (h // 2) * (w // 2) != z_c.shape[1] or not z_c.shape == x_fg.shape == x_bg.shape:
            raise ValueError(f"composite {z_c.shape}, foreground {x_fg.shape} and background {x_bg.shape} must all "
                             f"be [B, {(h // 2) * (w // 2)}, P] for a {h}x{w} latent")
        ids_z, ids_x, ids_y = layer_ids(h, w, s.fg_ids)
        t = jnp.broadcast_to(jnp.asarray(t, F32).reshape(-1), (b,))
        dev = self.dit.config.guidance_embed
        g = None if not dev else jnp.broadcast_to(jnp.asarray(1.0 if guidance is None else guidance, F32)
                                                  .reshape(-1), (b,))
        g_c = None if not dev else jnp.full((b,), s.composite_guidance, F32)
        segs = [Segment(z_c, ids_z, jnp.zeros((b,), F32), g_c, lora=s.lora_on[0]),
                Segment(x_fg, ids_x, t, g, lora=s.lora_on[1]),
                Segment(x_bg, ids_y, t, g, lora=s.lora_on[2])]
        _, v_fg, v_bg = self.dit.forward_segments(segs, txt, jnp.zeros((txt.shape[1], 3), F32), y, txt_timesteps=t,
                                                  txt_guidance=g, text_lora=False, lora=self.lora,
                                                  attention_backend=attention_backend, remat=remat)
        return v_fg, v_bg


def sample_t(rng, batch: int, method: str = "logit_normal") -> jax.Array:
    """Training sigmas [B] f32: "logit_normal" = sigmoid(N(0, 1)) (OminiControl's trainer), "uniform" = U(0, 1)."""
    if method == "logit_normal":
        return jax.nn.sigmoid(jax.random.normal(rng, (batch,), F32))
    if method == "uniform":
        return jax.random.uniform(rng, (batch,), F32)
    raise ValueError(f"timestep sampling must be 'logit_normal' or 'uniform', got {method!r}")


def decompose_loss(model: DiffDecomposer, batch, rng, *, t_sampling: str = "logit_normal", guidance: float = 1.0,
                   weights: tuple[float, float] = (1.0, 1.0), attention_backend: str = "auto",
                   remat: bool | str = False):
    """Flow matching on both noisy layers: one t per sample, independent noise per layer, target noise - data per
    layer, MSE over each layer's elements, combined with `weights` (foreground, background) normalised to sum 1.

    Args:
      batch: z_composite, z_foreground, z_background [B, h, w, Z] scaled VAE latents; txt [B, S, D]; y [B, V].
      rng: key; split into (t, foreground noise, background noise).
    Returns:
      (loss, dict(loss_fg, loss_bg)) scalars f32.
    """
    z_c, x_fg, x_bg = batch["z_composite"], batch["z_foreground"], batch["z_background"]
    b, h, w, _ = z_c.shape
    k_t, k_fg, k_bg = jax.random.split(rng, 3)
    t = sample_t(k_t, b, t_sampling)
    eps_fg = jax.random.normal(k_fg, x_fg.shape, F32)
    eps_bg = jax.random.normal(k_bg, x_bg.shape, F32)
    dtype = model.dit.dtype
    inp = lambda x: pack_latents(x).astype(dtype)
    v_fg, v_bg = model(inp(z_c), inp(noisy_latents(x_fg, eps_fg, t)), inp(noisy_latents(x_bg, eps_bg, t)), t,
                       batch["txt"].astype(dtype), batch["y"], guidance, grid=(h, w),
                       attention_backend=attention_backend, remat=remat)
    mse = lambda v, x0, eps: jnp.mean(jnp.square(v.astype(F32) - pack_latents(velocity_target(x0, eps))))
    loss_fg, loss_bg = mse(v_fg, x_fg, eps_fg), mse(v_bg, x_bg, eps_bg)
    w_fg, w_bg = (float(x) for x in weights)
    if w_fg < 0 or w_bg < 0 or w_fg + w_bg <= 0:
        raise ValueError(f"loss weights must be non-negative with a positive sum, got {weights}")
    loss = (w_fg * loss_fg + w_bg * loss_bg) / (w_fg + w_bg)
    return loss, dict(loss_fg=loss_fg, loss_bg=loss_bg)
