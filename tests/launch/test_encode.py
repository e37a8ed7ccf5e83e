"""launch/encode.py as a command with random tiny encoders (the cache filling itself:
tests/test_conditioning.py::test_fill_cache_serves_a_reader_without_models)."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from converters.tokenizer import load_tokenizer
from launch.encode import main
from omnijax.conditioning import Conditioner, EmbeddingCache
from omnijax.models.wan.clip import CLIPVisionTower, clip_variant, encode_frames
from omnijax.models.wan.umt5 import UMT5Encoder, encode_prompts, umt5_variant
from tests.test_conditioning import _two_frame_video

F32 = dict(dtype=jnp.float32, param_dtype=jnp.float32)


def test_encode_cli_tiny(tmp_path):
    video = _two_frame_video(str(tmp_path / "clip.mp4"))
    cache = str(tmp_path / "cache")
    assert main(["--cache", cache, "--model", "tiny", "--dtype", "f32", "--max-length", "64",
                 "--prompts", "a dog", "", "--video", video]) == 0
    with open(os.path.join(cache, "encoders.json")) as f:
        ids = json.load(f)
    # A reader without models finds the entries; they equal a direct computation with the same tiny encoders.
    reader = Conditioner(EmbeddingCache(cache), text_id=ids["text"]["id"], image_id=ids["image"]["id"], max_length=64)
    text = UMT5Encoder(umt5_variant("tiny"), rngs=nnx.Rngs(0), **F32)
    tok = load_tokenizer(os.path.join(cache, "tiny_tokenizer"))
    for got, want in zip(reader.text(["a dog", ""]), encode_prompts(text, tok, ["a dog", ""], 64)):
        np.testing.assert_array_equal(got, want)
    from omnijax.io.video import read_video

    frame = read_video(video, max_frames=1)[0][0].astype(np.float32) / 127.5 - 1.0
    assert frame.shape == (48, 64, 3) and frame.min() >= -1 and frame.max() <= 1
    image = CLIPVisionTower(clip_variant("tiny"), rngs=nnx.Rngs(0), **F32)
    np.testing.assert_array_equal(reader.image(frame[None]), encode_frames(image, frame[None]))
    with pytest.raises(SystemExit):  # nothing to encode
        main(["--cache", cache, "--model", "tiny"])
