"""Flux's text encoders against transformers (tiny, random, f32): T5 v1.1 (T5EncoderModel, gated-gelu, one shared
relative-position table) and the CLIP text tower (CLIPTextModel: hidden states and the EOS-pooled output)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters import load_clip_text, load_t5
from converters.tokenizer import load_tokenizer
from omnijax.models.flux.clip_text import CLIPTextModel, clip_text_variant, encode_pooled
from omnijax.models.wan.umt5 import UMT5Encoder, umt5_variant
from omnijax.params import count_params
from tests.encoder_refs import tiny_tokenizer_dir
from tests.torch_refs import randomize_, rel_err, to_numpy_state


def hf_t5(seed=0):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=1024, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=32, relative_attention_max_distance=128,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    torch.manual_seed(seed)
    return randomize_(T5EncoderModel(cfg), seed=seed).eval()


def hf_clip_text(eos_token_id, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                         eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    return randomize_(CLIPTextModel(cfg), seed=seed).eval()


def _t5_ids(lens, length):
    rng = np.random.default_rng(1)
    ids = rng.integers(2, 1024, (len(lens), length))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
        ids[i, n:] = 0
    return ids, mask


@pytest.fixture(scope="module")
def t5_pair():
    ref = hf_t5()
    config, model = load_t5(to_numpy_state(ref), dtype=jnp.float32, param_dtype=jnp.float32)
    assert config == umt5_variant("tiny-t5")  # the shared bias layout is read from the weights
    return ref, model


@pytest.mark.parametrize("with_mask", [True, False])  # Flux runs T5 without a mask over the padded 512 tokens
def test_t5_parity_padded_batch(t5_pair, with_mask):
    ref, model = t5_pair
    ids, mask = _t5_ids((300, 170), 300)  # 300 > max_distance 128: the log buckets are used
    with torch.no_grad():
        want = ref(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask) if with_mask else None
                   ).last_hidden_state.numpy()
    run = jax.jit(lambda m, a, b: m(a, b))
    got = np.asarray(run(model, jnp.asarray(ids), jnp.asarray(mask) if with_mask else None))
    assert rel_err(got, want) <= 1e-5, rel_err(got, want)


def test_t5_xxl_param_count_matches_transformers():
    from transformers import T5Config, T5EncoderModel

    abstract = nnx.eval_shape(lambda: UMT5Encoder(umt5_variant("t5-v1.1-xxl"), rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                      num_heads=64, feed_forward_proj="gated-gelu"))
    assert count_params(abstract) == sum(p.numel() for p in ref.parameters())
    assert abstract.blocks[1].attn.pos_embedding is None


def _clip_ids(eos, pad):
    rng = np.random.default_rng(2)
    ids = rng.integers(3, 900, (3, 77))
    for i, n in enumerate((5, 40, 76)):
        ids[i, n] = eos
        ids[i, n + 1:] = pad
    return ids


@pytest.mark.parametrize("eos_token_id", [2, 1])  # 2: CLIP-L's legacy config (pool at argmax id); 1: first EOS
def test_clip_text_parity(eos_token_id):
    ref = hf_clip_text(eos_token_id)
    config = clip_text_variant("tiny", eos_token_id=eos_token_id)
    _, model = load_clip_text({f"text_model.{k}": v for k, v in to_numpy_state(ref).items()}, config,
                              dtype=jnp.float32, param_dtype=jnp.float32)
    # Legacy: EOS is the vocabulary's largest id and also pads (as openai's tokenizer does); else EOS 1, pad 0.
    ids = _clip_ids(1000, 1000) if eos_token_id == 2 else _clip_ids(1, 0)
    with torch.no_grad():
        out = ref(input_ids=torch.as_tensor(ids))
    hidden, pooled = jax.jit(lambda m, a: m(a))(model, jnp.asarray(ids, jnp.int32))
    assert rel_err(hidden, out.last_hidden_state.numpy()) <= 1e-5
    assert rel_err(pooled, out.pooler_output.numpy()) <= 1e-5


def test_clip_encode_pooled_with_tokenizer():
    ref = hf_clip_text(1)
    _, model = load_clip_text(to_numpy_state(ref), clip_text_variant("tiny"), dtype=jnp.float32,
                              param_dtype=jnp.float32)
    tok = load_tokenizer(tiny_tokenizer_dir())
    prompts = ["a red car drives through a tunnel", ""]
    got = encode_pooled(model, tok, prompts)
    ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = ref(input_ids=ids).pooler_output.numpy()
    assert got.shape == (2, 32)
    assert rel_err(got, want) <= 1e-5


def test_clip_l_shapes_and_bad_inputs():
    abstract = nnx.eval_shape(lambda: CLIPTextModel(clip_text_variant("clip-l"), rngs=nnx.Rngs(0)))
    assert count_params(abstract) == 123_060_480  # openai/clip-vit-large-patch14 text model
    model = CLIPTextModel(clip_text_variant("tiny"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="exceed"):
        model(jnp.zeros((1, 78), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 7), jnp.float32))
