"""The branch-token model against a dense reference written here (spec easyomnimatte.md §2, paper fig. 2a / 6).

The reference runs every frozen block on ONE concatenated sequence [X_B ; X_A] of 2L tokens in float64 numpy,
with an explicit 2L x 2L attention mask (A: all see all; B: X_B sees X_B, X_A sees both; C: each half sees
itself), the RoPE angles of the L grid positions duplicated for the alpha half, and the LoRA deltas
(alpha / r) * x A B added to the rows of the alpha half only. The block math follows spec wan.md §1.3 from the
parameters; only the patch embedding, the timestep/text/image conditioning and the head are WanDiT's own
pieces. Compared output to output with omnijax.omnimatte.branch.EasyOmnimatte, random adapters (B != 0).
"""

import numpy as np
import pytest
from flax import nnx

from omnijax.layers.rope import wan_rope_angles
from omnijax.omnimatte.branch import EasyOmnimatte
from omnijax.omnimatte.experts import SELF_ATTN, TARGETS, ExpertConfig
from tests.attention_ref import dense_attention
from tests.omnimatte.helpers import inputs, randomize_lora_b, run, tiny_base
from tests.torch_refs import rel_err

EPS = 1e-6


def _np(p):
    return np.asarray(p[...], np.float64)


def _ln(x, scale=None, bias=None):
    x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS)
    return y if scale is None else y * scale + bias


def _rms(x, scale):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + EPS) * scale


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _rope(x, ang):
    """Interleaved pairs (x[2j], x[2j+1]) rotated by ang [L, K/2]; x [B, L, N, K]."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
    return out


def mask_2l(kind, n):
    """[2L, 2L] bool, True = query row may attend to key column; rows/cols 0..L-1 are X_B, L..2L-1 X_A."""
    m = np.zeros((2 * n, 2 * n), bool)
    m[:n, :n] = True                           # X_B -> X_B in every type
    m[n:, n:] = True                           # X_A -> X_A in every type
    if kind in ("A", "B"):
        m[n:, :n] = True                       # X_A -> X_B
    if kind == "A":
        m[:n, n:] = True                       # X_B -> X_A (ablation only)
    return m


class DenseBranch:
    """Reference forward of one expert (frozen WanDiT + adapters) on the concatenated sequence."""

    def __init__(self, model: EasyOmnimatte, expert: ExpertConfig):
        self.base, self.expert = model.base, expert
        self.scale = expert.alpha / expert.rank  # from the config, not from the LoRA modules
        self.adapters = {}
        for b in expert.blocks:
            for t in expert.targets:
                group, name = t.split(".")
                ad = model.lora.blocks[str(b)][group][name]
                self.adapters[b, t] = (_np(ad.lora_a), _np(ad.lora_b))

    def linear(self, lin, x, block, target, alpha_rows):
        """x @ W + b, plus the low-rank delta on the rows selected by `alpha_rows` ([R] bool over x's rows)."""
        y = x @ _np(lin.kernel) + _np(lin.bias)
        if (block, target) in self.adapters:
            a, b = self.adapters[block, target]
            y = y + np.where(alpha_rows[:, None], self.scale * (x @ a @ b), 0.0)
        return y

    def block(self, i, blk, x, e0, text, image, ang, mask, alpha_rows):
        d = x.shape[-1]
        heads = self.base.config.num_heads
        split = lambda a: a.reshape(*a.shape[:-1], heads, d // heads)
        mod = _np(blk.modulation) + e0                      # [B, 6, D]
        sh_sa, sc_sa, g_sa, sh_ff, sc_ff, g_ff = (mod[:, j:j + 1] for j in range(6))
        sa = blk.self_attn
        h = _ln(x) * (1 + sc_sa) + sh_sa
        q = _rope(split(_rms(self.linear(sa.q, h, i, "self_attn.q", alpha_rows), _np(sa.norm_q.scale))), ang)
        k = _rope(split(_rms(self.linear(sa.k, h, i, "self_attn.k", alpha_rows), _np(sa.norm_k.scale))), ang)
        v = split(self.linear(sa.v, h, i, "self_attn.v", alpha_rows))
        o = dense_attention(q, k, v, mask).reshape(x.shape)
        x = x + self.linear(sa.o, o, i, "self_attn.o", alpha_rows) * g_sa
        x = x + self.cross(i, blk, _ln(x, _np(blk.norm3.scale), _np(blk.norm3.bias)), text, image, alpha_rows)
        h = _ln(x) * (1 + sc_ff) + sh_ff
        f = _gelu_tanh(self.linear(blk.ffn.linear_1, h, i, "ffn.linear_1", alpha_rows))
        return x + self.linear(blk.ffn.linear_2, f, i, "ffn.linear_2", alpha_rows) * g_ff

    def cross(self, i, blk, x, text, image, alpha_rows):
        """Text + image cross-attention, per query row. Adapted k/v act on the context for the alpha rows, so
        the two halves are computed separately and stacked."""
        ca, heads = blk.cross_attn, self.base.config.num_heads
        split = lambda a: a.reshape(*a.shape[:-1], heads, a.shape[-1] // heads)
        out = np.empty_like(x)
        for adapted in (False, True):
            rows = alpha_rows if adapted else ~alpha_rows
            flags = lambda n, adapted=adapted: np.full(n, adapted)
            xq = x[:, rows]
            q = split(_rms(self.linear(ca.q, xq, i, "cross_attn.q", flags(xq.shape[1])), _np(ca.norm_q.scale)))
            t_rows, i_rows = flags(text.shape[1]), flags(image.shape[1])
            kt = split(_rms(self.linear(ca.k, text, i, "cross_attn.k", t_rows), _np(ca.norm_k.scale)))
            vt = split(self.linear(ca.v, text, i, "cross_attn.v", t_rows))
            ki = split(_rms(self.linear(ca.k_img, image, i, "cross_attn.k_img", i_rows), _np(ca.norm_k_img.scale)))
            vi = split(self.linear(ca.v_img, image, i, "cross_attn.v_img", i_rows))
            att = (dense_attention(q, kt, vt) + dense_attention(q, ki, vi)).reshape(xq.shape)
            out[:, rows] = self.linear(ca.o, att, i, "cross_attn.o", flags(xq.shape[1]))
        return out

    def __call__(self, d):
        base = self.base
        x_b, _, grid = base.embed(d["z_bg"], d["y"])        # WanDiT's patch embedding (frozen, shared)
        x_a, _, _ = base.embed(d["z_alpha"], d["y"])
        e, e0, text, image = base.condition(d["timesteps"], d["context"], d["clip_features"])
        n = x_b.shape[1]
        x = np.concatenate([np.asarray(x_b, np.float64), np.asarray(x_a, np.float64)], axis=1)  # [B, 2L, D]
        ang = wan_rope_angles(grid, base.config.head_dim, base.config.rope_theta)
        ang = np.concatenate([ang, ang])                    # alpha token i at background token i's position
        mask = mask_2l(self.expert.mask, n)
        alpha_rows = np.arange(2 * n) >= n
        e0, text, image = (np.asarray(a, np.float64) for a in (e0, text, image))
        for i, blk in enumerate(base.blocks):
            x = self.block(i, blk, x, e0, text, image, ang, mask, alpha_rows)
        x = x.astype(np.float32)
        return tuple(np.asarray(base.unpatchify(base.head(h, e), grid)) for h in (x[:, :n], x[:, n:]))


@pytest.fixture(scope="module")
def base():
    return tiny_base(num_layers=3)


CASES = [("A", (1,), SELF_ATTN), ("B", (1, 2), SELF_ATTN), ("C", (0, 1, 2), SELF_ATTN),
         ("B", (2,), TARGETS), ("C", (0, 2), TARGETS)]


@pytest.mark.parametrize("mask,blocks,targets", CASES, ids=[f"{m}-{len(t)}targets" for m, _, t in CASES])
def test_matches_dense_concatenated_reference(base, mask, blocks, targets):
    expert = ExpertConfig("dense", 4, 8.0, blocks, mask, targets)
    model = EasyOmnimatte(base, expert, rngs=nnx.Rngs(11))
    randomize_lora_b(model, seed=4, scale=0.3)
    d = inputs(seed=2, b=2, t=2, h=4, w=6)
    v_bg, v_alpha = run(model, d)
    ref_bg, ref_alpha = DenseBranch(model, expert)(d)
    assert rel_err(v_alpha, ref_alpha) < 2e-6, rel_err(v_alpha, ref_alpha)
    assert rel_err(v_bg, ref_bg) < 2e-6, rel_err(v_bg, ref_bg)
    # The adapters matter (else a model that drops them would pass): without them the alpha half differs.
    plain = ExpertConfig("dense", 4, 0.0, blocks, mask, targets)
    ref_plain = DenseBranch(model, plain)(d)[1]
    assert rel_err(ref_plain, ref_alpha) > 1e-2
