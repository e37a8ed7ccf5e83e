"""EasyOmnimatte experts on one GPU: forward and LoRA-only forward+backward, MFU and memory; structured type-B
attention vs cuDNN attention with an explicit dense [2N, 2N] mask.

Wan2.1-Fun-1.3B-InP dims, random bf16 weights, 81 x 480 x 832 (2 x 32,760 tokens), batch 1:
  python benchmarks/bench_experts.py                 # H100, about 3-4 minutes (mostly compiles)
  python benchmarks/bench_experts.py --small         # the same code on tiny sizes, CPU
Prints one JSON object and writes it to $OUT/bench_experts.json when $OUT is set.

FLOP model (counted, not measured; see "flop_model" in the output): linears 2*in*out per token, attention
4*Nq*Nk*D per block (QK^T and PV) for the pairs the mask allows, LoRA 2*r*(in+out) per adapted alpha token.
Backward counts what the LoRA-only gradient needs: alpha-stream dX of the frozen linears (1x), LoRA dX and dW
(2x), attention backward (2x) in the blocks from the first adapted one on. Peak: 989 TFLOP/s (H100 dense bf16).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from omnijax.layers.branch_attention import branch_attention  # noqa: E402
from omnijax.models.wan.dit import WanDiT  # noqa: E402
from omnijax.models.wan.variants import variant  # noqa: E402
from omnijax.omnimatte.branch import EasyOmnimatte  # noqa: E402
from omnijax.omnimatte.experts import effect_expert, quality_expert  # noqa: E402

PEAK = 989e12


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="tiny sizes on CPU (proves the script runs)")
    p.add_argument("--layers", type=int, default=None, help="override the 30 blocks (K scales as round(L/3))")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--size", default="480x832")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", default="effect,quality,attention")
    p.add_argument("--backend", default="cudnn", help="GPU attention backend of the experts (cudnn, fa3, auto)")
    p.add_argument("--remat", default="effect=0,quality=-1",
                   help="blocks each expert's training step recomputes: name=n, -1 all, 0 none (comma list)")
    return p.parse_args()


def _median_ms(fn, repeats):
    jax.block_until_ready(fn())  # warm-up (after compile)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _peak_bytes():
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _mem(compiled):
    try:
        m = compiled.memory_analysis()
        return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
                "output_bytes": int(m.output_size_in_bytes)}
    except Exception as e:  # not every backend reports it
        return {"error": repr(e)[:200]}


def flops(cfg, n, ctx_tokens, expert, *, train: bool) -> dict:
    from omnijax.layers.branch_attention import alpha_sees_background, background_sees_alpha

    d, f, nl = cfg.dim, cfg.ffn_dim, cfg.num_layers
    lin_tok = 2 * (4 * d * d) + 2 * (2 * d * d) + 2 * (2 * d * f)  # self q,k,v,o; cross q,o; FFN
    cross_kv = 2 * 2 * d * d * ctx_tokens  # cross k,v (+ k_img, v_img) on the context, per set and block
    cross_attn = 4 * n * ctx_tokens * d
    io = n * (2 * cfg.in_dim * 4 * d + 2 * d * 4 * cfg.out_dim)  # patch embed + head, per set
    sees_bg, sees_alpha = alpha_sees_background(expert.mask), background_sees_alpha(expert.mask)
    pair_blocks = 2 + sees_bg + sees_alpha  # N^2 blocks of the 2N x 2N map the mask keeps (A 4, B 3, C 2)
    sets = 1 if (train and not expert.background_in_training) else 2
    if sets == 1:
        pair_blocks = 1
    lora_tok = sum(2 * expert.rank * (d + (f if t == "ffn.linear_1" else d)) if t.startswith("ffn") else
                   2 * expert.rank * 2 * d for t in expert.targets)
    nb = len(expert.blocks)
    fwd = {"linear": sets * (n * nl * lin_tok + nl * cross_kv) + sets * io,
           "self_attention": pair_blocks * 4 * n * n * d * nl, "cross_attention": sets * cross_attn * nl,
           "lora": n * nb * lora_tok}
    out = {"forward": fwd, "forward_total": sum(fwd.values())}
    if train:
        back_blocks = nl - expert.blocks[0]
        alpha_keys = 1 + sees_bg
        bwd = {"linear_dx": n * back_blocks * lin_tok, "lora": 2 * n * nb * lora_tok,
               "self_attention": 2 * 4 * n * alpha_keys * n * d * back_blocks,
               "cross_attention": 2 * cross_attn * back_blocks}
        out.update(backward=bwd, backward_total=sum(bwd.values()))
    return out


def _inputs(cfg, frames, hh, ww, key):
    t, h, w = (frames - 1) // 4 + 1, hh // 8, ww // 8
    ks = jax.random.split(key, 6)
    bf = jnp.bfloat16
    lat = (1, t, h, w, 16)
    return dict(z_bg=jax.random.normal(ks[0], lat, bf), z_alpha=jax.random.normal(ks[1], lat, bf),
                timesteps=jnp.full((1,), 700.0), context=jax.random.normal(ks[2], (1, cfg.text_len, cfg.text_dim), bf),
                clip=jax.random.normal(ks[3], (1, 257, cfg.image_dim), bf),
                y=jax.random.normal(ks[4], (1, t, h, w, 20), bf), target=jax.random.normal(ks[5], lat))


def bench_expert(model, inp, n_tokens, backend, repeats, remat):
    cfg, expert = model.base.config, model.expert
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    zb_train = inp["z_bg"] if expert.background_in_training else None

    def forward(lora, rest, zb, za, t, ctx, clip, y):
        m = nnx.merge(graphdef, lora, rest)
        return m(zb, za, t, ctx, clip, y, attention_backend=backend)

    def loss(lora, rest, zb, za, t, ctx, clip, y, target):
        m = nnx.merge(graphdef, lora, rest)
        _, v = m(zb, za, t, ctx, clip, y, train=True, attention_backend=backend, remat=remat)
        return jnp.mean((v.astype(jnp.float32) - target) ** 2)

    res = {"expert": expert.to_dict(), "remat_in_training": remat}
    args = (inp["z_bg"], inp["z_alpha"], inp["timesteps"], inp["context"], inp["clip"], inp["y"])
    t0 = time.perf_counter()
    fwd = jax.jit(forward).lower(lora, rest, *args).compile()
    res["forward_compile_s"] = time.perf_counter() - t0
    res["forward_memory"] = _mem(fwd)
    res["forward_ms"] = _median_ms(lambda: fwd(lora, rest, *args), repeats)
    res["peak_bytes_after_forward"] = _peak_bytes()
    targs = (zb_train, *args[1:], inp["target"])
    t0 = time.perf_counter()
    step = jax.jit(jax.value_and_grad(loss)).lower(lora, rest, *targs).compile()
    res["train_compile_s"] = time.perf_counter() - t0
    res["train_memory"] = _mem(step)
    res["train_ms"] = _median_ms(lambda: step(lora, rest, *targs), repeats)
    res["peak_bytes_after_train"] = _peak_bytes()
    res.update(bench_train_step(model, inp, repeats, remat, backend))
    f_inf = flops(cfg, n_tokens, cfg.text_len + 257, expert, train=False)
    f_tr = flops(cfg, n_tokens, cfg.text_len + 257, expert, train=True)
    res["flops_forward"] = f_inf["forward_total"]
    res["flops_train"] = f_tr["forward_total"] + f_tr["backward_total"]
    res["flop_model"] = {"inference": f_inf, "train": f_tr}
    res["mfu_forward"] = res["flops_forward"] / (res["forward_ms"] * 1e-3) / PEAK
    res["mfu_train"] = res["flops_train"] / (res["train_ms"] * 1e-3) / PEAK
    res["mfu_step"] = res["flops_train"] / (res["step_ms"] * 1e-3) / PEAK
    return res


def bench_train_step(model, inp, repeats, remat, backend):
    """The trainer's own step (tasks/omnimatte.py loss, configs' optimizer: clip + AdamW on LoRA, donated state)."""
    from configs.common import expert_config
    from omnijax.training.optim import make_optimizer
    from omnijax.training.step import make_train_step
    from tasks.omnimatte import loss as loss_fn

    config = expert_config(model.expert.name, None)
    with config.unlocked():
        config.model.remat, config.model.attention = remat, backend
    optimizer = nnx.Optimizer(model, make_optimizer(config)[0], wrt=nnx.LoRAParam)
    step_fn, state = make_train_step(model, optimizer, lambda m, b, r: loss_fn(m, b, r, config=config))
    batch = dict(x0_alpha=inp["target"], x0_bg=inp["target"] * 0.5, y=inp["y"], context=inp["context"],
                 clip=inp["clip"])
    rng = jax.random.key(3)
    t0 = time.perf_counter()
    compiled = step_fn.compile(state, batch, rng)
    out = {"step_compile_s": time.perf_counter() - t0, "step_memory": _mem(compiled)}
    state, _ = step_fn(state, batch, rng)  # warm-up; the state is donated, so thread it through
    jax.block_until_ready(state)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batch, jax.random.fold_in(rng, i))
        jax.block_until_ready(metrics)
        times.append((time.perf_counter() - t0) * 1e3)
    out["step_ms"] = float(np.median(times))
    out["step_loss"] = float(metrics["loss"])
    out["peak_bytes_after_step"] = _peak_bytes()
    return out


def _dense_type_b(n, backend):
    def dense(qb, kb, vb, qa, ka, va):
        cat = lambda x, y: jnp.concatenate([x, y], axis=1)
        i = jax.lax.broadcasted_iota(jnp.int32, (2 * n, 2 * n), 0)
        j = jax.lax.broadcasted_iota(jnp.int32, (2 * n, 2 * n), 1)
        mask = ((i >= n) | (j < n))[None, None]  # the explicit [2N, 2N] type-B mask
        o = jax.nn.dot_product_attention(cat(qb, qa), cat(kb, ka), cat(vb, va), mask=mask,
                                         implementation=None if backend == "xla" else backend)
        return o[:, :n], o[:, n:]
    return jax.jit(dense)


def _attention_at(n, heads, head_dim, backend, repeats, dtype):
    ks = jax.random.split(jax.random.key(n), 6)
    qkv = [jax.random.normal(k, (1, n, heads, head_dim), dtype) for k in ks]
    structured = jax.jit(lambda *a: branch_attention(*a, mask="B", backend=backend))
    dense = _dense_type_b(n, backend)
    s_out, d_out = structured(*qkv), dense(*qkv)
    err = float(jnp.max(jnp.abs(jnp.concatenate(s_out, 1).astype(jnp.float32) -
                                jnp.concatenate(d_out, 1).astype(jnp.float32))))
    s_ms = _median_ms(lambda: structured(*qkv), repeats)
    d_ms = _median_ms(lambda: dense(*qkv), repeats)
    useful = 3 * 4 * n * n * heads * head_dim
    return dict(tokens_per_set=n, structured_ms=s_ms, dense_mask_ms=d_ms, dense_over_structured=d_ms / s_ms,
                max_abs_diff=err, structured_tflops=useful / (s_ms * 1e-3) / 1e12,
                dense_useful_tflops=useful / (d_ms * 1e-3) / 1e12)


def bench_attention(sizes, heads, head_dim, backend, repeats, dtype):
    """Type-B structured (two fused calls) vs one fused call over 2N with a dense boolean mask; the largest N
    that fits (sizes are tried largest first)."""
    out = {"tried": []}
    for n in sizes:
        try:
            out.update(_attention_at(n, heads, head_dim, backend, repeats, dtype))
            return out
        except Exception as e:  # out of memory or unsupported: try the next size
            out["tried"].append({"tokens_per_set": n, "error": repr(e)[:300]})
    return out


def main():
    a = _args()
    if a.small:
        cfg = variant("tiny-inp", num_layers=a.layers or 4)
        frames, hh, ww, backend, att_sizes = 5, 64, 64, "xla", [256, 64]
    else:
        cfg = variant("1.3b-inp", **({} if a.layers is None else {"num_layers": a.layers}))
        hh, ww = (int(v) for v in a.size.split("x"))
        frames, backend, att_sizes = a.frames, a.backend, [32760, 16380, 8190]
    only = set(a.only.split(","))
    remat_for = {k: int(v) for k, v in (item.split("=") for item in a.remat.split(",") if item)}
    res = {"device": str(jax.devices()[0].device_kind), "jax": jax.__version__, "config": cfg.to_dict(),
           "frames": frames, "size": [hh, ww], "backend": backend}
    t0 = time.perf_counter()
    inp = _inputs(cfg, frames, hh, ww, jax.random.key(1))
    n_tokens = int(np.prod(inp["z_alpha"].shape[1:4])) // 4
    res["tokens_per_set"] = n_tokens
    makers = {"effect": lambda: effect_expert(cfg.num_layers), "quality": lambda: quality_expert(cfg.num_layers)}
    for name in ("effect", "quality"):
        if name in only:
            # A fresh base per expert: the trainer's step donates the whole model state, base included.
            base = WanDiT(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
            model = EasyOmnimatte(base, makers[name](), rngs=nnx.Rngs(2))
            try:
                res[name] = bench_expert(model, inp, n_tokens, backend, a.repeats, remat=remat_for.get(name, 0))
            except Exception as e:
                res[name] = {"error": repr(e)[:500], "traceback": traceback.format_exc()[-3000:]}
            del model, base
    if "attention" in only:
        res["attention_type_b"] = bench_attention(att_sizes, cfg.num_heads, cfg.head_dim, backend, a.repeats,
                                                  jnp.bfloat16 if backend != "xla" else jnp.float32)
    res["total_s"] = time.perf_counter() - t0
    emit("bench_experts", res)


if __name__ == "__main__":
    main()
