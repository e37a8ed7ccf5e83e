"""What the trainer tests share: a config module's runlocal config with overrides, and the logged losses."""

import json
import os


def runlocal_config(module, **overrides):
    """module.get_config("runlocal") with dotted keys overridden ({"loss.shift": 3.0})."""
    from configs.common import override

    return override(module.get_config("runlocal"), overrides)


def logged_losses(workdir):
    """{step: loss} from the run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}
