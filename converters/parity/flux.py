"""Parity adapters for the Flux.1 pipeline's encoders and VAE: t5, clip_l, flux_vae (flux_dit: not yet).

References (the ecosystem's own loaders, transformers / diffusers folders as the FLUX.1 repos ship them):
  t5        transformers T5EncoderModel.from_pretrained (FLUX.1-dev/text_encoder_2)
  clip_l    transformers CLIPTextModel.from_pretrained (FLUX.1-dev/text_encoder)
  flux_vae  diffusers AutoencoderKL.from_pretrained (FLUX.1-dev/vae); BFL's ae.safetensors needs a config that the
            weights do not carry, so it is refused with that explanation.

Stages:
  t5        token_embedding, blocks.i, output (after the final norm): the umT5 adapter's functions
  clip_l    embed (token + position), blocks.i, final_norm (last hidden state), output (the EOS-pooled vector
            Flux conditions on)
  flux_vae  encoder.conv_in, encoder.down_blocks.i, encoder.mid_block, encoder.conv_out (mean, logvar),
            decoder.conv_in, decoder.mid_block, decoder.up_blocks.i, decoder.conv_out, output (clamped); the
            decoder runs on seeded latents.
Images are compared as [B, 1, H, W, C] (the JAX VAE's frame axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from converters.parity import Adapter, ReferenceBuildError
from converters.parity.wan import (
    _apply,
    _is_class,
    _np,
    _tokens,
    _transformers_dir,
    call,
    umt5_inputs,
    umt5_run_jax,
    umt5_run_torch,
)

# ---- t5 -------------------------------------------------------------------------------------------------------


def t5_reference(source, device, config=None):
    import torch
    from transformers import T5EncoderModel

    path = _transformers_dir(source, "T5", "the text_encoder_2/ folder of FLUX.1-dev")
    return T5EncoderModel.from_pretrained(path, dtype=torch.float32).to(device).eval()


# ---- clip_l -----------------------------------------------------------------------------------------------------

def clip_l_reference(source, device, config=None):
    import torch
    from transformers import CLIPTextModel

    path = _transformers_dir(source, "CLIP text", "the text_encoder/ folder of FLUX.1-dev")
    return CLIPTextModel.from_pretrained(path, dtype=torch.float32).to(device).eval()


def clip_l_inputs(ref, size, seed):
    """ids [B, L]: random tokens, then the end-of-text token from a seeded position on (CLIP pads with it), so
    both pooling rules (first EOS id, or the legacy argmax of the ids when eos_token_id is 2) find one position."""
    b, n = size
    c = ref.config
    if n > c.max_position_embeddings:
        raise ValueError(f"--size: {n} tokens exceed the CLIP text model's {c.max_position_embeddings} positions")
    r = np.random.default_rng(seed)
    eos = c.vocab_size - 1 if c.eos_token_id == 2 else c.eos_token_id
    ids = r.integers(0, c.vocab_size - 1, (b, n))
    ids[ids == eos] = 0
    for i in range(b):
        ids[i, r.integers(max(1, n // 4), n):] = eos
    return dict(ids=ids.astype(np.int32))


def clip_l_run_torch(ref, inp, dtype, device, sink):
    import torch

    tm = getattr(ref, "text_model", ref)  # transformers 5 flattened the wrapper
    hooks = [tm.embeddings.register_forward_hook(lambda _, __, out: sink("embed", _np(out)))]
    for i, layer in enumerate(tm.encoder.layers):
        hooks.append(layer.register_forward_hook(
            lambda _, __, out, i=i: sink(f"blocks.{i}", _np(out[0] if isinstance(out, tuple) else out))))
    try:
        out = ref(input_ids=torch.from_numpy(inp["ids"]).long().to(device))
    finally:
        for h in hooks:
            h.remove()
    sink("final_norm", _np(out.last_hidden_state))
    sink("output", _np(out.pooler_output))


def _clip_l_embed(m, ids):
    # CLIPTextModel.__call__'s first line: token embedding plus learned absolute positions.
    return m.token_embedding(ids) + m.pos_embedding[:ids.shape[1]].astype(m.dtype)[None]


def _clip_l_full(m, ids):
    return m(ids)


def clip_l_run_jax(model, inp, dtype, sink):
    x = call(model, _clip_l_embed, inp["ids"])
    sink("embed", np.asarray(x, np.float32))
    for i, blk in enumerate(model.blocks):
        x = call(blk, _apply, x)
        sink(f"blocks.{i}", np.asarray(x, np.float32))
    hidden, pooled = call(model, _clip_l_full, inp["ids"])
    sink("final_norm", np.asarray(hidden, np.float32))
    sink("output", np.asarray(pooled, np.float32))


# ---- flux_vae ---------------------------------------------------------------------------------------------------

def flux_vae_reference(source, device, config=None):
    import torch
    from diffusers import AutoencoderKL

    if not _is_class(source, "AutoencoderKL"):
        raise ReferenceBuildError(
            "the Flux VAE reference is diffusers' AutoencoderKL, read from a diffusers folder (config.json with "
            f"_class_name AutoencoderKL, e.g. FLUX.1-dev/vae); BFL's ae.safetensors carries no config. Got {source!r}")
    return AutoencoderKL.from_pretrained(source, torch_dtype=torch.float32).to(device).eval()


def _image_size(size: str) -> tuple[int, int, int]:
    try:
        b, h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size for flux_vae is BATCHxHEIGHTxWIDTH (e.g. 1x512x512), got {size!r}") from None
    if b < 1 or h <= 0 or w <= 0 or h % 8 or w % 8:
        raise ValueError(f"--size {size}: flux_vae needs a positive batch and height/width multiples of 8")
    return b, h, w


def flux_vae_inputs(ref, size, seed):
    b, h, w = size
    f = 2 ** (len(ref.config.block_out_channels) - 1)
    if h % f or w % f:
        raise ValueError(f"--size: height and width must be multiples of {f} for this VAE")
    r = np.random.default_rng(seed)
    return dict(images=r.uniform(-1, 1, (b, h, w, 3)).astype(np.float32),
                latents=r.standard_normal((b, h // f, w // f, ref.config.latent_channels), np.float32))


def _frames(t):
    """[B, C, H, W] torch -> [B, 1, H, W, C] numpy."""
    return _np(t.permute(0, 2, 3, 1))[:, None]


def flux_vae_run_torch(ref, inp, dtype, device, sink):
    import torch

    enc, dec = ref.encoder, ref.decoder
    stages = ([("encoder.conv_in", enc.conv_in)] + [(f"encoder.down_blocks.{i}", m) for i, m in
                                                     enumerate(enc.down_blocks)]
              + [("encoder.mid_block", enc.mid_block), ("encoder.conv_out", enc.conv_out),
                 ("decoder.conv_in", dec.conv_in), ("decoder.mid_block", dec.mid_block)]
              + [(f"decoder.up_blocks.{i}", m) for i, m in enumerate(dec.up_blocks)]
              + [("decoder.conv_out", dec.conv_out)])
    hooks = [m.register_forward_hook(lambda _, __, out, name=name: sink(name, _frames(out))) for name, m in stages]
    to = lambda a: torch.from_numpy(a).to(device, dtype).permute(0, 3, 1, 2)
    try:
        ref.encode(to(inp["images"]))
        out = ref.decode(to(inp["latents"])).sample
    finally:
        for h in hooks:
            h.remove()
    sink("output", _frames(out.clamp(-1, 1)))


def _vae_head(m, x):
    return m.conv_out(jax.nn.silu(m.conv_norm_out(x)))


def flux_vae_run_jax(model, inp, dtype, sink):
    put = lambda name, a: sink(name, np.asarray(a, np.float32))
    enc, dec = model.encoder, model.decoder
    x = call(enc.conv_in, _apply, inp["images"][:, None])
    put("encoder.conv_in", x)
    for i, blk in enumerate(enc.down_blocks):
        x = call(blk, _apply, x)
        put(f"encoder.down_blocks.{i}", x)
    x = call(enc.mid_block, _apply, x)
    put("encoder.mid_block", x)
    put("encoder.conv_out", call(enc, _vae_head, x))
    x = call(dec.conv_in, _apply, jnp.asarray(inp["latents"][:, None], dtype))
    put("decoder.conv_in", x)
    x = call(dec.mid_block, _apply, x)
    put("decoder.mid_block", x)
    for i, blk in enumerate(dec.up_blocks):
        x = call(blk, _apply, x)
        put(f"decoder.up_blocks.{i}", x)
    x = call(dec, _vae_head, x)
    put("decoder.conv_out", x)
    put("output", jnp.clip(x.astype(jnp.float32), -1.0, 1.0))


ADAPTERS = (
    Adapter("t5", "1x512", "BATCHxTOKENS", _tokens, t5_reference, umt5_inputs, umt5_run_torch, umt5_run_jax),
    Adapter("clip_l", "1x77", "BATCHxTOKENS (at most the model's 77 positions)", _tokens, clip_l_reference,
            clip_l_inputs, clip_l_run_torch, clip_l_run_jax),
    Adapter("flux_vae", "1x512x512", "BATCHxHEIGHTxWIDTH in pixels (multiples of 8)", _image_size,
            flux_vae_reference, flux_vae_inputs, flux_vae_run_torch, flux_vae_run_jax),
)
