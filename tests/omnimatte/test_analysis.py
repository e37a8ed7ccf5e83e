"""Block analysis: eq. 3 via indicator-valued attention vs the explicit softmax map; eq. 4; stage split."""

import jax.numpy as jnp
import numpy as np
import pytest

from omnijax.layers.attention import attention
from omnijax.omnimatte import analysis as an
from tests.omnimatte.helpers import tiny_base


def _captured_qk(base, z_t, t, context, clip, y):
    x, rope, _ = base.embed(z_t, y)
    _, e0, text, image = base.condition(t, context, clip)
    seen = []

    def hook(q, k, v):
        seen.append((np.asarray(q, np.float64), np.asarray(k, np.float64)))
        return attention(q, k, v, backend="xla")

    base.run_blocks(x, e0, text, image, rope, attn_fn=hook, backend="xla")
    return seen


def test_scores_equal_the_brute_force_attention_map():
    base = tiny_base(num_layers=3)
    sample = next(an.toy_effect_samples(1, frames=5, height=32, width=48, seed=3))
    encode = an.pool_encoder()
    import jax
    z_t, t, y, context, clip = an.model_inputs(base, sample, encode, sigma=0.6, key=jax.random.key(0))
    effect = an.token_mask(sample["effect_mask"], threshold=0.25)
    assert 0 < float(effect.sum()) < effect.size
    scores = np.asarray(an.block_scores(base, z_t, t, context, clip, y, effect[None], backend="xla"))[:, 0]

    ind = np.asarray(effect, bool)
    brute = []
    for q, k in _captured_qk(base, z_t, t, context, clip, y):
        logits = np.einsum("blnk,bsnk->bnls", q, k) / np.sqrt(q.shape[-1])
        w = np.exp(logits - logits.max(-1, keepdims=True))  # the full L x L softmax map W
        s = w[..., ind].sum(-1) / w.sum(-1)  # eq. 3 per head
        brute.append(s.mean(axis=1)[0])  # mean over heads -> [L]
    brute = np.stack(brute)
    np.testing.assert_allclose(scores, brute, rtol=1e-5, atol=1e-6)
    c = np.asarray(an.contribution(jnp.asarray(scores), effect))
    num = (brute * np.asarray(effect)[None]).sum(-1)
    np.testing.assert_allclose(c, num / num.sum(), rtol=1e-5)


def test_token_mask_grouping():
    m = np.zeros((5, 16, 32), np.float32)
    m[0, :16, :16] = 1  # latent frame 0, token (0, 0)
    m[1:5, :16, 16:] = 1  # latent frame 1, token (0, 1)
    m[2, :, :] = 1  # one of four frames: a quarter, below the threshold
    tok = np.asarray(an.token_mask(m)).reshape(2, 1, 2)
    np.testing.assert_array_equal(tok, [[[1, 0]], [[0, 1]]])
    with pytest.raises(ValueError, match="4k"):
        an.token_mask(np.zeros((4, 16, 16)))


def test_stage_split_at_troughs():
    curve = [5, 4, 3, 4, 6, 7, 6, 2, 3, 3.5]  # troughs at 2 and 7
    out = an.split_stages(curve)
    assert out["troughs"] == [2, 7] and out["stages"] == [[0, 2], [2, 7], [7, 10]] and out["effect_expert_k"] == 3
    # Three local minima: the two deepest win.
    out = an.split_stages([3, 1, 3, 2.5, 3, 0.5, 4, 5, 6])
    assert out["troughs"] == [1, 5]
    mono = an.split_stages(np.arange(9.0))
    assert mono["method"].startswith("thirds") and mono["stages"] == [[0, 3], [3, 6], [6, 9]]


def test_cli_end_to_end(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "analysis"
    cmd = [sys.executable, "launch/analyze_blocks.py", "--model", "tiny", "--layers", "4", "--samples", "2",
           "--frames", "5", "--size", "32x32", "--token-threshold", "0.25", "--out", str(out), "--emit-k"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json
    rep = json.loads((out / "block_analysis.json").read_text())
    assert len(rep["contribution"]) == 4 and abs(sum(rep["contribution"]) - 1) < 1e-5
    assert rep["num_samples"] + rep["skipped"] == 2 and rep["effect_expert_k"] == 4 - rep["troughs"][1]
    assert (out / "block_analysis.png").stat().st_size > 0 and (out / "block_analysis_maps.png").stat().st_size > 0
    assert proc.stdout.strip().splitlines()[-1] == str(rep["effect_expert_k"])
