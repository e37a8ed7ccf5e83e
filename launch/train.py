"""The one trainer: drives any task (tasks/__init__.py) chosen by `config.task`; nothing here is task-specific.

  python launch/train.py --config configs/effect_expert.py --workdir runs/effect [--config.key=value ...]
  python launch/train.py --config configs/effect_expert.py:runlocal --workdir /tmp/effect     # tiny, CPU
  python launch/train.py --config configs/effect_expert.py --workdir runs/effect --config.input.latent_cache=DIR

The loop itself is tasks/trainer.py (`train`); this is its command: flags, the config check, logs, exit codes.
The workdir holds checkpoints/ (the trained params, i.e. the task's Models.wrt: the LoRA adapters or every weight;
optimizer state, step, data-iterator state, rng, the task's signature and the chrono state: a rerun resumes
exactly), metrics.jsonl + TensorBoard events, previews/*.png and what the task exports, and train.log (every
log line; the console shows this project's lines and library warnings, all of them with --verbose).

Before any model is built the config's numbers, model files and the workdir are checked (one line, exit code 2;
an unknown --config.key lists the close matches). A resume must have the checkpoint's signature (expert kind,
rank, targets, base size); other changed settings (lr, total_steps, ...) are logged and take effect. When the
non-finite guard stops a run, the checkpoints saved from the state that went bad are deleted, so a rerun (with a
lower --config.lr) resumes from a good one.
"""

from __future__ import annotations

import difflib
import importlib.util
import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from launch import common  # noqa: F401  (sets XLA flags before jax initialises a backend)
from tasks import SetupError
from tasks.trainer import check_config, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "training config file", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, previews, LoRA files)")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host runs)")
_VERBOSE = flags.DEFINE_bool("verbose", False, "print every library log line (orbax, XLA) on the console too; "
                             "they always go to WORKDIR/train.log")

def _unknown_key(argv: list[str]) -> str | None:
    """For `--config.a.b=...` overrides naming no config field: one line with the close matches."""
    spec = next((a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
                 for i, a in enumerate(argv) if a in ("--config", "-config") or a.startswith("--config=")), None)
    if spec is None:
        return None
    path, _, arg = spec.partition(":")
    mod_spec = importlib.util.spec_from_file_location("_config_for_check", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    config = module.get_config(arg or None)
    for a in argv:
        if not a.startswith("--config."):
            continue
        node, done = config, []
        for part in a[len("--config."):].split("=", 1)[0].split("."):
            if not hasattr(node, "keys") or part not in node:
                keys = [".".join([*done, k]) for k in node.keys()] if hasattr(node, "keys") else []
                close = [".".join([*done, k]) for k in
                         difflib.get_close_matches(part, list(node.keys()) if keys else [], n=5, cutoff=0.5)]
                hint = f"close matches: {', '.join(close)}" if close else f"keys here: {', '.join(keys[:20])}"
                return f"error: unknown config key config.{'.'.join([*done, part])} ({hint})"
            node, done = node[part], [*done, part]
    return None


def _parse_flags(argv):
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError) as e:
        try:
            line = _unknown_key(argv)
        except Exception:  # noqa: BLE001  (the hint is best effort; the original error is reported instead)
            line = None
        print(line or f"error: bad --config override: {e}", file=sys.stderr)
        sys.exit(2)


def _quiet_logs(workdir: str, verbose: bool) -> None:
    """Every log line goes to WORKDIR/train.log; the console gets this project's INFO lines and every library's
    warnings (orbax writes ~35 INFO lines per checkpoint), unless --verbose."""
    os.makedirs(workdir, exist_ok=True)
    handler = pylogging.FileHandler(os.path.join(workdir, "train.log"))
    handler.setFormatter(logging.PythonFormatter())
    pylogging.getLogger().addHandler(handler)
    if not verbose:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        logging.get_absl_handler().addFilter(
            lambda r: r.levelno >= pylogging.WARNING or os.path.abspath(r.pathname).startswith(root + os.sep))


def main(argv):
    del argv
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    if _CONFIG.value is None or _WORKDIR.value is None:
        raise app.UsageError("--config and --workdir are required")
    try:
        check_config(_CONFIG.value, _WORKDIR.value)
        _quiet_logs(_WORKDIR.value, _VERBOSE.value)
        train(_CONFIG.value, _WORKDIR.value)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
