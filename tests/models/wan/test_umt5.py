"""UMT5Encoder against transformers' UMT5EncoderModel (tiny, random, f32), prompt encoding and full-size shapes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from converters import load_umt5
from converters.tokenizer import load_tokenizer
from omnijax.models.wan.umt5 import (
    UMT5Config,
    UMT5Encoder,
    encode_prompts,
    pad_text_context,
    relative_position_buckets,
    umt5_variant,
)
from omnijax.params import count_params
from tests.encoder_refs import hf_umt5, tiny_tokenizer_dir, umt5_reference
from tests.torch_refs import rel_err, to_numpy_state


@pytest.fixture(scope="module")
def pair():
    ref = hf_umt5()
    _, model = load_umt5(to_numpy_state(ref), umt5_variant("tiny"), dtype=jnp.float32, param_dtype=jnp.float32)
    return ref, model


@pytest.mark.parametrize("lens", [(300, 170), (9, 4)])  # 300 > max_distance 128: the log buckets are used
def test_parity_padded_batch(pair, lens):
    ref, model = pair
    rng = np.random.default_rng(1)
    ids = rng.integers(2, 1024, (2, lens[0]))
    mask = np.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
        ids[i, n:] = 0  # pad id
    want = umt5_reference(ref, ids, mask)
    got = np.asarray(jax.jit(lambda m, a, b: m(a, b))(model, jnp.asarray(ids), jnp.asarray(mask)))
    for i, n in enumerate(lens):
        assert rel_err(got[i, :n], want[i, :n]) <= 1e-5, (i, rel_err(got[i, :n], want[i, :n]))
    assert rel_err(got, want) <= 1e-5  # padded rows follow the same (key-masked) semantics


def test_buckets_match_transformers():
    from transformers.models.umt5.modeling_umt5 import UMT5Attention

    ref = hf_umt5(layers=1).encoder.block[0].layer[0].SelfAttention
    assert isinstance(ref, UMT5Attention)
    n = 700
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    want = ref._relative_position_bucket(rel).numpy()
    np.testing.assert_array_equal(relative_position_buckets(n, 32, 128), want)


def test_padding_does_not_change_real_rows(pair):
    _, model = pair
    run = jax.jit(lambda m, a, b: m(a, b))
    ids = np.random.default_rng(2).integers(2, 1024, (1, 20))
    short = np.asarray(run(model, jnp.asarray(ids), jnp.ones((1, 20), jnp.int32)))
    padded_ids = np.zeros((1, 96), np.int64)
    padded_ids[:, :20] = ids
    mask = (np.arange(96) < 20)[None].astype(np.int32)
    long = np.asarray(run(model, jnp.asarray(padded_ids), jnp.asarray(mask)))
    np.testing.assert_allclose(long[:, :20], short, rtol=1e-5, atol=1e-5)


def test_encode_prompts_cuts_to_true_length(pair):
    ref, model = pair
    tok = load_tokenizer(tiny_tokenizer_dir())
    prompts = ["a dog   walks on the beach &amp; waves", "", "the river flows under the old stone bridge"]
    got = encode_prompts(model, tok, prompts, max_length=64, batch_size=2)
    enc = tok(["a dog walks on the beach & waves", "", prompts[2]], padding="max_length", max_length=64,
              truncation=True, return_tensors="np")
    want = umt5_reference(ref, enc["input_ids"], enc["attention_mask"])
    lens = enc["attention_mask"].sum(1)
    assert lens[1] == 1  # the empty prompt is just EOS
    for g, w, n, ids in zip(got, want, lens, enc["input_ids"]):
        assert ids[n - 1] == tok.eos_token_id
        assert g.shape == (n, 32)
        assert rel_err(g, w[:n]) <= 1e-5
    ctx = pad_text_context(got)
    assert ctx.shape == (3, lens.max(), 32)
    np.testing.assert_array_equal(ctx[1, 1:], 0)
    np.testing.assert_array_equal(ctx[0, :lens[0]], got[0])
    assert pad_text_context(got, 512).shape == (3, 512, 32)
    with pytest.raises(ValueError, match="shorter"):
        pad_text_context(got, 2)


def test_bad_inputs(pair):
    _, model = pair
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((2, 4), jnp.float32))
    with pytest.raises(ValueError, match="attention_mask shape"):
        model(jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32))
    with pytest.raises(ValueError, match="unknown umT5 variant"):
        umt5_variant("base")
    with pytest.raises(ValueError, match="unknown UMT5Config fields"):
        UMT5Config.from_dict({"d_model": 8, "layers": 2})


def test_config_round_trip():
    cfg = umt5_variant("tiny")
    assert UMT5Config.from_dict(cfg.to_dict()) == cfg


def test_xxl_param_count_matches_transformers():
    from transformers import UMT5Config as HFConfig
    from transformers import UMT5EncoderModel

    cfg = umt5_variant("xxl")
    abstract = nnx.eval_shape(lambda: UMT5Encoder(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                                  rngs=nnx.Rngs(0)))
    with torch.device("meta"):
        ref = UMT5EncoderModel(HFConfig(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24,
                                        num_heads=64, feed_forward_proj="gated-gelu"))
    want = sum(p.numel() for p in ref.parameters())  # the tied embedding counts once
    assert count_params(abstract) == want
    assert abstract.blocks[0].attn.pos_embedding.embedding.get_value().shape == (32, 64)
