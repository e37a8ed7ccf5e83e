"""WanDiT vs diffusers' WanTransformer3DModel on one GPU: parity (f32, bf16) and forward speed at 1.3B dims.

  python benchmarks/bench_dit.py            # H100: parity at 1.3B-InP dims + 81x480x832 forward, JAX vs diffusers
  python benchmarks/bench_dit.py --small    # CPU dry run on the tiny variant
Writes $OUT/bench_dit.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.common import H100_BF16_PEAK, emit, jax_peak_gb, time_jax, time_torch, wan_forward_flops  # noqa: E402
from converters import load_wan_dit  # noqa: E402
from omnijax.omnimatte.decompose import jit_module_fn  # noqa: E402
from tests.torch_refs import diffusers_wan  # noqa: E402


def jitted_forward(model, backend: str = "auto"):
    return jit_module_fn(model, lambda m, *a: m(*a, attention_backend=backend))


def inputs(t, h, w, text_dim, image_dim, seed=0):
    r = np.random.default_rng(seed)
    return (r.standard_normal((1, t, h, w, 16), np.float32), np.array([500.0], np.float32),
            r.standard_normal((1, 512, text_dim), np.float32), r.standard_normal((1, 257, image_dim), np.float32),
            r.standard_normal((1, t, h, w, 20), np.float32))


def torch_call(ref, args, dtype, dev):
    lat, ts, ctx, clip, y = args
    x = torch.from_numpy(np.concatenate([lat, y], -1)).permute(0, 4, 1, 2, 3).to(dev, dtype)
    t, c, im = torch.from_numpy(ts).to(dev), torch.from_numpy(ctx).to(dev, dtype), torch.from_numpy(clip).to(dev, dtype)

    @torch.inference_mode()
    def call():
        return ref(x, t, c, encoder_hidden_states_image=im).sample

    return call


def stats(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return dict(rel_l2=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                cosine=float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", action="store_true", help="tiny sizes on CPU (dry run)")
    ap.add_argument("--part", choices=["parity", "speed"], required=True,
                    help="run parity and speed in separate processes: JAX's peak-memory counter cannot be reset")
    ap.add_argument("--variant", default="", help="tag for an experiment variant (recorded in the JSON)")
    ap.add_argument("--profile", action="store_true", help="speed: also sum each backend's device kernels by kind")
    ap.add_argument("--backends", default="auto",
                    help="speed: attention backends to time in this process, comma list (e.g. cudnn,fa3); the "
                         "outputs of the later ones are compared with the first's")
    ap.add_argument("--dump-hlo", action="store_true",
                    help="speed: write each backend's optimised HLO to $OUT/bench_dit_<backend>.hlo.txt (to name the "
                         "profile's fusions); the profile then lists 80 kernels")
    args = ap.parse_args()
    dev = "cpu" if args.small else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.small:
        dims = dict(dim=64, heads=2, layers=2, ffn=128, text_dim=32, image_dim=32, freq_dim=32)
        parity_grid, speed_grid = (3, 6, 10), (5, 8, 12)
    else:
        dims = dict(dim=1536, heads=12, layers=30, ffn=8960, text_dim=4096, image_dim=1280, freq_dim=256)
        parity_grid, speed_grid = (3, 30, 52), (21, 60, 104)
    res = dict(date=str(datetime.date.today()), device=str(jax.devices()[0].device_kind), jax=jax.__version__,
               torch=torch.__version__)
    torch.manual_seed(0)
    ref = diffusers_wan(i2v=True, device=dev, **dims).eval()  # f32, diffusers' own random init
    sd = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
    from omnijax.models.wan import WanConfig

    cfg = WanConfig(dim=dims["dim"], ffn_dim=dims["ffn"], num_heads=dims["heads"], num_layers=dims["layers"],
                    model_type="i2v", in_dim=36, text_dim=dims["text_dim"], image_dim=dims["image_dim"],
                    freq_dim=dims["freq_dim"])
    res["params_M"] = round(sum(v.numel() for v in sd.values()) / 1e6, 1)

    res["variant"] = args.variant
    apply_variant(args.variant)
    if args.part == "parity":
        parity(res, ref, sd, cfg, dims, dev, parity_grid)
    else:
        speed(res, ref, sd, cfg, dims, dev, speed_grid, args.small, args.backends.split(","),
              args.profile, args.dump_hlo)
    emit(f"bench_dit_{args.part}{'_' + args.variant if args.variant else ''}", res)


def parity(res, ref, sd, cfg, dims, dev, parity_grid):
    # f32 both sides (TF32 off, JAX matmul precision highest), then bf16 both sides vs the f32 torch result.
    pa = inputs(*parity_grid, dims["text_dim"], dims["image_dim"])
    want = torch_call(ref, pa, torch.float32, dev)().float().permute(0, 2, 3, 4, 1).cpu().numpy()
    with jax.default_matmul_precision("highest"):
        _, m32 = load_wan_dit(sd, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
        got32 = np.asarray(jitted_forward(m32)(*pa))
    res["parity_f32"] = stats(got32, want)
    del m32
    _, m16 = load_wan_dit(sd, cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    res["parity_bf16_jax_vs_torch_f32"] = stats(np.asarray(jitted_forward(m16)(*pa), np.float32), want)
    ref = ref.to(torch.bfloat16)
    got_t16 = torch_call(ref, pa, torch.bfloat16, dev)().float().permute(0, 2, 3, 4, 1).cpu().numpy()
    res["parity_bf16_torch_vs_torch_f32"] = stats(got_t16, want)
    res["parity_tokens"] = int(np.prod(parity_grid) // 4)


def apply_variant(name):
    """Experiment variants (monkeypatches) measured against the plain model in separate processes."""
    from omnijax.layers.rope import apply_rope
    from omnijax.models.wan import dit

    if name == "fused_qkv":
        def qkv(self, x, cos, sin):
            w = jnp.concatenate([self.q.kernel[...], self.k.kernel[...], self.v.kernel[...]], axis=1)
            b = jnp.concatenate([self.q.bias[...], self.k.bias[...], self.v.bias[...]])
            y = (jnp.einsum("bld,de->ble", x.astype(self.q.dtype), w.astype(self.q.dtype)) + b.astype(self.q.dtype))
            q, k, v = jnp.split(y, 3, axis=-1)
            split = lambda a: a.reshape(*a.shape[:-1], self.num_heads, -1)
            return (apply_rope(split(self.norm_q(q)), cos, sin), apply_rope(split(self.norm_k(k)), cos, sin),
                    split(v))
        dit.SelfAttention.qkv = qkv
    elif name == "rope_swap":  # experiment (session 9, not kept): x * C + swap(x) * S instead of a stack of halves
        def swapped_rope(x, cos, sin):
            xf = x.astype(jnp.float32)
            swapped = xf.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
            c = jnp.repeat(cos, 2, axis=-1)[None, :, None, :]
            s = jnp.stack([-sin, sin], axis=-1).reshape(*sin.shape[:-1], -1)[None, :, None, :]
            return (xf * c + swapped * s).astype(x.dtype)
        dit.apply_rope = swapped_rope
    elif name == "diag_no_rope_norm":  # diagnostic only: what RMSNorm + RoPE cost
        def qkv(self, x, cos, sin):
            split = lambda a: a.reshape(*a.shape[:-1], self.num_heads, -1)
            return split(self.q(x)), split(self.k(x)), split(self.v(x))
        dit.SelfAttention.qkv = qkv
    elif name == "cross_plain_inference":  # experiment: the 257-key CLIP cross-attention unpadded, unmasked
        import omnijax.layers.attention as att
        orig_padded = att.padded_attention

        def padded(q, k, v, *, scale=None, implementation="cudnn", multiple=8):
            if implementation == "cudnn":
                return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
            return orig_padded(q, k, v, scale=scale, implementation=implementation, multiple=multiple)
        att.padded_attention = padded
    elif name == "diag_no_attention":  # diagnostic only: everything but the self-attention kernel
        import omnijax.layers.attention as att
        orig = att.attention
        dit.attention = lambda q, k, v, **kw: orig(q, k, v, **kw) if k.shape[1] < 2048 else q


def speed(res, ref, sd, cfg, dims, dev, speed_grid, small, backends, profile=False, dump_hlo=False):
    ref = ref.to(torch.bfloat16)
    _, m16 = load_wan_dit(sd, cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    del sd
    sa = inputs(*speed_grid, dims["text_dim"], dims["image_dim"])
    n = int(np.prod(speed_grid) // 4)
    flops = wan_forward_flops(n, dims["dim"], dims["ffn"], dims["layers"])
    res.update(tokens=n, tflop_per_forward=round(flops / 1e12, 1))
    if not small:
        torch.cuda.reset_peak_memory_stats()
    t_torch = time_torch(torch_call(ref, sa, torch.bfloat16, dev)) if not small else float("nan")
    torch_peak = torch.cuda.max_memory_allocated() / 2**30 if not small else None
    del ref
    gc.collect()
    if not small:
        torch.cuda.empty_cache()
    res.update(diffusers_ms=round(t_torch * 1e3, 1), diffusers_mfu=round(flops / t_torch / H100_BF16_PEAK, 3),
               diffusers_peak_gb=None if torch_peak is None else round(torch_peak, 2))
    args = [jnp.asarray(a, jnp.bfloat16 if a.ndim > 1 else jnp.float32) for a in sa]
    first = None
    for backend in backends:
        fwd = jitted_forward(m16, backend)
        t_jax = time_jax(fwd, *args)
        out = np.asarray(fwd(*args), np.float32)
        row = dict(jax_ms=round(t_jax * 1e3, 1), jax_tflops=round(flops / t_jax / 1e12, 1),
                   jax_mfu=round(flops / t_jax / H100_BF16_PEAK, 3), jax_peak_gb=jax_peak_gb(),
                   jax_over_diffusers=round(t_jax / t_torch, 3))
        if first is None:
            first = out
        else:
            row[f"vs_{backends[0]}"] = stats(out, first)
        if profile:
            import tempfile

            from benchmarks.common import profile_kernels
            row["profile"] = profile_kernels(lambda fwd=fwd: fwd(*args), 2, tempfile.mkdtemp(prefix="dit-"),
                                             top=80 if dump_hlo else 25)
        if dump_hlo and os.environ.get("OUT"):
            text = fwd.lower(*args).compile().as_text()
            with open(os.path.join(os.environ["OUT"], f"bench_dit_{backend}.hlo.txt"), "w") as f:
                f.write(text)
        res[f"backend_{backend}"] = row
        print(f"{backend}: { {k: v for k, v in row.items() if k != 'profile'} }", file=sys.stderr, flush=True)
    res.update(res[f"backend_{backends[0]}"])


if __name__ == "__main__":
    main()
