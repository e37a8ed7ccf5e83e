"""EmbeddingCache / Conditioner: cached values equal direct computation, inputs and encoders key the entries."""

import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from converters.tokenizer import load_tokenizer
from omnijax.conditioning import (
    CacheError,
    Conditioner,
    EmbeddingCache,
    encoder_identity,
    fill_cache,
    read_safetensors,
    write_safetensors,
)
from omnijax.models.wan.clip import CLIPVisionTower, clip_variant, encode_frames
from omnijax.models.wan.umt5 import UMT5Encoder, encode_prompts, umt5_variant
from tests.encoder_refs import tiny_tokenizer_dir

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


@pytest.fixture(scope="module")
def encoders():
    text = UMT5Encoder(umt5_variant("tiny"), rngs=nnx.Rngs(0), **F32)
    image = CLIPVisionTower(clip_variant("tiny"), rngs=nnx.Rngs(0), **F32)
    return text, load_tokenizer(tiny_tokenizer_dir()), image


class Counting:
    """Wraps encode_prompts / encode_frames to count how many inputs were actually encoded."""

    def __init__(self, monkeypatch):
        import omnijax.models.wan.clip as clip_mod
        import omnijax.models.wan.umt5 as umt5_mod

        self.prompts, self.frames = [], 0
        orig_text, orig_image = umt5_mod.encode_prompts, clip_mod.encode_frames

        def text(model, tok, prompts, *a, **k):
            self.prompts += list(prompts)
            return orig_text(model, tok, prompts, *a, **k)

        def image(model, frames):
            self.frames += len(frames)
            return orig_image(model, frames)

        monkeypatch.setattr(umt5_mod, "encode_prompts", text)
        monkeypatch.setattr(clip_mod, "encode_frames", image)


def test_text_cache_matches_direct_and_recomputes_on_change(encoders, tmp_path, monkeypatch):
    text, tok, _ = encoders
    calls = Counting(monkeypatch)
    cond = Conditioner(EmbeddingCache(tmp_path), text_encoder=text, tokenizer=tok, max_length=64)
    prompts = ["a cat jumps onto the table", "", "the river flows", ""]
    first = cond.text(prompts)
    direct = encode_prompts(text, tok, prompts, max_length=64)
    for a, b in zip(first, direct):
        np.testing.assert_array_equal(a, b)
    assert calls.prompts == ["a cat jumps onto the table", "", "the river flows"]  # '' encoded once
    again = Conditioner(EmbeddingCache(tmp_path), text_encoder=text, tokenizer=tok, max_length=64).text(prompts)
    for a, b in zip(again, direct):
        np.testing.assert_array_equal(a, b)
    assert len(calls.prompts) == 3  # all from disk
    changed = cond.text(["a cat jumps onto the chair", ""])
    assert calls.prompts[3:] == ["a cat jumps onto the chair"]
    np.testing.assert_array_equal(changed[0], encode_prompts(text, tok, ["a cat jumps onto the chair"], 64)[0])
    files = [f for _, _, fs in os.walk(tmp_path) for f in fs]
    assert len(files) == 4 and not [f for f in files if f.startswith(".tmp-")]


def test_image_cache_matches_direct_and_recomputes_on_change(encoders, tmp_path, monkeypatch):
    _, _, image = encoders
    calls = Counting(monkeypatch)
    frames = np.random.default_rng(0).uniform(-1, 1, (2, 48, 80, 3)).astype(np.float32)
    cond = Conditioner(EmbeddingCache(tmp_path), image_encoder=image)
    got = cond.image(frames)
    np.testing.assert_array_equal(got, encode_frames(image, frames))
    assert got.shape == (2, 257, 32) and calls.frames == 2
    np.testing.assert_array_equal(cond.image(frames[::-1]), got[::-1])
    assert calls.frames == 2
    edited = frames.copy()
    edited[1, 5, 5, 0] += 0.5
    out = cond.image(edited)
    assert calls.frames == 3
    np.testing.assert_array_equal(out[0], got[0])
    np.testing.assert_array_equal(out[1], encode_frames(image, edited[1:])[0])


def test_encoder_identity_separates_weights_and_configs(encoders, tmp_path):
    text, tok, _ = encoders
    other = UMT5Encoder(umt5_variant("tiny"), rngs=nnx.Rngs(1), **F32)  # same config, other weights
    assert encoder_identity(text) == encoder_identity(text)
    assert encoder_identity(text) != encoder_identity(other)
    a = Conditioner(EmbeddingCache(tmp_path), text_encoder=text, tokenizer=tok, max_length=64).text(["hello"])[0]
    b = Conditioner(EmbeddingCache(tmp_path), text_encoder=other, tokenizer=tok, max_length=64).text(["hello"])[0]
    assert not np.allclose(a, b)
    np.testing.assert_array_equal(b, encode_prompts(other, tok, ["hello"], 64)[0])


def test_cache_without_encoder_and_broken_entries(encoders, tmp_path):
    text, tok, _ = encoders
    cond = Conditioner(EmbeddingCache(tmp_path), text_encoder=text, tokenizer=tok, max_length=64)
    want = cond.text(["a red car"])[0]
    reader = Conditioner(EmbeddingCache(tmp_path), text_id=cond.text_id, max_length=64)  # no model loaded
    np.testing.assert_array_equal(reader.text(["a red car"])[0], want)
    with pytest.raises(ValueError, match="no text encoder"):
        reader.text(["not cached yet"])
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs]
    with open(path, "r+b") as f:  # truncate: the entry is treated as missing and rewritten
        f.truncate(40)
    np.testing.assert_array_equal(cond.text(["a red car"])[0], want)
    np.testing.assert_array_equal(read_safetensors(path)[0]["embedding"], want)


def test_safetensors_round_trip_and_errors(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(3, 4).astype(ml_dtypes.bfloat16)
    path = str(tmp_path / "x.safetensors")
    write_safetensors(path, {"embedding": x}, {"prompt": "ünïcode"})
    tensors, meta = read_safetensors(path)
    assert tensors["embedding"].dtype == x.dtype
    np.testing.assert_array_equal(tensors["embedding"], x)
    assert meta == {"prompt": "ünïcode"}
    # the file is also valid for the reference safetensors reader
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(path)["embedding"].view(np.uint16), x.view(np.uint16))
    with pytest.raises(CacheError, match="dtype"):
        write_safetensors(path, {"ids": np.zeros(3, np.int64)})
    with pytest.raises(ValueError, match="kind"):
        EmbeddingCache.key("audio", b"", "id")


def _two_frame_video(path: str) -> str:
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(2):
            for pkt in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 90 * i, np.uint8), format="rgb24")):
                c.mux(pkt)
        for pkt in s.encode():
            c.mux(pkt)
    return path


def test_fill_cache_serves_a_reader_without_models(tmp_path):
    import json

    from omnijax.io.video import read_video

    video = _two_frame_video(str(tmp_path / "clip.mp4"))
    cache = str(tmp_path / "cache")
    text = UMT5Encoder(umt5_variant("tiny"), rngs=nnx.Rngs(0), **F32)
    image = CLIPVisionTower(clip_variant("tiny"), rngs=nnx.Rngs(0), **F32)
    tok = load_tokenizer(tiny_tokenizer_dir())
    cond = Conditioner(EmbeddingCache(cache), text_encoder=text, tokenizer=tok, image_encoder=image, max_length=64)
    ids = fill_cache(cond, ["a dog", ""], [video], text_source="t5-src", image_source="clip-src", progress=False)
    with open(os.path.join(cache, "encoders.json")) as f:
        assert json.load(f) == ids
    assert ids["text"]["source"] == "t5-src" and ids["image"]["source"] == "clip-src"
    # A reader without models finds the entries; they equal a direct computation with the same encoders.
    reader = Conditioner(EmbeddingCache(cache), text_id=ids["text"]["id"], image_id=ids["image"]["id"], max_length=64)
    for got, want in zip(reader.text(["a dog", ""]), encode_prompts(text, tok, ["a dog", ""], 64)):
        np.testing.assert_array_equal(got, want)
    frame = read_video(video, max_frames=1)[0][0].astype(np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(reader.image(frame[None]), encode_frames(image, frame[None]))


def test_cached_text_id_needs_the_same_sources_and_the_prompt(tmp_path):
    """A remembered umT5 identity is used only for the exact same files (a rewritten file is another source) and
    only when the prompt's embedding is in the cache too."""
    from omnijax.conditioning import EmbeddingCache, cached_text_id, remember_text_id, umt5_sources

    umt5, tok = tmp_path / "umt5.pth", tmp_path / "tok"
    umt5.write_bytes(b"weights")
    tok.mkdir()
    (tok / "spiece.model").write_bytes(b"vocab")
    cache = str(tmp_path / "cache")
    sources = umt5_sources(str(umt5), str(tok), "bf16")
    remember_text_id(cache, sources, "umt5-id")
    assert cached_text_id(cache, sources, "") is None  # no embedding of the prompt yet
    emb = EmbeddingCache(cache)
    emb.store("text", emb.key("text", b"", "umt5-id"), np.zeros((1, 4), np.float32))
    assert cached_text_id(cache, sources, "") == "umt5-id"
    assert cached_text_id(cache, sources, "a cat") is None
    assert cached_text_id(cache, umt5_sources(str(umt5), str(tok), "f32"), "") is None
    st = os.stat(umt5)
    os.utime(umt5, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cached_text_id(cache, umt5_sources(str(umt5), str(tok), "bf16"), "") is None
