"""Training data defaults: outside runlocal the omnimatte task trains on fg/bg folders, and the procedural toy
source only when asked for by name; a missing folder is a one-line error naming the config keys."""

import numpy as np
import pytest

from configs import effect_expert, quality_expert
from data.procedural import ProceduralSource
from data.sources import VideoFolderSource, VideoMatteSource
from omnijax.io.video import write_frames
from tasks import SetupError
from tasks import omnimatte as task


def _config(module, arg=None, **overrides):
    c = module.get_config(arg)
    for key, value in overrides.items():
        group, name = key.split(".")
        c[group][name] = value
    return c


def _folders(root):
    rng = np.random.default_rng(0)
    write_frames(str(root / "fg" / "fgr" / "0000"), rng.integers(0, 255, (6, 40, 56, 3), np.uint8))
    alpha = np.zeros((6, 40, 56), np.uint8)
    alpha[:, 10:30, 20:40] = 255
    write_frames(str(root / "fg" / "pha" / "0000"), alpha)
    write_frames(str(root / "bg" / "clip"), rng.integers(0, 255, (6, 48, 64, 3), np.uint8))
    return str(root / "fg"), str(root / "bg")


@pytest.mark.parametrize("module", [effect_expert, quality_expert])
def test_default_config_needs_folders(module):
    c = module.get_config()
    assert c.input.source == "videomatte"
    with pytest.raises(SetupError) as err:
        task.input_pipeline(c, seed=0)
    msg = str(err.value)
    assert "\n" not in msg
    assert "config.input.fg_dir and config.input.bg_dir not set" in msg and "--config.input.source=procedural" in msg


def test_one_missing_folder_is_named(tmp_path):
    fg, _ = _folders(tmp_path)
    with pytest.raises(SetupError, match=r"^config.input.bg_dir not set"):
        task.pixel_source(_config(effect_expert, **{"input.fg_dir": fg}), seed=0)


def test_unknown_source_and_procedural_with_folders(tmp_path):
    with pytest.raises(SetupError, match="config.input.source='shapes': must be one of videomatte, procedural"):
        task.pixel_source(_config(effect_expert, **{"input.source": "shapes"}), seed=0)
    fg, bg = _folders(tmp_path)
    with pytest.raises(SetupError, match="ignores config.input.fg_dir/bg_dir"):
        task.pixel_source(_config(effect_expert, **{"input.source": "procedural", "input.fg_dir": fg,
                                                     "input.bg_dir": bg}), seed=0)


def test_folders_and_named_procedural_source(tmp_path):
    fg, bg = _folders(tmp_path)
    ds = task.pixel_source(_config(effect_expert, **{"input.fg_dir": fg, "input.bg_dir": bg}), seed=0)
    assert isinstance(ds.fg, VideoMatteSource) and isinstance(ds.bg, VideoFolderSource)
    toy = task.pixel_source(_config(effect_expert, **{"input.source": "procedural"}), seed=0)
    assert isinstance(toy.fg, ProceduralSource) and isinstance(toy.bg, ProceduralSource)
    assert effect_expert.get_config("runlocal").input.source == "procedural"


def test_preview_clip_without_folders():
    """A latent-cache run has no pixel folders: its preview clip is procedural rather than an error."""
    ds = task.pixel_source(effect_expert.get_config(), seed=0, preview=True)
    assert isinstance(ds.fg, ProceduralSource) and isinstance(ds.bg, ProceduralSource)
