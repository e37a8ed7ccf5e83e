"""Tiny random transformers references for the conditioning encoders, built inside tests (nothing is downloaded)."""

from __future__ import annotations

import functools
import tempfile

import torch

from tests.torch_refs import randomize_


def hf_umt5(*, layers=2, d_model=32, heads=4, d_kv=8, d_ff=64, vocab=1024, full=False, seed=0):
    """A random UMT5EncoderModel (or the full UMT5Model with a decoder when full=True), f32, eval mode."""
    from transformers import UMT5Config, UMT5EncoderModel, UMT5Model

    cfg = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers, num_heads=heads,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0, num_decoder_layers=1)
    torch.manual_seed(seed)
    model = (UMT5Model if full else UMT5EncoderModel)(cfg)
    return randomize_(model, seed=seed).eval()


def hf_clip_vision(*, layers=3, width=32, heads=4, mlp=64, act="gelu", seed=0):
    """A random transformers CLIPVisionModel at 224/14 (257 tokens), f32, eval mode."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(hidden_size=width, intermediate_size=mlp, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=224, patch_size=14, hidden_act=act,
                           layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    return randomize_(CLIPVisionModel(cfg), seed=seed).eval()


def umt5_reference(model, ids, mask):
    """last_hidden_state of a transformers UMT5 encoder, numpy [B, L, D]."""
    enc = model.get_encoder() if hasattr(model, "get_encoder") else model
    with torch.no_grad():
        return enc(input_ids=torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long()
                   ).last_hidden_state.numpy()


def clip_reference(model, pixels_nhwc, layer):
    """Hidden states after `layer` blocks of a transformers CLIPVisionModel, numpy [B, L, D]."""
    with torch.no_grad():
        out = model(pixel_values=torch.as_tensor(pixels_nhwc).permute(0, 3, 1, 2), output_hidden_states=True)
    return out.hidden_states[layer].numpy()


@functools.lru_cache(maxsize=1)
def tiny_tokenizer_dir() -> str:
    """A tiny T5-style tokenizer, trained once per test process."""
    from converters.tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer(tempfile.mkdtemp(prefix="omnijax-tok-") + "/tok")
