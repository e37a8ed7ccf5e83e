"""Parity adapters for the Flux.1 pipeline: flux_dit, t5, clip_l, flux_vae.

References (the ecosystem's own loaders, transformers / diffusers folders as the FLUX.1 repos ship them):
  flux_dit  diffusers FluxTransformer2DModel.from_pretrained (FLUX.1-dev/transformer); BFL's flux1-*.safetensors
            (or a state dict) through diffusers' single-file converter (full-size models only: it assumes the
            3072-wide model), sized from the weights; RoPE axes (16, 56, 56) unless a config says otherwise.
  t5        transformers T5EncoderModel.from_pretrained (FLUX.1-dev/text_encoder_2)
  clip_l    transformers CLIPTextModel.from_pretrained (FLUX.1-dev/text_encoder)
  flux_vae  diffusers AutoencoderKL.from_pretrained (FLUX.1-dev/vae); BFL's ae.safetensors needs a config that the
            weights do not carry, so it is refused with that explanation.

Stages:
  flux_dit  img_in, txt_in, vec (the modulation vector), double_blocks.i and single_blocks.i (the joint stream
            [txt; img]), output (velocity of the packed image tokens). Inputs: packed latents at
            (H/16)(W/16) tokens, 512 text tokens, ids as the Flux pipeline builds them, guidance 4 (dev).
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
    _build,
    _is_class,
    _np,
    _read_config,
    _tokens,
    _transformers_dir,
    call,
    torch_state,
    umt5_inputs,
    umt5_run_jax,
    umt5_run_torch,
)
from omnijax.layers.rope import nd_rope_angles
from omnijax.models.flux.dit import Layout

# ---- flux_dit ---------------------------------------------------------------------------------------------------


def _flux_kwargs(sd, cfg: dict) -> dict:
    """FluxTransformer2DModel arguments from diffusers-named weight shapes (+ RoPE axes from a config)."""
    def shape(k):
        if k not in sd:
            raise ReferenceBuildError(f"the Flux DiT reference cannot be sized: no weight {k!r}")
        return tuple(sd[k].shape)

    inner, cin = shape("x_embedder.weight")
    head = shape("transformer_blocks.0.attn.norm_q.weight")[0]
    count = lambda prefix: 1 + max(int(k.split(".")[1]) for k in sd if k.startswith(prefix))
    return dict(in_channels=cin, out_channels=shape("proj_out.weight")[0], num_layers=count("transformer_blocks."),
                num_single_layers=count("single_transformer_blocks."), attention_head_dim=head,
                num_attention_heads=inner // head, joint_attention_dim=shape("context_embedder.weight")[1],
                pooled_projection_dim=shape("time_text_embed.text_embedder.linear_1.weight")[1],
                guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in sd,
                axes_dims_rope=tuple(cfg.get("axes_dims_rope", (16, 56, 56))))


def flux_dit_reference(source, device, config=None):
    import torch
    from diffusers import FluxTransformer2DModel

    if _is_class(source, "FluxTransformer2DModel"):
        return FluxTransformer2DModel.from_pretrained(source, torch_dtype=torch.float32).to(device).eval()
    sd = torch_state(source)
    if any(k.endswith("double_blocks.0.img_attn.norm.key_norm.scale") for k in sd):  # BFL names
        from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

        sd = convert_flux_transformer_checkpoint_to_diffusers(dict(sd))
    kw = _flux_kwargs(sd, {**_read_config(source), **(config or {})})
    return _build(FluxTransformer2DModel, kw, sd, device)


def _flux_size(size: str) -> tuple[int, int, int]:
    try:
        b, h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size for flux_dit is BATCHxHEIGHTxWIDTH in pixels (e.g. 1x1024x1024), got {size!r}") \
            from None
    if b < 1 or h <= 0 or w <= 0 or h % 16 or w % 16:
        raise ValueError(f"--size {size}: flux_dit needs a positive batch and height/width multiples of 16")
    return b, h, w


def flux_dit_inputs(ref, size, seed):
    b, h, w = size
    c = ref.config
    r = np.random.default_rng(seed)
    gh, gw = h // 16, w // 16
    rows, cols = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    return dict(img=r.standard_normal((b, gh * gw, c.in_channels), np.float32),
                img_ids=np.stack([np.zeros(gh * gw), rows.ravel(), cols.ravel()], -1).astype(np.float32),
                txt=r.standard_normal((b, 512, c.joint_attention_dim), np.float32),
                txt_ids=np.zeros((512, 3), np.float32),
                # diffusers casts the timestep and guidance to the latents' dtype and multiplies by 1000 there: values
                # whose x1000 is exact in bf16, or the reference's own bf16 error is mostly its rounded timestep.
                timesteps=r.choice(np.array([0.125, 0.25, 0.5], np.float32), b),
                y=r.standard_normal((b, c.pooled_projection_dim), np.float32),
                guidance=np.full(b, 4.0, np.float32) if c.guidance_embeds else None)


def flux_dit_run_torch(ref, inp, dtype, device, sink):
    import torch

    joint = lambda out: _np(torch.cat([out[0], out[1]], dim=1))  # diffusers' blocks return (txt, img)
    hooks = [ref.x_embedder.register_forward_hook(lambda _, __, out: sink("img_in", _np(out))),
             ref.context_embedder.register_forward_hook(lambda _, __, out: sink("txt_in", _np(out))),
             ref.time_text_embed.register_forward_hook(lambda _, __, out: sink("vec", _np(out)))]
    for i, blk in enumerate(ref.transformer_blocks):
        hooks.append(blk.register_forward_hook(lambda _, __, out, i=i: sink(f"double_blocks.{i}", joint(out))))
    for i, blk in enumerate(ref.single_transformer_blocks):
        hooks.append(blk.register_forward_hook(lambda _, __, out, i=i: sink(f"single_blocks.{i}", joint(out))))
    t = lambda a, dt=dtype: None if a is None else torch.from_numpy(a).to(device, dt)
    try:
        out = ref(hidden_states=t(inp["img"]), encoder_hidden_states=t(inp["txt"]), pooled_projections=t(inp["y"]),
                  timestep=t(inp["timesteps"], torch.float32), img_ids=t(inp["img_ids"], torch.float32),
                  txt_ids=t(inp["txt_ids"], torch.float32), guidance=t(inp["guidance"], torch.float32),
                  return_dict=False)[0]
    finally:
        for h in hooks:
            h.remove()
    sink("output", _np(out))


def _layout(txt_len: int, img_len: int) -> Layout:
    """Plain Flux as FluxDiT.__call__ runs it: one image segment, LoRA switch on everywhere (no LoRA is passed)."""
    return Layout(txt_len=txt_len, bounds=((0, img_len),), lora_on=(True,), text_lora=True)


def _flux_prologue(m, img, img_ids, txt, txt_ids, timesteps, y, guidance):
    """The embeddings, the [text, image] modulation rows and RoPE of FluxDiT.forward_segments for one segment."""
    cfg = m.config
    t = timesteps.astype(jnp.float32)
    g = guidance.astype(jnp.float32) if cfg.guidance_embed else jnp.zeros_like(t)
    vec = m.vectors(jnp.stack([t, t]), jnp.stack([g, g]), y)
    angles = nd_rope_angles(jnp.concatenate([txt_ids, img_ids], axis=0)[None], cfg.axes_dim, cfg.theta)
    return m.img_in(img), m.txt_in(txt), vec, jnp.cos(angles), jnp.sin(angles)


def _flux_double(blk, img, txt, vec, cos, sin):
    img, txt = blk(img, txt, vec, (cos, sin), _layout(txt.shape[1], img.shape[1]), None, backend="auto")
    return img, txt


def _flux_single(blk, x, vec, cos, sin, txt_probe):
    return blk(x, vec, (cos, sin), _layout(txt_probe.shape[0], x.shape[1] - txt_probe.shape[0]), None,
               backend="auto")


def _flux_final(m, x, vec, txt_probe):
    s = txt_probe.shape[0]
    return m(x[:, s:], vec[1:], ((0, x.shape[1] - s),))


def flux_dit_run_jax(model, inp, dtype, sink):
    put = lambda name, a: sink(name, np.asarray(a, np.float32))
    guidance = inp["guidance"] if inp["guidance"] is not None else np.zeros_like(inp["timesteps"])
    img, txt, vec, cos, sin = call(model, _flux_prologue, inp["img"], inp["img_ids"], inp["txt"], inp["txt_ids"],
                                   inp["timesteps"], inp["y"], guidance)
    put("img_in", img)
    put("txt_in", txt)
    put("vec", vec[1])
    for i, blk in enumerate(model.double_blocks):
        img, txt = call(blk, _flux_double, img, txt, vec, cos, sin)
        put(f"double_blocks.{i}", jnp.concatenate([txt, img], axis=1))
    probe = jnp.zeros((txt.shape[1], 0))  # its static length tells the jitted block where the text ends
    x = jnp.concatenate([txt, img], axis=1)
    for i, blk in enumerate(model.single_blocks):
        x = call(blk, _flux_single, x, vec, cos, sin, probe)
        put(f"single_blocks.{i}", x)
    put("output", call(model.final_layer, _flux_final, x, vec, probe))


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
    Adapter("flux_dit", "1x1024x1024", "BATCHxHEIGHTxWIDTH in pixels (multiples of 16)", _flux_size,
            flux_dit_reference, flux_dit_inputs, flux_dit_run_torch, flux_dit_run_jax,
            f32_tol=1e-4),  # ill-conditioned sinusoids (converters/parity/__init__.py, Tolerances)
    Adapter("t5", "1x512", "BATCHxTOKENS", _tokens, t5_reference, umt5_inputs, umt5_run_torch, umt5_run_jax),
    Adapter("clip_l", "1x77", "BATCHxTOKENS (at most the model's 77 positions)", _tokens, clip_l_reference,
            clip_l_inputs, clip_l_run_torch, clip_l_run_jax),
    Adapter("flux_vae", "1x512x512", "BATCHxHEIGHTxWIDTH in pixels (multiples of 8)", _image_size,
            flux_vae_reference, flux_vae_inputs, flux_vae_run_torch, flux_vae_run_jax),
)
