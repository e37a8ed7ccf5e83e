"""TFDS builder for synthetic omnimatte composites, written as array_record and read without TensorFlow.

Every field is a uint8 `Tensor` feature (zlib-encoded): TFDS's Image/Video features need TensorFlow, plain
tensors do not. Float fields in [0, 1] are stored as round(255·x); binary masks as 0/255; `params` is a float32
vector in the order of `PARAM_KEYS`. Because of the 8-bit rounding, V = αF + (1 − α)B holds to about 2/255 on
read-back (exactly before quantisation).

    builder = OmnimatteSynth(config=OmnimatteSynthConfig(name="tiny", num_frames=9, height=64, width=64,
                                                         num_train=8, num_validation=2), data_dir=DIR)
    builder.download_and_prepare(file_format="array_record")
    source = builder.as_data_source("train")          # random access, feeds grain
    sample = decode(source[0])                         # float32 arrays as the compositor produced them

`tfds.data_source("omnimatte_synth/tiny", data_dir=DIR)` reads the same files once this module is imported.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data.composite import PARAM_NAMES, CompositeConfig
from data.procedural import ProceduralSource
from data.sources import VideoFolderSource, VideoMatteSource
from data.synthetic import SyntheticOmnimatte

PARAM_KEYS = PARAM_NAMES + ("fg_index", "bg_index", "index")
RGB_KEYS = ("video", "background", "foreground")
GREY_KEYS = ("alpha", "mask", "effect_mask")
VALIDATION_SEED_OFFSET = 1_000_003  # validation samples come from another seed stream than train


@dataclasses.dataclass
class OmnimatteSynthConfig(tfds.core.BuilderConfig):
    """Clip size, sample counts and sources of one dataset variant.

    `fg_dir` (VideoMatte240K layout) and `bg_dir` (any folder of videos) default to the procedural sources.
    """

    num_frames: int = 9
    height: int = 64
    width: int = 64
    num_train: int = 64
    num_validation: int = 8
    seed: int = 0
    fg_dir: str | None = None
    bg_dir: str | None = None


class OmnimatteSynth(tfds.core.GeneratorBasedBuilder):
    """Synthetic omnimatte composites (paper appendix B) with all ground-truth layers."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "uint8 tensors: video, background, foreground, alpha, mask, effect_mask; params."}
    BUILDER_CONFIGS = [
        OmnimatteSynthConfig(name="tiny", description="9x64x64, procedural", num_train=16, num_validation=4),
        OmnimatteSynthConfig(name="small", description="17x256x448, procedural", num_frames=17, height=256,
                             width=448, num_train=1000, num_validation=50),
        OmnimatteSynthConfig(name="wan480", description="81x480x832, procedural", num_frames=81, height=480,
                             width=832, num_train=2000, num_validation=50),
    ]
    DEFAULT_CONFIG_NAME = "tiny"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup touches `importlib_resources` (not a dependency here) for every package-installed
        # builder; the builder's file is all it needs.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        f, h, w = c.num_frames, c.height, c.width
        t = lambda shape, dtype=np.uint8: tfds.features.Tensor(shape=shape, dtype=dtype, encoding="zlib")
        feats = {k: t((f, h, w, 3)) for k in RGB_KEYS}
        feats.update({k: t((f, h, w)) for k in GREY_KEYS})
        feats["params"] = tfds.features.Tensor(shape=(len(PARAM_KEYS),), dtype=np.float32)
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(feats),
                                              description="Synthetic omnimatte composites with shadows.")

    def _dataset(self, seed: int) -> SyntheticOmnimatte:
        c = self.builder_config
        cfg = CompositeConfig(num_frames=c.num_frames, height=c.height, width=c.width)
        fg = VideoMatteSource(c.fg_dir, seed=seed) if c.fg_dir else ProceduralSource(seed)
        bg = VideoFolderSource(c.bg_dir, seed=seed) if c.bg_dir else ProceduralSource(seed + 1)
        return SyntheticOmnimatte(cfg, foregrounds=fg, backgrounds=bg, seed=seed, length=1 << 30)

    def _split_generators(self, dl_manager):
        c = self.builder_config
        return {
            "train": self._generate_examples(c.seed, c.num_train),
            "validation": self._generate_examples(c.seed + VALIDATION_SEED_OFFSET, c.num_validation),
        }

    def _generate_examples(self, seed: int, count: int):
        ds = self._dataset(seed)
        for i in range(count):
            yield i, encode(ds[i])


def _u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, np.float32) * 255.0), 0, 255).astype(np.uint8)


def encode(sample: dict) -> dict:
    """Compositor sample (float32 in [0, 1]) -> uint8 feature dict (plus float32 params vector)."""
    out = {k: _u8(sample[k]) for k in RGB_KEYS + GREY_KEYS}
    out["params"] = np.array([sample["params"].get(k, np.nan) for k in PARAM_KEYS], np.float32)
    return out


def decode(example: dict) -> dict:
    """Stored example -> float32 arrays in [0, 1] and a params dict, as `SyntheticOmnimatte` returns them."""
    out = {k: np.asarray(example[k], np.float32) * np.float32(1 / 255) for k in RGB_KEYS + GREY_KEYS}
    out["params"] = {k: float(v) for k, v in zip(PARAM_KEYS, np.asarray(example["params"]))}
    return out
