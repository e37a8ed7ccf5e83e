"""FluxDiT vs diffusers' FluxTransformer2DModel on one GPU: bf16 forward speed, f32 parity, LoRA training step.

  python benchmarks/bench_flux.py --part speed    # bf16 forward, dev dims, 1024² and DiffDecompose's 3 x 512²
  python benchmarks/bench_flux.py --part train    # fwd+bwd of LoRA rank 128 at 3 x 512², per remat choice
  python benchmarks/bench_flux.py --part parity   # f32, full dims (depth via --parity-depth), JAX vs diffusers
  python benchmarks/bench_flux.py --part speed --tiny   # CPU dry run (tiny dims, no GPU needed; any part)
Parts run in separate processes: JAX's peak-memory counter cannot be reset. Writes $OUT/bench_flux_<part>.json.

Random weights, initialised fast on the device: diffusers' model is built on the meta device and its storage
allocated and filled with normal_ on the GPU; the JAX model is built abstractly and each parameter drawn on the
device. The speed part therefore compares the same shapes, not the same numbers; the parity part copies one
set of f32 weights through load_flux_dit.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # torch shares the GPU
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from flax import nnx  # noqa: E402

from benchmarks.common import H100_BF16_PEAK, emit, flux_flops, jax_peak_gb, random_module, time_jax, time_torch  # noqa: E402
from omnijax.models.flux import FluxDiT, FluxLoRA, Segment, lora_spec, variant  # noqa: E402
from omnijax.models.flux.lora import IMAGE_STREAM_TARGETS  # noqa: E402
from omnijax.omnimatte.decompose import jit_module_fn  # noqa: E402
from omnijax.params import flat_params  # noqa: E402

TINY = dict(in_channels=16, out_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=64, num_heads=2,
            depth=2, depth_single_blocks=2, axes_dim=(8, 12, 12))


def diffusers_kwargs(cfg):
    return dict(in_channels=cfg.in_channels, num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
                attention_head_dim=cfg.head_dim, num_attention_heads=cfg.num_heads,
                joint_attention_dim=cfg.context_in_dim, pooled_projection_dim=cfg.vec_in_dim,
                guidance_embeds=cfg.guidance_embed, axes_dims_rope=tuple(cfg.axes_dim))


def torch_random(cfg, dtype, dev, seed=0):
    """diffusers' model with random weights filled on the device (kernels N(0, 1/fan_in), norms 1, biases 0)."""
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        ref = FluxTransformer2DModel(**diffusers_kwargs(cfg)).to(dtype)  # no f32 copy of 12B on the device
    ref = ref.to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                p.normal_(0.0, p.shape[1] ** -0.5, generator=g)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    return ref.eval()


def jax_random(cfg, dtype, seed=0):
    """FluxDiT with random bf16 weights drawn directly on the device (no host copy of 24 GB)."""
    return random_module(lambda: FluxDiT(cfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)), seed)


def make_inputs(cfg, grids, txt_len, seed=0):
    """Packed tokens and ids of each segment (grid (h, w) in tokens), text, pooled vector, t and guidance."""
    r = np.random.default_rng(seed)
    segs = []
    for n, (h, w) in enumerate(grids):
        rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        ids = np.stack([np.zeros(h * w), rr.ravel(), cc.ravel() + n * w], -1).astype(np.float32)
        segs.append((r.standard_normal((1, h * w, cfg.in_channels)).astype(np.float32), ids))
    txt = r.standard_normal((1, txt_len, cfg.context_in_dim)).astype(np.float32)
    y = r.standard_normal((1, cfg.vec_in_dim)).astype(np.float32)
    return segs, txt, np.zeros((txt_len, 3), np.float32), y, np.array([0.7], np.float32), np.array([3.5], np.float32)


def torch_call(ref, inp, dtype, dev):
    segs, txt, txt_ids, y, t, g = inp
    cat = lambda i: np.concatenate([s[i] for s in segs], axis=1 if i == 0 else 0)
    x = lambda a: torch.from_numpy(a).to(dev)
    img, ids = x(cat(0)).to(dtype), x(cat(1))

    @torch.inference_mode()
    def call():
        return ref(hidden_states=img, encoder_hidden_states=x(txt).to(dtype), pooled_projections=x(y).to(dtype),
                   timestep=x(t).to(dtype), img_ids=ids, txt_ids=x(txt_ids), guidance=x(g).to(dtype),
                   return_dict=False)[0]

    return call


def jax_call(model, inp, dtype, *, cond_t0: bool):
    """The segment-aware forward: with cond_t0 the first segment is a clean condition (t = 0, LoRA irrelevant)."""
    segs, txt, txt_ids, y, t, g = inp
    to = lambda a: jnp.asarray(a, dtype)

    def fn(m, imgs, txt, y):
        ss = [Segment(im, ids, jnp.zeros_like(jnp.asarray(t)) if (cond_t0 and n == 0 and len(segs) > 1) else t, g)
              for n, (im, (_, ids)) in enumerate(zip(imgs, segs))]
        return m.forward_segments(ss, txt, txt_ids, y, txt_timesteps=t)

    f = jit_module_fn(model, fn)
    imgs = [to(s[0]) for s in segs]
    return lambda: f(imgs, to(txt), to(y))


def stats(a, b):
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return dict(rel_l2=float(np.linalg.norm(a - b) / np.linalg.norm(b)),
                cosine=float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))


SHAPES = {"1024": ([(64, 64)], 512), "dd_3x512": ([(32, 32)] * 3, 512)}
TINY_SHAPES = {"1024": ([(6, 8)], 16), "dd_3x512": ([(4, 4)] * 3, 16)}


def speed(res, cfg, dev, tiny):
    res["shapes"] = {}
    ref = torch_random(cfg, torch.bfloat16, dev)
    model = jax_random(cfg, jnp.bfloat16)
    for name, (grids, txt_len) in (TINY_SHAPES if tiny else SHAPES).items():
        inp = make_inputs(cfg, grids, txt_len)
        img_tokens = sum(h * w for h, w in grids)
        flops = flux_flops(img_tokens, txt_len, cfg)
        r = dict(img_tokens=img_tokens, txt_tokens=txt_len, tflop_per_forward=round(flops / 1e12, 2))
        if not tiny:
            torch.cuda.reset_peak_memory_stats()
        t_torch = time_torch(torch_call(ref, inp, torch.bfloat16, dev)) if not tiny else float("nan")
        fwd = jax_call(model, inp, jnp.bfloat16, cond_t0=True)
        t0 = time.perf_counter()
        jax.block_until_ready(fwd())
        r["jax_first_call_s"] = round(time.perf_counter() - t0, 1)
        t_jax = time_jax(fwd)
        r.update(jax_ms=round(t_jax * 1e3, 1), jax_tflops=round(flops / t_jax / 1e12, 1),
                 jax_mfu=round(flops / t_jax / H100_BF16_PEAK, 3), jax_peak_gb=jax_peak_gb())
        if not tiny:
            r.update(diffusers_ms=round(t_torch * 1e3, 1), diffusers_mfu=round(flops / t_torch / H100_BF16_PEAK, 3),
                     diffusers_peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                     jax_over_diffusers=round(t_jax / t_torch, 3))
        res["shapes"][name] = r
        print(name, r, flush=True)


def train(res, cfg, tiny, remats, rank):
    """Forward + backward of a rank-`rank` LoRA (OminiControl's image-stream targets) at 3 x 512² + 512 text:
    composite at t = 0, the two noisy segments at t; loss on the noisy velocities; grads for the LoRA only."""
    grids, txt_len = (TINY_SHAPES if tiny else SHAPES)["dd_3x512"]
    model = jax_random(cfg, jnp.bfloat16)
    lora = FluxLoRA(cfg, lora_spec(cfg, rank, targets=IMAGE_STREAM_TARGETS), dtype=jnp.bfloat16,
                    param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    res["lora_params_M"] = round(sum(v.get_value().size for v in flat_params(lora, nnx.LoRAParam).values()) / 1e6, 1)
    segs, txt, txt_ids, y, t, g = make_inputs(cfg, grids, txt_len)
    img_tokens = sum(h * w for h, w in grids)
    # recomputation (remat) is not counted; the adapters act on every image token (the text is not adapted)
    flops = flux_flops(img_tokens, txt_len, cfg, lora_train=True, lora=lora, lora_tokens=img_tokens)
    res["tflop_per_step"] = round(flops / 1e12, 1)
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    imgs, targets = [bf(s[0]) for s in segs], [bf(s[0]) for s in segs[1:]]
    res["remat"] = {}
    for remat in remats:
        step = lora_step(model, lora, segs, txt, txt_ids, y, t, g, {"none": False, "full": True}.get(remat, remat))
        try:
            t0 = time.perf_counter()
            jax.block_until_ready(step(imgs, targets))
            first = time.perf_counter() - t0
            dt = time_jax(step, imgs, targets, n=3)
            r = dict(ms=round(dt * 1e3, 1), mfu=round(flops / dt / H100_BF16_PEAK, 3), first_call_s=round(first, 1),
                     peak_gb_so_far=jax_peak_gb())
        except Exception as e:  # an out-of-memory remat choice is a result, not a crash
            r = dict(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        res["remat"][remat] = r
        print(remat, r, flush=True)
        del step
        gc.collect()


def lora_step(model, lora, segs, txt, txt_ids, y, t, g, remat):
    """jit(value_and_grad) of the flow-matching loss on the noisy segments w.r.t. the LoRA params only;
    returns step(imgs, targets) -> (loss, grads)."""
    bf = lambda a: jnp.asarray(a, jnp.bfloat16)
    lg, params, rest = nnx.split(lora, nnx.LoRAParam, ...)
    bg, bstate = nnx.split(model)

    def loss_fn(lparams, lrest, bstate, imgs, targets):
        m, lo = nnx.merge(bg, bstate), nnx.merge(lg, lparams, lrest)
        ss = [Segment(im, ids, jnp.zeros_like(jnp.asarray(t)) if n == 0 else t, g, lora=True)
              for n, (im, (_, ids)) in enumerate(zip(imgs, segs))]
        out = m.forward_segments(ss, bf(txt), txt_ids, bf(y), txt_timesteps=t, lora=lo, remat=remat)
        return sum(jnp.mean(jnp.square(o.astype(jnp.float32) - tg.astype(jnp.float32)))
                   for o, tg in zip(out[1:], targets))

    f = jax.jit(jax.value_and_grad(loss_fn))
    return lambda imgs, targets: f(params, rest, bstate, imgs, targets)


def parity(res, cfg, dev, tiny):
    """f32 both sides (TF32 off, JAX matmul precision highest) at 512² + 512 text, same weights."""
    from converters import load_flux_dit

    ref = torch_random(cfg, torch.float32, dev)
    grids, txt_len = ([(4, 6)], 8) if tiny else ([(32, 32)], 512)
    inp = make_inputs(cfg, grids, txt_len)
    want = torch_call(ref, inp, torch.float32, dev)().float().cpu().numpy()
    sd = {k: v.detach().cpu() for k, v in ref.state_dict().items()}
    del ref
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    with jax.default_matmul_precision("highest"):
        _, m32 = load_flux_dit(sd, cfg, dtype=jnp.float32, param_dtype=jnp.float32)
        del sd
        got = np.asarray(jax_call(m32, inp, jnp.float32, cond_t0=False)()[0])
    res["parity_f32"] = stats(got, want)
    res["parity_tokens"] = sum(h * w for h, w in grids) + txt_len


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["speed", "train", "parity"], required=True)
    ap.add_argument("--tiny", action="store_true", help="tiny dims on the CPU (dry run)")
    ap.add_argument("--remat", default="full,none",
                    help="comma list for --part train: none, full, or jax.checkpoint_policies names")
    ap.add_argument("--rank", type=int, default=128)
    ap.add_argument("--parity-depth", default="4,8",
                    help="double,single block counts for --part parity (full widths; 19,38 = the whole model)")
    args = ap.parse_args()
    dev = "cpu" if args.tiny else "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = variant("dev", **TINY) if args.tiny else variant("dev")
    res = dict(date=str(datetime.date.today()), device=str(jax.devices()[0].device_kind), jax=jax.__version__,
               torch=torch.__version__, config="tiny" if args.tiny else "dev")
    t0 = time.perf_counter()
    if args.part == "speed":
        speed(res, cfg, dev, args.tiny)
    elif args.part == "train":
        train(res, cfg, args.tiny, args.remat.split(","), 4 if args.tiny else args.rank)
    else:
        d, s = (int(v) for v in args.parity_depth.split(","))
        cfg = cfg if args.tiny else cfg.replace(depth=d, depth_single_blocks=s)
        res["parity_depth"] = [cfg.depth, cfg.depth_single_blocks]
        parity(res, cfg, dev, args.tiny)
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    emit(f"bench_flux_{args.part}", res)


if __name__ == "__main__":
    main()
