"""The whole Flux text-to-image path at tiny sizes against diffusers' FluxPipeline built from the same random
weights (T5EncoderModel, CLIPTextModel, FluxTransformer2DModel, AutoencoderKL, the Flux scheduler): same prompt,
same initial latents; and the embedding cache round trip of the conditioner."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from converters import load_clip_text, load_flux_dit, load_flux_vae, load_t5
from converters.tokenizer import load_tokenizer
from omnijax.conditioning import EmbeddingCache
from omnijax.models.flux import variant
from omnijax.models.flux.clip_text import clip_text_variant
from omnijax.models.flux.pipeline import FluxConditioner, decode_latents, latent_size, sample_latents
from omnijax.models.flux.vae import flux_vae_variant, pack_latents
from tests.encoder_refs import tiny_tokenizer_dir
from tests.models.flux.refs import diffusers_flux
from tests.models.flux.test_text_encoders import hf_clip_text, hf_t5
from tests.models.flux.test_vae import hf_vae
from tests.torch_refs import rel_err, to_numpy_state

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)
T5_LEN, SIZE, STEPS = 24, 32, 3
PROMPTS = ["a red car drives through a tunnel", "an empty room with white walls"]


@pytest.fixture(scope="module")
def world():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    t5, clip, vae = hf_t5(), hf_clip_text(eos_token_id=1), hf_vae()
    dit = diffusers_flux(in_channels=64, pooled_projection_dim=32)
    tok = load_tokenizer(tiny_tokenizer_dir())
    clip_tok = load_tokenizer(tiny_tokenizer_dir())
    clip_tok.model_max_length = 77  # diffusers pads CLIP prompts to the tokenizer's model_max_length
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                            base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                            max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=sched, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
                        tokenizer_2=tok, transformer=dit)
    ours = dict(t5=load_t5(to_numpy_state(t5), **F32)[1],
                clip=load_clip_text(to_numpy_state(clip), clip_text_variant("tiny"), **F32)[1],
                vae=load_flux_vae(to_numpy_state(vae), flux_vae_variant("tiny"), **F32)[1],
                dit=load_flux_dit(to_numpy_state(dit), variant("tiny", in_channels=64, out_channels=64, vec_in_dim=32),
                                  **F32)[1], tok=tok, clip_tok=clip_tok)
    return pipe, ours


def test_text_to_image_equals_diffusers(world, tmp_path):
    pipe, o = world
    cond = FluxConditioner(EmbeddingCache(str(tmp_path)), o["t5"], o["tok"], o["clip"], o["clip_tok"], T5_LEN)
    txt, y = cond(PROMPTS)
    with torch.no_grad():
        want_txt, want_y, _ = pipe.encode_prompt(PROMPTS, PROMPTS, max_sequence_length=T5_LEN)
    assert rel_err(txt, want_txt.numpy()) <= 1e-5 and rel_err(y, want_y.numpy()) <= 1e-5

    h, w = latent_size(o["vae"].config, SIZE, SIZE)
    packed = sample_latents(o["dit"], txt, y, h=h, w=w, num_steps=STEPS, guidance=3.5, seed=5)
    # The same initial latents for diffusers: the sampler's noise is N(0, 1) from jax.random.key(seed), packed.
    noise = jax.random.normal(jax.random.key(5), (2, (h // 2) * (w // 2), 64), jnp.float32)
    kw = dict(prompt=PROMPTS, height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
              latents=torch.from_numpy(np.array(noise)), max_sequence_length=T5_LEN)
    with torch.no_grad():
        want_latents = pipe(**kw, output_type="latent").images.numpy()
        want_images = pipe(**kw, output_type="np").images
    assert rel_err(packed, want_latents) <= 1e-4, rel_err(packed, want_latents)
    images = decode_latents(o["vae"], packed, h=h, w=w, tile=None)
    assert images.shape == (2, SIZE, SIZE, 3)
    assert rel_err((images + 1) / 2, want_images) <= 1e-4, rel_err((images + 1) / 2, want_images)


def test_conditioner_cache_round_trip(world, tmp_path):
    _, o = world
    cache = EmbeddingCache(str(tmp_path))
    cond = FluxConditioner(cache, o["t5"], o["tok"], o["clip"], o["clip_tok"], T5_LEN)
    txt, y = cond(PROMPTS)
    ids = cond.identities()
    # A later run with only the identities (no encoders loaded) reads the same arrays back.
    again = FluxConditioner(cache, max_length=T5_LEN, t5_id=ids[0], clip_id=ids[1])(PROMPTS[::-1])
    np.testing.assert_array_equal(again[0], txt[::-1])
    np.testing.assert_array_equal(again[1], y[::-1])
    with pytest.raises(ValueError, match="not cached"):
        FluxConditioner(cache, max_length=T5_LEN, t5_id=ids[0], clip_id=ids[1])(["a prompt never seen"])


def test_pack_of_vae_latents_and_bad_sizes(world):
    _, o = world
    with pytest.raises(ValueError, match="multiple of 4"):
        latent_size(o["vae"].config, 30, 32)
    packed = jax.eval_shape(lambda x: pack_latents(o["vae"].encode(x)), jax.ShapeDtypeStruct((1, SIZE, SIZE, 3),
                                                                                            jnp.float32))
    assert packed.shape == (1, (SIZE // 4) ** 2, 64)


@pytest.mark.parametrize("kind", ["flux_vae", "t5", "clip_l"])
def test_converted_folders_round_trip(kind, tmp_path):
    """launch/convert.py's output for the new kinds restores to the same parameters and config."""
    from omnijax.checkpoint import load_pretrained, save_pretrained
    from omnijax.models.flux.pipeline import tiny_components
    from omnijax.params import flat_params

    _, vae, t5, clip = tiny_components(seed=1)
    model = {"flux_vae": vae, "t5": t5, "clip_l": clip}[kind]
    save_pretrained(str(tmp_path / kind), model, kind)
    config, back = load_pretrained(str(tmp_path / kind), kind=kind, **F32)
    assert config == model.config
    want = {k: np.asarray(v.get_value()) for k, v in flat_params(model).items()}
    got = {k: np.asarray(v.get_value()) for k, v in flat_params(back).items()}
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
