"""Write an expert's LoRA in the namings other tools load (README, "LoRA files"), from a training run or a file.

  python launch/export_lora.py --source /runs/effect --format comfy --format peft --out /exports
  python launch/export_lora.py --source lora_effect_omnijax.safetensors --format comfy --out effect_comfy.safetensors
  python launch/export_lora.py --source flux_lora.safetensors --format peft --format comfy --out /exports   # Flux

--source: a training workdir (its checkpoints/), a checkpoints directory, one step directory (checkpoints/<step>),
or a LoRA file in any format omnijax reads (a Wan expert's or a Flux LoRA's). From checkpoints the latest step is
used unless --step is given; the adapters are the checkpoint's params and the expert config (rank, alpha, blocks,
targets, mask) its metadata.
--out: a .safetensors path (one --format) or a directory that gets lora_<expert>_<format>.safetensors. Every file
is written atomically; an existing one is kept unless --overwrite.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import common  # noqa: E402,F401  (sets XLA flags first)
from omnijax.io.atomic import unwritable  # noqa: E402
from omnijax.omnimatte import lora_io  # noqa: E402
from omnijax.omnimatte.experts import ExpertConfig  # noqa: E402


class ExportError(RuntimeError):
    """The source cannot be exported (named in the message)."""


def _checkpoint_dir(path: str) -> tuple[str, int | None]:
    """(checkpoints directory, step or None) of a workdir, checkpoints directory or step directory."""
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return os.path.join(path, "checkpoints"), None
    name = os.path.basename(os.path.normpath(path))
    if name.isdigit() and os.path.isdir(os.path.join(path, "params")):
        return os.path.dirname(os.path.normpath(path)), int(name)
    return path, None


def read_checkpoint(path: str, step: int | None = None) -> tuple[dict, ExpertConfig, int]:
    """(adapters, expert, step) of a trainer checkpoint (layout: omnijax/training/checkpoint.py)."""
    import jax
    import numpy as np
    import orbax.checkpoint as ocp

    directory, dir_step = _checkpoint_dir(os.path.abspath(path))
    step = dir_step if step is None else step
    handlers = {"params": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    manager = ocp.CheckpointManager(directory, item_handlers=handlers)
    steps = list(manager.all_steps())
    if not steps:
        raise ExportError(f"no training checkpoint in {directory}")
    step = max(steps) if step is None else step
    if step not in steps:
        raise ExportError(f"no checkpoint for step {step} in {directory}; have {sorted(steps)}")
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    expert = (meta.get("extra") or {}).get("expert")
    if expert is None:
        raise ExportError(f"checkpoint {directory}/{step} does not record its expert config (meta.extra.expert)")
    # Read every array onto one local device, whatever mesh wrote it.
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    stored = manager.item_metadata(step)["params"]
    target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device) for k, m in stored.items()}
    params = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))["params"]
    manager.close()
    expert = ExpertConfig.from_dict(expert)
    return lora_io.params_adapters({k: np.asarray(v) for k, v in params.items()}, expert), expert, step


def read_flux_file(tensors: dict, meta: dict) -> dict | None:
    """The adapters {module path: {"a", "b", "alpha"}} of a Flux LoRA file (None: not one)."""
    from omnijax.models.flux.lora_files import FLUX_NAMING

    try:
        return lora_io.tensors_to_adapters(tensors, meta, naming=FLUX_NAMING)[1]
    except lora_io.LoRAFileError as e:
        if "not a flux LoRA file" in str(e):
            return None
        raise


def read_file(path: str, mask: str | None) -> tuple[dict, ExpertConfig | None]:
    """(adapters, expert) of a LoRA file; `mask` only where the file does not state its expert. A Flux LoRA file
    has no expert (None)."""
    import numpy as np

    tensors, meta = lora_io.read_lora_file(path)
    try:
        _, adapters, _ = lora_io.lora_entries(tensors, meta)
    except lora_io.LoRAFileError as e:
        adapters = read_flux_file(tensors, meta) if "not a wan LoRA file" in str(e) else None
        if adapters is None:
            raise
        if not adapters:
            raise ExportError(f"{path} holds no Flux LoRA adapters") from e
        return adapters, None
    if not adapters:
        raise ExportError(f"{path} holds no branch-LoRA adapters")
    expert = lora_io.expert_from_lora(path, mask=mask, name=None)
    for ad in adapters.values():  # e.g. a peft file (alpha/r folded in): back to the expert's own alpha
        if ad["alpha"] != expert.alpha:
            b = np.asarray(ad["b"])
            ad["b"] = (b.astype(np.float64) * (ad["alpha"] / expert.alpha)).astype(np.result_type(b.dtype, np.float32))
            ad["alpha"] = float(expert.alpha)
    return adapters, expert


def _targets(out: str, formats: list[str], name: str) -> dict[str, str]:
    if out.endswith(".safetensors"):
        if len(formats) != 1:
            raise ExportError(f"--out {out} is one file but {len(formats)} formats were asked for; give a directory")
        return {formats[0]: out}
    return {fmt: os.path.join(out, f"lora_{name}_{fmt}.safetensors") for fmt in formats}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help="training workdir, checkpoints dir, step dir, or LoRA file")
    p.add_argument("--format", action="append", required=True, choices=tuple(lora_io.FILE_FORMATS), dest="formats",
                   help="output naming (repeat for several; diffusers and bfl for Flux LoRAs only)")
    p.add_argument("--out", required=True, help="output .safetensors file (one format) or directory")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--mask", choices=("A", "B", "C"), default=None,
                   help="the expert's attention mask, for a source file that does not state it")
    p.add_argument("--name", default=None, help="expert name in output file names (default: the expert's)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)
    try:
        why = unwritable(args.out)  # before reading anything
        if why:
            raise ExportError(f"--out {args.out}: {why}")
        if os.path.isfile(args.source):
            adapters, expert = read_file(args.source, args.mask)
            where = args.source
        elif os.path.isdir(args.source):
            adapters, expert, step = read_checkpoint(args.source, args.step)
            where = f"{args.source} step {step}"
        else:
            raise ExportError(f"no file or directory at {args.source}")
        if expert is None:  # a Flux LoRA
            from omnijax.models.flux.lora_files import FLUX_NAMING as naming

            name = args.name or "flux"
            ranks = sorted({ad["a"].shape[1] for ad in adapters.values()})
            what = f"ranks {ranks}"
        else:
            naming = lora_io.WAN_NAMING
            name = args.name or (expert.name if expert.name and expert.name != "loaded" else "expert")
            what = f"rank {expert.rank}, alpha {expert.alpha:g}"
        formats = list(dict.fromkeys(args.formats))
        bad = [f for f in formats if f not in naming.formats]
        if bad:
            raise ExportError(f"{naming.backbone} LoRAs have no {bad[0]} format; choose from {naming.formats}")
        targets = _targets(args.out, formats, name)
        existing = [t for t in targets.values() if os.path.exists(t)]
        if existing and not args.overwrite:
            raise ExportError(f"{existing[0]} exists (pass --overwrite to replace it)")
        for fmt, path in targets.items():
            lora_io.save_adapters(path, adapters, expert, fmt=fmt, naming=naming)
            print(f"wrote {path} ({fmt}: {len(adapters)} adapters, {what}, from {where})")
    except (ExportError, lora_io.LoRAFileError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
