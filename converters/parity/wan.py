"""Parity adapters for the Wan2.1 kinds: wan_dit, wan_vae (diffusers references), umt5, wan_clip (transformers).

References, built by the ecosystem's own loaders from the same files:
  wan_dit   diffusers WanTransformer3DModel: `from_pretrained` for a diffusers folder (config.json with
            _class_name WanTransformer3DModel); original Wan / VideoX-Fun / ComfyUI files (or a state dict) go
            through diffusers' single-file converter (`convert_wan_transformer_to_diffusers`, what
            `from_single_file` runs) into a model whose size is read from the weight shapes (heads from a
            config.json beside the weights, else dim / 128 as in every Wan release).
  wan_vae   diffusers AutoencoderKLWan, likewise (`convert_wan_vae_to_diffusers` for Wan2.1_VAE.pth).
  umt5      transformers UMT5EncoderModel.from_pretrained: a transformers-format folder (the text_encoder/ of a
            Wan2.1 *-Diffusers repo). Wan's own models_t5_umt5-xxl-enc-bf16.pth has no loader outside Wan's
            code, so it is refused with that explanation.
  wan_clip  transformers CLIPVisionModel.from_pretrained (the image_encoder/ of a Wan2.1 I2V *-Diffusers repo);
            Wan's open-clip .pth is refused the same way. Wan uses the output of the penultimate block
            (use_31_block), so "output" is hidden_states[num_layers - 1].

Stages (forward order; the JAX side runs the model's public pieces one jitted call at a time):
  wan_dit   patch_embedding, time_embedding, time_projection, text_embedding, [image_embedding], blocks.i, output
  wan_vae   encoder.conv_in, encoder.down_blocks.i, encoder.mid_block, encoder.conv_out, moments (quant_conv),
            post_quant_conv, decoder.conv_in, decoder.mid_block, decoder.up_blocks.i, decoder.conv_out, output
            (the decoder runs on seeded latents, so it is checked independently of the encoder)
  umt5      token_embedding, blocks.i, output (after the final norm)
  wan_clip  embed, pre_norm, blocks.i, output
Tensors are compared channels-last ([B, T, H, W, C]; tokens [B, L, D]).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from converters.parity import Adapter, ReferenceBuildError
from omnijax.layers.attention import attention

# ---- shared helpers -------------------------------------------------------------------------------------------


@partial(jax.jit, static_argnums=(0, 1))
def _jitted(graphdef, fn, state, *args):
    return fn(nnx.merge(graphdef, state), *args)


def call(module, fn, *args):
    """fn(module, *args) under jit. `fn` must be a module-level function: modules of one structure (the blocks)
    share a graphdef, so they share one compiled program."""
    graphdef, state = nnx.split(module)
    return _jitted(graphdef, fn, state, *args)


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def _last(t):
    """[B, C, T, H, W] (torch) -> channels-last numpy."""
    return _np(t.permute(0, 2, 3, 4, 1))


def _read_config(source) -> dict:
    if not isinstance(source, str):
        return {}
    d = source if os.path.isdir(source) else os.path.dirname(source)
    path = os.path.join(d, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    return {}


def _is_class(source, name: str) -> bool:
    return isinstance(source, str) and os.path.isdir(source) and _read_config(source).get("_class_name") == name


def torch_state(source) -> dict:
    """{key: torch tensor} from a mapping, a .safetensors file, a folder of them, or a .pth (weights-only)."""
    import torch

    if isinstance(source, Mapping):
        return {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.asarray(v, np.float32))
                for k, v in source.items()}
    from safetensors.torch import load_file

    path = os.fspath(source)
    if not os.path.exists(path):
        raise ReferenceBuildError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if files:
            out = {}
            for f in files:
                out.update(load_file(os.path.join(path, f)))
            return out
        pth = sorted(f for f in os.listdir(path) if f.endswith((".pth", ".pt", ".bin")))
        if len(pth) != 1:
            raise ReferenceBuildError(f"{path}: no .safetensors files and not exactly one .pth")
        path = os.path.join(path, pth[0])
    if path.endswith(".safetensors"):
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return sd.get("state_dict", sd)


def _build(cls, kwargs, state, device):
    import torch

    with torch.device(device):
        model = cls(**kwargs)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ReferenceBuildError(f"the {cls.__name__} reference does not take these weights: missing "
                                  f"{sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    return model.float().eval()


def _grid(size: str, spatial: int, name: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size for {name} is FRAMESxHEIGHTxWIDTH (e.g. 81x480x832), got {size!r}") from None
    if f < 1 or (f - 1) % 4 or h % spatial or w % spatial or min(h, w) <= 0:
        raise ValueError(f"--size {size}: {name} needs 4k+1 frames and height/width multiples of {spatial}")
    return f, h, w


# ---- wan_dit ----------------------------------------------------------------------------------------------------

def _dit_kwargs(sd: Mapping, cfg: dict) -> dict:
    """WanTransformer3DModel arguments from diffusers-named weight shapes (+ heads/eps from a config.json)."""
    def shape(k):
        if k not in sd:
            raise ReferenceBuildError(f"the Wan DiT reference cannot be sized: no weight {k!r}")
        return tuple(sd[k].shape)

    dim, cin, *patch = shape("patch_embedding.weight")
    heads = cfg.get("num_heads") or cfg.get("num_attention_heads")
    if heads is None:
        if dim % 128:
            raise ReferenceBuildError(f"cannot tell the head count of a {dim}-wide DiT: put a config.json with "
                                      "num_heads beside the weights")
        heads = dim // 128
    i2v = "condition_embedder.image_embedder.norm1.weight" in sd
    kw = dict(patch_size=tuple(patch), num_attention_heads=int(heads), attention_head_dim=dim // int(heads),
              in_channels=cin, out_channels=shape("proj_out.weight")[0] // math.prod(patch),
              text_dim=shape("condition_embedder.text_embedder.linear_1.weight")[1],
              freq_dim=shape("condition_embedder.time_embedder.linear_1.weight")[1],
              ffn_dim=shape("blocks.0.ffn.net.0.proj.weight")[0],
              num_layers=1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks.")),
              cross_attn_norm="blocks.0.norm2.weight" in sd, qk_norm="rms_norm_across_heads",
              eps=float(cfg.get("eps", 1e-6)),
              image_dim=shape("condition_embedder.image_embedder.norm1.weight")[0] if i2v else None,
              added_kv_proj_dim=dim if i2v else None, rope_max_seq_len=1024)
    if "condition_embedder.image_embedder.pos_embed" in sd:
        kw["pos_embed_seq_len"] = shape("condition_embedder.image_embedder.pos_embed")[1]
    return kw


def dit_reference(source, device, config=None):
    import torch
    from diffusers import WanTransformer3DModel

    if _is_class(source, "WanTransformer3DModel"):
        return WanTransformer3DModel.from_pretrained(source, torch_dtype=torch.float32).to(device).eval()
    sd = torch_state(source)
    if any(k.endswith("head.modulation") for k in sd):  # original Wan / VideoX-Fun / ComfyUI names
        from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

        sd = convert_wan_transformer_to_diffusers(dict(sd))
    return _build(WanTransformer3DModel, _dit_kwargs(sd, {**_read_config(source), **(config or {})}), sd, device)


def dit_inputs(ref, size, seed):
    f, h, w = size
    c = ref.config
    r = np.random.default_rng(seed)
    t, lh, lw = (f - 1) // 4 + 1, h // 8, w // 8
    extra = c.in_channels - c.out_channels
    return dict(latents=r.standard_normal((1, t, lh, lw, c.out_channels), np.float32),
                y=r.standard_normal((1, t, lh, lw, extra), np.float32) if extra else None,
                context=r.standard_normal((1, 512, c.text_dim), np.float32),  # Wan's text_len, every row used
                clip=r.standard_normal((1, 257, c.image_dim), np.float32) if c.image_dim else None,
                timesteps=np.array([r.uniform(0, 1000)], np.float32))


def dit_run_torch(ref, inp, dtype, device, sink):
    import torch

    x = inp["latents"] if inp["y"] is None else np.concatenate([inp["latents"], inp["y"]], -1)
    to = lambda a: None if a is None else torch.from_numpy(a).to(device, dtype)

    def cond_hook(_, __, out):
        temb, proj, text, image = out
        sink("time_embedding", _np(temb))
        sink("time_projection", _np(proj))
        sink("text_embedding", _np(text))
        if image is not None:
            sink("image_embedding", _np(image))

    hooks = [ref.patch_embedding.register_forward_hook(
                 lambda _, __, out: sink("patch_embedding", _np(out.flatten(2).transpose(1, 2)))),
             ref.condition_embedder.register_forward_hook(cond_hook)]
    for i, blk in enumerate(ref.blocks):
        hooks.append(blk.register_forward_hook(lambda _, __, out, i=i: sink(f"blocks.{i}", _np(out))))
    try:
        out = ref(to(x).permute(0, 4, 1, 2, 3), torch.from_numpy(inp["timesteps"]).to(device), to(inp["context"]),
                  encoder_hidden_states_image=to(inp["clip"])).sample
    finally:
        for h in hooks:
            h.remove()
    sink("output", _last(out))


def chunked_attention(q, k, v, max_scores: int = 2**30):
    """XLA attention over query chunks of at most `max_scores` logits: the same per-row softmax as one call, but
    f32 at 32k tokens does not materialise a 50 GB score matrix (f32 has no fused kernel on the GPU)."""
    b, l, n, d = q.shape
    chunk = max(1, max_scores // (b * n * k.shape[1]))
    if chunk >= l:
        return attention(q, k, v, backend="xla")
    pad = -l % chunk
    qc = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(b, -1, chunk, n, d).swapaxes(0, 1)
    out = jax.lax.map(lambda x: attention(x, k, v, backend="xla"), qc)
    return out.swapaxes(0, 1).reshape(b, l + pad, n, d)[:, :l]


def _self_attention(q, k, v):
    return chunked_attention(q, k, v) if q.dtype == jnp.float32 else attention(q, k, v, backend="auto")


def _dit_embed(m, latents, y):
    x, rope, _ = m.embed(latents, y)
    return x, rope


def _dit_condition(m, timesteps, context, clip):
    return m(timesteps, context, clip)


def _dit_block(blk, x, e0, text, image, cos, sin):
    return blk(x, e0, text, image, cos, sin, attn_fn=_self_attention, backend="auto")


def _dit_head(m, x, e):
    return m(x, e)


def dit_run_jax(model, inp, dtype, sink):
    x, (cos, sin) = call(model, _dit_embed, inp["latents"], inp["y"])
    sink("patch_embedding", np.asarray(x, np.float32))
    e, e0, text, image = call(model.condition, _dit_condition, inp["timesteps"], inp["context"], inp["clip"])
    sink("time_embedding", np.asarray(e, np.float32))
    sink("time_projection", np.asarray(e0, np.float32).reshape(e0.shape[0], -1))
    sink("text_embedding", np.asarray(text, np.float32))
    if image is not None:
        sink("image_embedding", np.asarray(image, np.float32))
    for i, blk in enumerate(model.blocks):
        x = call(blk, _dit_block, x, e0, text, image, cos, sin)
        sink(f"blocks.{i}", np.asarray(x, np.float32))
    pt, ph, pw = model.config.patch_size
    _, t, h, w, _ = inp["latents"].shape
    out = model.unpatchify(call(model.head, _dit_head, x, e), (t // pt, h // ph, w // pw))
    sink("output", np.asarray(out, np.float32))


# ---- wan_vae ----------------------------------------------------------------------------------------------------

def vae_reference(source, device, config=None):
    import torch
    from diffusers import AutoencoderKLWan

    if _is_class(source, "AutoencoderKLWan"):
        return AutoencoderKLWan.from_pretrained(source, torch_dtype=torch.float32).to(device).eval()
    sd = torch_state(source)
    if "decoder.middle.0.residual.0.gamma" in sd:  # Wan2.1_VAE.pth names
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        sd = convert_wan_vae_to_diffusers(dict(sd))
    for k in ("encoder.conv_in.weight", "decoder.conv_in.weight"):
        if k not in sd:
            raise ReferenceBuildError(f"the Wan VAE reference cannot be sized: no weight {k!r}")
    kw = dict(base_dim=sd["encoder.conv_in.weight"].shape[0], z_dim=sd["decoder.conv_in.weight"].shape[1])
    return _build(AutoencoderKLWan, kw, sd, device)


def vae_inputs(ref, size, seed):
    f, h, w = size
    r = np.random.default_rng(seed)
    return dict(video=r.uniform(-1, 1, (1, f, h, w, 3)).astype(np.float32),
                latents=r.standard_normal((1, (f - 1) // 4 + 1, h // 8, w // 8, ref.config.z_dim), np.float32))


def _vae_stages(ref):
    enc, dec = ref.encoder, ref.decoder
    return ([("encoder.conv_in", enc.conv_in)]
            + [(f"encoder.down_blocks.{i}", m) for i, m in enumerate(enc.down_blocks)]
            + [("encoder.mid_block", enc.mid_block), ("encoder.conv_out", enc.conv_out), ("moments", ref.quant_conv),
               ("post_quant_conv", ref.post_quant_conv), ("decoder.conv_in", dec.conv_in),
               ("decoder.mid_block", dec.mid_block)]
            + [(f"decoder.up_blocks.{i}", m) for i, m in enumerate(dec.up_blocks)]
            + [("decoder.conv_out", dec.conv_out)])


def vae_run_torch(ref, inp, dtype, device, sink):
    """diffusers encodes 1 + 4 + 4 ... frames and decodes one latent frame per call, carrying causal caches: a
    stage's hook fires once per chunk, and the chunks joined on T are the stage's whole-clip output."""
    import torch

    chunks = {}
    hooks = []
    for name, mod in _vae_stages(ref):
        chunks[name] = []
        hooks.append(mod.register_forward_hook(lambda _, __, out, name=name: chunks[name].append(out.float().cpu())))
    to = lambda a: torch.from_numpy(a).to(device, dtype).permute(0, 4, 1, 2, 3)
    try:
        ref.encode(to(inp["video"]))
        out = ref.decode(to(inp["latents"])).sample
    finally:
        for h in hooks:
            h.remove()
    for name, parts in chunks.items():
        sink(name, _last(torch.cat(parts, dim=2)))
    sink("output", _last(out))


def _vae_stage(m, x):
    return m(x, None)[0]


def _vae_valid(m, x):
    return m.valid(x)


def _vae_head(m, x):
    return m.conv_out(jax.nn.silu(m.norm_out(x)), None)[0]


def vae_run_jax(model, inp, dtype, sink):
    put = lambda name, a: sink(name, np.asarray(a, np.float32))
    enc, dec = model.encoder, model.decoder
    x = call(enc.conv_in, _vae_stage, inp["video"])
    put("encoder.conv_in", x)
    for i, layer in enumerate(enc.down_blocks):
        x = call(layer, _vae_stage, x)
        put(f"encoder.down_blocks.{i}", x)
    x = call(enc.mid_block, _vae_stage, x)
    put("encoder.mid_block", x)
    x = call(enc, _vae_head, x)
    put("encoder.conv_out", x)
    put("moments", call(model.quant_conv, _vae_valid, x))
    x = call(model.post_quant_conv, _vae_valid, jnp.asarray(inp["latents"], dtype))
    put("post_quant_conv", x)
    x = call(dec.conv_in, _vae_stage, x)
    put("decoder.conv_in", x)
    x = call(dec.mid_block, _vae_stage, x)
    put("decoder.mid_block", x)
    for i, blk in enumerate(dec.up_blocks):
        x = call(blk, _vae_stage, x)
        put(f"decoder.up_blocks.{i}", x)
    x = call(dec, _vae_head, x)
    put("decoder.conv_out", x)
    put("output", jnp.clip(x.astype(jnp.float32), -1.0, 1.0))


# ---- umt5 -------------------------------------------------------------------------------------------------------

def _transformers_dir(source, what: str, example: str):
    if not (isinstance(source, str) and os.path.isdir(source) and os.path.isfile(os.path.join(source,
                                                                                              "config.json"))):
        raise ReferenceBuildError(
            f"the {what} reference is transformers' model, which reads transformers-format folders (config.json + "
            f"weights, e.g. {example}); Wan's own .pth has no PyTorch loader outside Wan's code. Got {source!r}")
    return source


def umt5_reference(source, device, config=None):
    import torch
    from transformers import UMT5EncoderModel

    path = _transformers_dir(source, "umT5", "the text_encoder/ folder of a Wan2.1 *-Diffusers repo")
    return UMT5EncoderModel.from_pretrained(path, dtype=torch.float32).to(device).eval()


def _tokens(size: str) -> tuple[int, int]:
    try:
        b, n = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--size for umt5 is BATCHxTOKENS (e.g. 2x512), got {size!r}") from None
    if b < 1 or n < 1:
        raise ValueError(f"--size {size}: batch and tokens must be positive")
    return b, n


def umt5_inputs(ref, size, seed):
    b, n = size
    r = np.random.default_rng(seed)
    ids = r.integers(2, ref.config.vocab_size, (b, n))
    mask = np.zeros((b, n), np.int32)
    for i in range(b):  # prompts shorter than the padded length, as Wan pads every prompt to 512
        mask[i, :r.integers(max(1, n // 4), n + 1)] = 1
    return dict(ids=ids.astype(np.int32), mask=mask)


def umt5_run_torch(ref, inp, dtype, device, sink):
    import torch

    enc = ref.encoder
    hooks = [enc.embed_tokens.register_forward_hook(lambda _, __, out: sink("token_embedding", _np(out)))]
    for i, blk in enumerate(enc.block):
        hooks.append(blk.register_forward_hook(
            lambda _, __, out, i=i: sink(f"blocks.{i}", _np(out[0] if isinstance(out, tuple) else out))))
    try:
        out = ref(input_ids=torch.from_numpy(inp["ids"]).long().to(device),
                  attention_mask=torch.from_numpy(inp["mask"]).long().to(device)).last_hidden_state
    finally:
        for h in hooks:
            h.remove()
    sink("output", _np(out))


def _apply(m, x):
    return m(x)


def _umt5_block(blk, x, key_mask, bias):
    return blk(x, key_mask, bias)


def umt5_run_jax(model, inp, dtype, sink):
    """Also T5 v1.1 (kind t5): its blocks after the first reuse layer 0's position bias, as the encoder does."""
    x = call(model.token_embedding, _apply, inp["ids"])
    sink("token_embedding", np.asarray(x, np.float32))
    key_mask = inp["mask"] != 0
    bias = None
    for i, blk in enumerate(model.blocks):
        if blk.attn.pos_embedding is not None:
            bias = blk.attn.position_bias(inp["ids"].shape[1])
        x = call(blk, _umt5_block, x, key_mask, bias)
        sink(f"blocks.{i}", np.asarray(x, np.float32))
    sink("output", np.asarray(call(model.norm, _apply, x), np.float32))


# ---- wan_clip ---------------------------------------------------------------------------------------------------

def clip_reference(source, device, config=None):
    import torch
    from transformers import CLIPVisionModel

    path = _transformers_dir(source, "CLIP", "the image_encoder/ folder of a Wan2.1 I2V *-Diffusers repo")
    return CLIPVisionModel.from_pretrained(path, dtype=torch.float32).to(device).eval()


def _images(size: str) -> tuple[int]:
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"--size for wan_clip is the number of images (e.g. 1), got {size!r}")
    return (int(size),)


def clip_inputs(ref, size, seed):
    s = ref.config.image_size
    return dict(pixels=np.random.default_rng(seed).standard_normal((size[0], s, s, 3), np.float32))


def clip_run_torch(ref, inp, dtype, device, sink):
    import torch

    vm = getattr(ref, "vision_model", ref)  # transformers 5 flattened the wrapper
    hook = vm.embeddings.register_forward_hook(lambda _, __, out: sink("embed", _np(out)))
    try:
        pixels = torch.from_numpy(inp["pixels"]).permute(0, 3, 1, 2).to(device, dtype)
        hidden = ref(pixel_values=pixels, output_hidden_states=True).hidden_states
    finally:
        hook.remove()
    sink("pre_norm", _np(hidden[0]))  # hidden_states[k]: after k blocks (0: the pre-norm output)
    n = len(hidden) - 1
    for i in range(n - 1):  # Wan stops one block early (use_31_block)
        sink(f"blocks.{i}", _np(hidden[i + 1]))
    sink("output", _np(hidden[n - 1]))


def _clip_embed(m, pixels):
    return m.embed(pixels)


def clip_run_jax(model, inp, dtype, sink):
    x = call(model, _clip_embed, inp["pixels"])
    sink("embed", np.asarray(x, np.float32))
    x = call(model.pre_norm, _apply, x)
    sink("pre_norm", np.asarray(x, np.float32))
    for i, blk in enumerate(model.blocks):
        x = call(blk, _apply, x)
        sink(f"blocks.{i}", np.asarray(x, np.float32))
    sink("output", np.asarray(x, np.float32))


ADAPTERS = (
    Adapter("wan_dit", "81x480x832", "FRAMESxHEIGHTxWIDTH in pixels (4k+1 frames, multiples of 16)",
            lambda s: _grid(s, 16, "wan_dit"), dit_reference, dit_inputs, dit_run_torch, dit_run_jax,
            f32_stage_tol={"time_embedding": 1e-4, "time_projection": 1e-4}),  # sinusoid rounding (see __init__)
    Adapter("wan_vae", "17x256x256", "FRAMESxHEIGHTxWIDTH in pixels (4k+1 frames, multiples of 8)",
            lambda s: _grid(s, 8, "wan_vae"), vae_reference, vae_inputs, vae_run_torch, vae_run_jax),
    Adapter("umt5", "1x512", "BATCHxTOKENS", _tokens, umt5_reference, umt5_inputs, umt5_run_torch, umt5_run_jax),
    Adapter("wan_clip", "1", "number of images (the size is the model's, 224)", _images, clip_reference,
            clip_inputs, clip_run_torch, clip_run_jax),
)
