"""Cross-framework parity: an omnijax model against its PyTorch reference, stage by stage, on the same weights.

The PyTorch side is the ecosystem's own model (diffusers / transformers) built from the same checkpoint files;
the JAX side is the omnijax model loaded by a caller-supplied function (`load_jax(kind, path, dtype)`, the model
registry's job). Both get the same seeded inputs and report hidden states at the same named stages (after each
transformer block, VAE stage or encoder layer) plus the output. For each stage the report holds the relative L2
error, the max abs error and the cosine similarity against the PyTorch float32 result, and the first stage whose
error exceeds the tolerance is named.

Tolerances (`tolerance_for`):
  f32   rel. L2 <= F32_TOL (1e-5: the parity tests' bound). The reference runs with TF32 off, JAX with matmul
        precision "highest". flux_dit allows 1e-4: its timestep and guidance sinusoids take arguments up to
        1000 and 3500 rad, where float32 rounding of the frequencies alone moves the embedding by ~1e-5 relative
        in either framework (measured on a tiny model: the modulation vector 1.7e-5 apart with guidance 4, 7.5e-6
        without guidance). Likewise the Wan DiT's time-embedding stages (`Adapter.f32_stage_tol`) are allowed
        1e-4: at 81x480x832 on an H200 its `time_embedding` was 1.05e-5 from diffusers' (t = 500; the blocks and
        the output 1.1e-6 and 2.4e-6), the same sinusoid rounding, which the modulation then averages out.
  bf16  as close as PyTorch is to itself: the reference also runs in bf16 (cast as its own loader casts it, so
        diffusers' `_keep_in_fp32_modules` stay f32), and at each stage
            rel_l2(JAX bf16, torch f32) <= BF16_K * max(rel_l2(torch bf16, torch f32), BF16_FLOOR)
        with BF16_K = 2 and BF16_FLOOR = 2**-8 (bf16's unit roundoff: a stage that rounds once to bf16 is
        allowed that much even where PyTorch happens to stay closer).

Memory: the frameworks run one after the other. The reference's stage outputs go to host numpy as they are
produced, the module is deleted and the accelerator cache emptied before the JAX model is loaded; the JAX side
runs stage by stage (one jitted call per block) and compares each stage on the host as it arrives, so device
memory holds one framework's model and one stage's activations at a time (a 14B DiT fits one GPU).

Adding a kind is one `Adapter` in a module listed in `_ADAPTER_MODULES`: converters/parity/wan.py has the Wan
kinds (wan_dit, wan_vae, umt5, wan_clip), converters/parity/flux.py the Flux ones (flux_dit, t5, clip_l, flux_vae).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import os
import resource
import time
from collections.abc import Callable, Mapping

import numpy as np

F32_TOL = 1e-5
BF16_K = 2.0
BF16_FLOOR = 2.0 ** -8
INSTALL_HINT = "pip install 'omnijax[parity]'  (or: pip install torch diffusers transformers)"

_ADAPTER_MODULES = ("converters.parity.wan", "converters.parity.flux")


class MissingReference(ImportError):
    """PyTorch (or diffusers / transformers) is not installed."""


class ReferenceBuildError(ValueError):
    """The PyTorch reference cannot be built from this source."""


Sink = Callable[[str, np.ndarray], None]


@dataclasses.dataclass(frozen=True)
class Adapter:
    """What parity needs to know about one model kind.

    reference(source, device, config) -> torch module (f32, eval) built by the ecosystem's loader from `source`;
      `config` (a dict or None) supplies what the weights cannot tell (e.g. {"num_heads": 12} for an in-memory
      Wan state dict), as a config.json beside the files would.
    inputs(ref, size, seed) -> {name: numpy array}: seeded inputs at `size` (the tuple `parse_size` returns).
    run_torch(ref, inputs, dtype, device, sink): forward pass calling sink(stage, numpy array) in stage order.
    run_jax(model, inputs, dtype, sink): the omnijax model's public pieces, calling sink with the same names.
    f32_tol: the kind's f32 bound when the 1e-5 class does not hold for a documented reason (flux_dit).
    f32_stage_tol: {stage: f32 bound} for single stages with a documented reason (the Wan time embedding).
    """

    kind: str
    default_size: str
    size_help: str
    parse_size: Callable[[str], tuple]
    reference: Callable
    inputs: Callable
    run_torch: Callable
    run_jax: Callable
    f32_tol: float = F32_TOL
    f32_stage_tol: Mapping[str, float] = dataclasses.field(default_factory=dict)


def adapters() -> dict[str, Adapter]:
    """{kind: Adapter} over every registered adapter module."""
    out = {}
    for mod in _ADAPTER_MODULES:
        for a in importlib.import_module(mod).ADAPTERS:
            out[a.kind] = a
    return out


def require_torch():
    """Imports torch, diffusers and transformers or raises MissingReference with the install line."""
    try:
        import diffusers  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        raise MissingReference(f"parity needs the PyTorch reference ({e.name} is missing): {INSTALL_HINT}") from e
    return torch


# ---- metrics and tolerances ---------------------------------------------------------------------------------

def compare(got, want) -> dict:
    """rel. L2, max abs error and cosine of `got` against `want` (float64 on the host)."""
    a = np.asarray(got, np.float64).ravel()
    b = np.asarray(want, np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {np.shape(got)} vs reference {np.shape(want)}")
    nb, na = np.linalg.norm(b), np.linalg.norm(a)
    diff = a - b
    return dict(rel_l2=float(np.linalg.norm(diff) / nb) if nb else float(np.linalg.norm(diff)),
                max_abs=float(np.abs(diff).max()) if diff.size else 0.0,
                cosine=float(a @ b / (na * nb)) if na and nb else float(na == nb))


def tolerance_for(dtype: str, torch_bf16_rel_l2: float | None = None, *, f32_tol: float = F32_TOL,
                  k: float = BF16_K, floor: float = BF16_FLOOR) -> float:
    """The rel. L2 bound of one stage (see the module docstring)."""
    if dtype == "f32":
        return f32_tol
    if torch_bf16_rel_l2 is None:
        raise ValueError("the bf16 tolerance needs the reference's own bf16 error at this stage")
    return k * max(torch_bf16_rel_l2, floor)


def cast_like_loader(module, dtype):
    """Casts a torch module as its library's loader does for `dtype`: diffusers keeps `_keep_in_fp32_modules`
    (and transformers `_keep_in_fp32_modules_strict`) in float32."""
    import torch

    module.to(dtype)
    keep = list(getattr(module, "_keep_in_fp32_modules", None) or [])
    if not type(module).__module__.startswith("diffusers"):
        keep = list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if keep:
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if any(k in name.split(".") for k in keep) and p.is_floating_point():
                p.data = p.data.to(torch.float32)
    return module


# ---- the run ------------------------------------------------------------------------------------------------

def _release_torch(torch, device):
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _host_peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def run_parity(kind: str, source, *, load_jax: Callable, converted: str | None = None, dtype: str = "f32",
               size: str | None = None, device: str = "cpu", seed: int = 0, f32_tol: float | None = None,
               k: float = BF16_K, reference_config: dict | None = None,
               log: Callable[[str], None] = lambda s: None) -> dict:
    """Runs the reference, then the omnijax model, and returns the report (see the module docstring).

    Args:
      kind: a key of `adapters()`.
      source: the PyTorch-side checkpoint (file, folder, or a mapping name -> tensor for kinds that allow it).
      load_jax: (kind, path, jax dtype) -> (config, omnijax model).
      converted: an omnijax folder (launch/convert.py) to test instead of converting `source` again.
      dtype: "f32" or "bf16" (compute and storage on both sides).
      size: the kind's input size string (Adapter.size_help); None for its default.
      device: "cpu" or "gpu".
      f32_tol: the f32 bound; None for the kind's (Adapter.f32_tol, normally F32_TOL). k: the bf16 multiple.
      reference_config: passed to the adapter's reference builder (see Adapter).
    Returns:
      the report dict: "stages" (list, forward order), "output", "first_failure" (a stage name or None), "ok",
      timings and peak memory.
    """
    kinds = adapters()
    if kind not in kinds:
        raise ValueError(f"unknown kind {kind!r}; parity knows: {', '.join(sorted(kinds))}")
    if dtype not in ("f32", "bf16"):
        raise ValueError(f"dtype must be f32 or bf16, got {dtype!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be cpu or gpu, got {device!r}")
    ad = kinds[kind]
    f32_tol = ad.f32_tol if f32_tol is None else f32_tol
    shape = ad.parse_size(size or ad.default_size)
    torch = require_torch()
    tdev = "cuda" if device == "gpu" else "cpu"
    if tdev == "cuda":
        if not torch.cuda.is_available():
            raise ReferenceBuildError("--device gpu, but this PyTorch has no CUDA device")
        torch.cuda.reset_peak_memory_stats()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    report = dict(kind=kind, source=source if isinstance(source, str) else "<in-memory state dict>",
                  converted=converted, dtype=dtype, size=size or ad.default_size, device=device, seed=seed,
                  tolerance=dict(rule="rel_l2 <= f32_tol" if dtype == "f32" else
                                 "rel_l2(jax bf16, torch f32) <= k * max(rel_l2(torch bf16, torch f32), floor)",
                                 f32_tol=f32_tol, k=k, floor=BF16_FLOOR),
                  versions={m: importlib.import_module(m).__version__ for m in ("torch", "diffusers", "transformers")})

    # ---- 1. the PyTorch reference: f32 states to the host, then (bf16) its own bf16 error, then release ----
    t0 = time.perf_counter()
    log(f"building the PyTorch reference ({kind}) on {tdev}")
    ref = ad.reference(source, tdev, reference_config)
    inputs = ad.inputs(ref, shape, seed)
    ref_states: dict[str, np.ndarray] = {}
    order: list[str] = []

    def keep(name, arr):
        ref_states[name] = np.asarray(arr, np.float32)
        order.append(name)

    with torch.inference_mode():
        ad.run_torch(ref, inputs, torch.float32, tdev, keep)
        torch_bf16 = {}
        if dtype == "bf16":
            log("running the reference again in bf16")
            cast_like_loader(ref, torch.bfloat16)
            ad.run_torch(ref, inputs, torch.bfloat16, tdev,
                         lambda n, a: torch_bf16.__setitem__(n, compare(a, ref_states[n])))
    del ref
    _release_torch(torch, tdev)
    report["torch_s"] = round(time.perf_counter() - t0, 2)
    if tdev == "cuda":
        report["torch_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    # ---- 2. the omnijax model, stage by stage, compared as each stage arrives ----
    import jax
    import jax.numpy as jnp

    jdtype = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
    platform = "cpu" if device == "cpu" else "gpu"
    t1 = time.perf_counter()
    rows: dict[str, dict] = {}

    def check(name, arr):
        if name not in ref_states:
            rows[name] = dict(stage=name, error="no reference stage of this name")
            return
        row = dict(stage=name, **compare(arr, ref_states.pop(name)))  # pop: free each reference state when used
        if dtype == "bf16":
            row["torch_bf16_rel_l2"] = torch_bf16[name]["rel_l2"]
            row["torch_bf16_cosine"] = torch_bf16[name]["cosine"]
        row["tolerance"] = tolerance_for(dtype, row.get("torch_bf16_rel_l2"),
                                         f32_tol=max(f32_tol, ad.f32_stage_tol.get(name, 0.0)), k=k)
        row["ok"] = bool(row["rel_l2"] <= row["tolerance"])
        rows[name] = row

    precision = "highest" if dtype == "f32" else "default"
    with jax.default_device(jax.devices(platform)[0]), jax.default_matmul_precision(precision):
        log(f"loading the omnijax model from {converted or report['source']}")
        _, model = load_jax(kind, converted or source, jdtype)
        report["jax_load_s"] = round(time.perf_counter() - t1, 2)
        ad.run_jax(model, inputs, jdtype, check)
        del model
    report["jax_s"] = round(time.perf_counter() - t1, 2)
    if device == "gpu":
        stats = jax.devices(platform)[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            report["jax_peak_gb"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
    report["host_peak_gb"] = _host_peak_gb()
    report["versions"]["jax"] = jax.__version__

    stages = [rows[n] for n in order if n in rows and n != "output"]
    report["stages"] = stages
    report["output"] = rows.get("output")
    report["missing_in_jax"] = [n for n in order if n not in rows]
    report["unmatched_jax"] = [r["stage"] for r in rows.values() if "error" in r]
    failing = [r["stage"] for r in stages + ([report["output"]] if report["output"] else []) if not r.get("ok")]
    report["first_failure"] = failing[0] if failing else None
    report["ok"] = not failing and report["output"] is not None and not report["missing_in_jax"]
    return report


def summary_table(report: Mapping) -> str:
    """A fixed-width table of the stages and the output, with the verdict underneath."""
    bf16 = report["dtype"] == "bf16"
    head = f"{'stage':<34} {'rel_l2':>10} {'max_abs':>10} {'cosine':>14}"
    head += f" {'torch_bf16':>10}" if bf16 else ""
    head += f" {'tolerance':>10}  ok"
    lines = [head, "-" * len(head)]
    rows = list(report["stages"]) + ([report["output"]] if report.get("output") else [])
    for r in rows:
        if "error" in r:
            lines.append(f"{r['stage']:<34} {r['error']}")
            continue
        line = f"{r['stage']:<34} {r['rel_l2']:>10.3e} {r['max_abs']:>10.3e} {r['cosine']:>14.10f}"
        line += f" {r['torch_bf16_rel_l2']:>10.3e}" if bf16 else ""
        line += f" {r['tolerance']:>10.3e}  {'yes' if r['ok'] else 'NO'}"
        lines.append(line)
    if report.get("missing_in_jax"):
        lines.append(f"stages the omnijax side did not produce: {', '.join(report['missing_in_jax'])}")
    verdict = ("PASS: every stage within tolerance" if report["ok"] else
               f"FAIL: first stage over tolerance: {report['first_failure']}" if report["first_failure"] else
               "FAIL: stages missing on the omnijax side")
    lines.append(verdict)
    return "\n".join(lines)


def plot(report: Mapping, path: str):
    """PNG of rel. L2 error per stage (log scale), with the reference's own bf16 error and the tolerance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in list(report["stages"]) + [report.get("output")] if r and "error" not in r]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(rows)), 4.0))
    eps = 1e-12
    ax.semilogy(x, [r["rel_l2"] + eps for r in rows], "o-", label=f"omnijax {report['dtype']} vs torch f32")
    if report["dtype"] == "bf16":
        ax.semilogy(x, [r["torch_bf16_rel_l2"] + eps for r in rows], "s--", label="torch bf16 vs torch f32")
    ax.semilogy(x, [r["tolerance"] for r in rows], "k:", label="tolerance")
    bad = [i for i, r in enumerate(rows) if not r["ok"]]
    if bad:
        ax.semilogy(bad, [rows[i]["rel_l2"] + eps for i in bad], "rx", ms=10, label="over tolerance")
    ax.set_xticks(x)
    ax.set_xticklabels([r["stage"] for r in rows], rotation=90, fontsize=6)
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"{report['kind']} parity, {report['dtype']}, {report['size']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
