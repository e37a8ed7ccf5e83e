"""AlphaBlend-style composites for DiffDecompose (paper §3.1, appendix A): blending operators and a generator.

The paper's dataset is not public; this module rebuilds its recipe. A sample is a foreground RGBA layer
(colour F, straight alpha a) and an RGB background B combined by the subtask's operator I = G_s(F, a, B). The
six subtasks, in the paper's order I..VI, and the operator each uses:

| subtask   | paper name                          | operator G_s (all images float in [0, 1])                  |
|-----------|-------------------------------------|-------------------------------------------------------------|
| flare     | I   translucent flare removal       | screen:      1 − (1 − a·F)·(1 − B)                          |
| occlusion | II  translucent occlusion removal   | over:        a·F + (1 − a)·B, a spans the whole frame       |
| watermark | III semi-transparent watermark      | over:        a·F + (1 − a)·B, a = opacity·logo alpha < 0.25 |
| glassware | IV  transparent glassware           | (1 − a)·B + a·g, g = F·B where B < 0.5, 1 − (1−F)(1−B) else |
| cell      | V   semi-transparent cells          | additive:    min(B + a·F, 1)                                |
| xray      | VI  X-ray contraband                | multiply:    (1 − a)·B + a·F·B                              |

Where the paper left a choice open, this module's choice (each is a config knob where it matters):
- watermark: the paper writes I = (1 − α)·A + α·B, i.e. its α is the *background's* weight; we use the usual
  a = 1 − α for the watermark's opacity, so "opacity below 0.25" means a ≤ 0.25 (range (0.1, 0.25); below 0.1 a
  mark is nearly invisible). "Size 96~128" is read as the side in pixels of the square box the mark fits in at
  the paper's 512 px training size, scaled by min(H, W)/512 at other sizes.
- flare: the paper says "full-image diffuse blending"; screen mode (the brief's and the lens-flare literature's
  choice) is used, with the flare given premultiplied (a·F is the light it adds).
- occlusion: "full-image, diffuse blending" of fog / rain / dirt layers; ordinary over-compositing with an alpha
  that varies over the whole frame.
- glassware: the paper's piecewise rule keyed on the background value, per channel, applied where the glass is
  (mixed by a, so I = B outside the glass). The paper writes g = F·B and g = 1 − (1−F)(1−B) without the factor
  2 of the standard overlay mode; we follow the paper. B exactly 0.5 takes the screen branch.
- cell: the paper's additive I = A + B; the sum is clipped at 1 to stay an image (dark microscopy backgrounds
  keep clipping rare).
- xray: exactly the paper's (1 − α)·B + α·(A/255·B/255·255), in [0, 1] units.

Ground truth kept with every sample: the straight foreground colour and alpha, the background, and
`foreground`, the RGB image a model learns as the foreground layer: F composited over the subtask's neutral
colour N_s, a·F + (1 − a)·N_s. N_s is black except for X-ray, where it is white, so the layer is the additive
light for flare/cell (= G_s(F, a, black)), the premultiplied mark for watermark/occlusion, and the transmission
map 1 − a(1 − F) for X-ray (= G_s(F, a, white), the image the composite is multiplied by).

Axis letters: H height, W width. Samples are dicts of float32 arrays in [0, 1], channels-last (see
`AlphaBlendDataset`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from omnijax.io.video import IMAGE_SUFFIXES, VideoError, iter_frames

SUBTASKS = ("flare", "occlusion", "watermark", "glassware", "cell", "xray")
F32 = np.float32


# ------------------------------------------------------------------------------------------- blending operators
def _a(alpha):
    return np.asarray(alpha, F32)[..., None]


def blend_over(fg, alpha, bg):
    """a·F + (1 − a)·B (watermark, occlusion). fg, bg [..., 3]; alpha [...]."""
    a = _a(alpha)
    return a * fg + (1 - a) * bg


def blend_screen(fg, alpha, bg):
    """Screen of the premultiplied layer: 1 − (1 − a·F)·(1 − B) (flare)."""
    return 1 - (1 - _a(alpha) * fg) * (1 - bg)


def blend_add(fg, alpha, bg):
    """Additive, clipped at 1: min(B + a·F, 1) (cell)."""
    return np.minimum(bg + _a(alpha) * fg, F32(1))


def blend_multiply(fg, alpha, bg):
    """X-ray attenuation: (1 − a)·B + a·F·B (xray)."""
    a = _a(alpha)
    return (1 - a) * bg + a * (fg * bg)


def blend_glass(fg, alpha, bg):
    """(1 − a)·B + a·g with g = F·B where B < 0.5 and 1 − (1 − F)(1 − B) elsewhere, per channel (glassware)."""
    a = _a(alpha)
    g = np.where(bg < 0.5, fg * bg, 1 - (1 - fg) * (1 - bg))
    return (1 - a) * bg + a * g


BLENDS = {"flare": blend_screen, "occlusion": blend_over, "watermark": blend_over, "glassware": blend_glass,
          "cell": blend_add, "xray": blend_multiply}
# Colour the foreground layer is shown over (module docstring): the operator's identity background.
NEUTRAL = {"flare": 0.0, "occlusion": 0.0, "watermark": 0.0, "glassware": 0.0, "cell": 0.0, "xray": 1.0}
# Words for the prompt: what the foreground is, what the background is, and the blending type.
DESCRIPTIONS = {
    "flare": ("a translucent lens flare and glare", "a natural photograph", "screen blending"),
    "occlusion": ("a translucent layer of fog, rain and dirt on a window", "a natural photograph",
                  "full-image alpha blending"),
    "watermark": ("a semi-transparent watermark logo with text", "a natural photograph", "alpha blending"),
    "glassware": ("a transparent glass object", "a natural photograph", "transparent glass blending"),
    "cell": ("semi-transparent overlapping cells", "a microscopy background", "additive blending"),
    "xray": ("contraband items in an X-ray scan", "an X-ray scan of a bag", "multiplicative X-ray attenuation"),
}
# The paper's template (§3.3) with the blending type added after "The overlapped of <image-1> and <image-2>":
# the paper conditions on the blending type but does not print how; image-1 = foreground, image-2 = background.
PROMPT_TEMPLATE = ("Three sub-images. <image-1>: {foreground}, <image-2>: {background}, <image-3>: The overlapped "
                   "of <image-1> and <image-2> by {blend}.")


def check_subtask(subtask: str) -> str:
    if subtask not in BLENDS:
        raise ValueError(f"unknown subtask {subtask!r}; known: {', '.join(SUBTASKS)}")
    return subtask


def blend(subtask: str, fg, alpha, bg) -> np.ndarray:
    """The composite I = G_subtask(F, a, B). fg, bg float [..., H, W, 3] in [0, 1]; alpha [..., H, W]."""
    return BLENDS[check_subtask(subtask)](fg, alpha, bg)


def foreground_layer(subtask: str, fg, alpha, neutral: float | None = None) -> np.ndarray:
    """The RGB foreground layer a·F + (1 − a)·N (module docstring); N defaults to NEUTRAL[subtask]."""
    n = F32(NEUTRAL[check_subtask(subtask)] if neutral is None else neutral)
    a = _a(alpha)
    return a * fg + (1 - a) * n


def build_prompt(subtask: str, template: str = PROMPT_TEMPLATE, descriptions: dict | None = None) -> str:
    """The text prompt of a subtask: `template` filled with its (foreground, background, blend) descriptions.

    Args:
      descriptions: subtask -> (foreground, background, blend) overriding DESCRIPTIONS (e.g. from a config).
    """
    d = dict(DESCRIPTIONS)
    d.update(descriptions or {})
    fg, bg, bl = d[check_subtask(subtask)]
    return template.format(foreground=fg, background=bg, blend=bl)


# ------------------------------------------------------------------------------------------- folder sources
def resize_image(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Float [h, w, C] -> [height, width, C] by PIL's bilinear filter (antialiased when shrinking)."""
    from PIL import Image

    if img.shape[:2] == (height, width):
        return img.astype(F32)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], F32), mode="F")
                        .resize((width, height), Image.BILINEAR)) for c in range(img.shape[-1])]
    return np.stack(chans, -1).astype(F32)


def _cover(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to cover height×width keeping the aspect, then centre-crop."""
    h, w = img.shape[:2]
    k = max(height / h, width / w)
    nh, nw = max(height, round(h * k)), max(width, round(w * k))
    img = resize_image(img, nh, nw)
    y, x = (nh - height) // 2, (nw - width) // 2
    return img[y:y + height, x:x + width]


def _fit(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize to fit inside height×width keeping the aspect."""
    h, w = img.shape[:2]
    k = min(height / h, width / w)
    return resize_image(img, max(1, round(h * k)), max(1, round(w * k)))


def find_images(root: str) -> list[str]:
    """Image files under `root` (recursive), sorted. Raises VideoError for a missing or empty folder."""
    if not os.path.isdir(root):
        raise VideoError(f"{root}: no such folder")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        out += [os.path.join(dirpath, n) for n in filenames
                if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")]
    if not out:
        raise VideoError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return sorted(out)


def read_rgba(path: str) -> np.ndarray:
    """One image as float32 RGBA [H, W, 4] in [0, 1] (opaque where the file has no alpha)."""
    return next(iter_frames(path, alpha=True, max_frames=1)).astype(F32) / F32(255)


class RGBAFolderSource:
    """Foreground layers from a folder of images (recursive), e.g. RGBA PNG logos, glassware, cells, contraband.

    Args:
      root: the folder.
      alpha: "channel" uses the file's alpha plane; "luminance" derives it for layers stored as light on black
        (flare photos): a = max over channels, F = RGB / a, so a·F is the stored image.
    """

    def __init__(self, root: str, *, alpha: str = "channel"):
        if alpha not in ("channel", "luminance"):
            raise ValueError(f"alpha must be 'channel' or 'luminance', got {alpha!r}")
        self.files = find_images(root)
        self.alpha = alpha

    def __len__(self) -> int:
        return len(self.files)

    def asset(self, subtask: str, index: int, height: int, width: int, cover: bool) -> tuple[np.ndarray, np.ndarray]:
        """(colour [h, w, 3], alpha [h, w]): covering height×width (`cover`) or fitting inside it."""
        rgba = read_rgba(self.files[index % len(self.files)])
        if self.alpha == "luminance":
            a = rgba[..., :3].max(-1)
            pre = rgba[..., :3]
        else:
            a = rgba[..., 3]
            pre = rgba[..., :3] * a[..., None]
        # Resample premultiplied colour so nothing from outside the layer bleeds into its edge.
        out = (_cover if cover else _fit)(np.concatenate([pre, a[..., None]], -1), height, width)
        a = np.clip(out[..., 3], 0, 1)
        rgb = np.where(a[..., None] > 1e-6, out[..., :3] / np.maximum(a[..., None], 1e-6), 0)
        return np.clip(rgb, 0, 1).astype(F32), a.astype(F32)


class ImageFolderSource:
    """Backgrounds from a folder of RGB images (recursive), cover-resized and centre-cropped."""

    def __init__(self, root: str):
        self.files = find_images(root)

    def __len__(self) -> int:
        return len(self.files)

    def background(self, subtask: str, index: int, height: int, width: int) -> np.ndarray:
        return _cover(read_rgba(self.files[index % len(self.files)])[..., :3], height, width).clip(0, 1)


# ------------------------------------------------------------------------------------------- generator
# How a subtask's foreground is placed: over the whole frame, as a watermark in a box of the paper's size, or
# as an object scaled to a fraction of the frame at a random position.
PLACEMENT = {"flare": "full", "occlusion": "full", "watermark": "logo", "glassware": "object", "cell": "full",
             "xray": "object"}


@dataclasses.dataclass(frozen=True)
class AlphaBlendConfig:
    """Output size and sampling ranges (low, high). Paper values: watermark size and opacity (appendix A)."""

    height: int = 64
    width: int = 64
    subtasks: tuple[str, ...] = SUBTASKS
    reference_size: int = 512        # the paper's training size, at which watermark_size is in pixels
    watermark_size: tuple[float, float] = (96.0, 128.0)
    object_scale: tuple[float, float] = (0.45, 0.85)   # glassware / xray box side ÷ min(H, W)
    # Global opacity multiplying the layer's own alpha, per subtask.
    opacity: tuple[tuple[str, tuple[float, float]], ...] = (
        ("flare", (0.6, 1.0)), ("occlusion", (0.6, 1.0)), ("watermark", (0.1, 0.25)),
        ("glassware", (0.7, 1.0)), ("cell", (0.6, 1.0)), ("xray", (0.6, 0.95)))
    mask_threshold: float = 0.01     # `mask` = alpha > this (for masked RMSE)

    def __post_init__(self):
        for s in self.subtasks:
            check_subtask(s)
        if not self.subtasks:
            raise ValueError("subtasks is empty")
        if self.height % 16 or self.width % 16:
            raise ValueError(f"height and width must be multiples of 16 (VAE 8 × patch 2), got "
                             f"{self.height}x{self.width}")


class AlphaBlendDataset:
    """Random-access AlphaBlend-style composites (a grain data source: `__len__`, `__getitem__`).

    Sample i has subtask `subtasks[i % len(subtasks)]` (balanced, and a batch of consecutive indices mixes
    them) and draws everything else from default_rng([seed, i]), so the same (seed, i) is always the same.

    Args:
      cfg: size and ranges.
      foregrounds: a source with `asset(subtask, index, h, w, cover) -> (rgb, alpha)` and `__len__`, or a dict
        subtask -> source (default: `data.procedural_layers.ProceduralLayers`).
      backgrounds: a source with `background(subtask, index, H, W) -> rgb` and `__len__`, or such a dict
        (default: procedural, per subtask: photos-like textures, dark microscopy, X-ray bags).
      seed, length: as in `data.synthetic.SyntheticOmnimatte`.

    Each sample (float32 in [0, 1] unless noted):
      composite [H, W, 3]   = blend(subtask, fg_rgb, alpha, background), exactly
      background [H, W, 3]; foreground [H, W, 3] (the layer image, `foreground_layer`)
      fg_rgb [H, W, 3] (straight colour, 0 where alpha = 0); alpha [H, W]; mask [H, W] (alpha > threshold)
      subtask int32 [] (index into SUBTASKS); params dict of floats (opacity, box, indices).
    """

    def __init__(self, cfg: AlphaBlendConfig | None = None, *, foregrounds=None, backgrounds=None, seed: int = 0,
                 length: int = 10_000):
        from data.procedural_layers import ProceduralLayers

        self.cfg = cfg if cfg is not None else AlphaBlendConfig()
        self.seed, self.length = int(seed), int(length)
        fg = foregrounds if foregrounds is not None else ProceduralLayers(seed)
        bg = backgrounds if backgrounds is not None else ProceduralLayers(seed + 1)
        self.fg = {s: (fg[s] if isinstance(fg, dict) else fg) for s in self.cfg.subtasks}
        self.bg = {s: (bg[s] if isinstance(bg, dict) else bg) for s in self.cfg.subtasks}
        self.opacity = dict(self.cfg.opacity)
        missing = [s for s in self.cfg.subtasks if s not in self.opacity]
        if missing:
            raise ValueError(f"AlphaBlendConfig.opacity has no range for {missing}")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        if not 0 <= index < self.length:
            raise IndexError(f"sample {index} outside [0, {self.length})")
        c = self.cfg
        subtask = c.subtasks[index % len(c.subtasks)]
        rng = np.random.default_rng([self.seed, index])
        fi, bi = int(rng.integers(len(self.fg[subtask]))), int(rng.integers(len(self.bg[subtask])))
        H, W = c.height, c.width
        m = min(H, W)
        place = PLACEMENT[subtask]
        if place == "full":
            bh, bw = H, W
        elif place == "logo":
            bh = bw = min(m, max(8, round(rng.uniform(*c.watermark_size) * m / c.reference_size)))
        else:
            bh = bw = min(m, max(8, round(rng.uniform(*c.object_scale) * m)))
        rgb, a = self.fg[subtask].asset(subtask, fi, bh, bw, place == "full")
        h, w = a.shape
        top, left = int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1))
        opacity = float(rng.uniform(*self.opacity[subtask]))
        fg_rgb = np.zeros((H, W, 3), F32)
        alpha = np.zeros((H, W), F32)
        fg_rgb[top:top + h, left:left + w] = rgb
        alpha[top:top + h, left:left + w] = a * F32(opacity)
        fg_rgb *= (alpha > 0)[..., None]  # colour is undefined where nothing is: keep it 0 there
        bg = np.asarray(self.bg[subtask].background(subtask, bi, H, W), F32)
        return dict(
            composite=blend(subtask, fg_rgb, alpha, bg).astype(F32),
            background=bg, foreground=foreground_layer(subtask, fg_rgb, alpha).astype(F32),
            fg_rgb=fg_rgb, alpha=alpha, mask=(alpha > c.mask_threshold).astype(F32),
            subtask=np.int32(SUBTASKS.index(subtask)),
            params=dict(opacity=opacity, top=float(top), left=float(left), box_h=float(h), box_w=float(w),
                        fg_index=float(fi), bg_index=float(bi), index=float(index)))


def dataset_from_config(inp, *, seed: int = 0, length: int = 10_000):
    """The data source of a config's `input` block (configs/diffdecompose.py).

    inp.source: "procedural" (AlphaBlendDataset; `fg_dir` / `bg_dir` = "" keep the procedural layers, a folder
    replaces them for every subtask, `fg_alpha` as in RGBAFolderSource; `opacity` (low, high), if given, replaces
    every subtask's opacity range; `watermark_size` (low, high), if given, the watermark box's side in pixels at
    512 px) or "logo" (data.logo.LogoDataset of
    `logo_root` / `logo_split` at height×width, which must be square).
    """
    if inp.source == "logo":
        from data.logo import LogoDataset

        if int(inp.height) != int(inp.width):
            raise ValueError(f"input.source='logo' is square; got height {inp.height} != width {inp.width}")
        if not inp.get("logo_root"):
            raise ValueError("input.source='logo' needs input.logo_root (a LOGO variant folder, e.g. .../10khigh)")
        return LogoDataset(inp.logo_root, split=inp.get("logo_split", "train"), size=int(inp.height))
    if inp.source != "procedural":
        raise ValueError(f"input.source must be 'procedural' or 'logo', got {inp.source!r}")
    cfg = AlphaBlendConfig(height=int(inp.height), width=int(inp.width), subtasks=tuple(inp.subtasks))
    if inp.get("opacity"):  # (low, high) for every subtask instead of the per-subtask defaults
        lo, hi = (float(v) for v in inp.opacity)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"input.opacity must be (low, high) with 0 < low <= high <= 1, got {tuple(inp.opacity)}")
        cfg = dataclasses.replace(cfg, opacity=tuple((s, (lo, hi)) for s in SUBTASKS))
    if inp.get("watermark_size"):  # (low, high) box side in pixels at reference_size, instead of the paper's
        lo, hi = (float(v) for v in inp.watermark_size)
        if not 0.0 < lo <= hi <= cfg.reference_size:
            raise ValueError(f"input.watermark_size must be (low, high) with 0 < low <= high <= "
                             f"{cfg.reference_size}, got {tuple(inp.watermark_size)}")
        cfg = dataclasses.replace(cfg, watermark_size=(lo, hi))
    fg = RGBAFolderSource(inp.fg_dir, alpha=inp.get("fg_alpha", "channel")) if inp.get("fg_dir") else None
    bg = ImageFolderSource(inp.bg_dir) if inp.get("bg_dir") else None
    return AlphaBlendDataset(cfg, foregrounds=fg, backgrounds=bg, seed=seed, length=length)


def prompts_from_config(prompt, subtasks=SUBTASKS) -> dict[str, str]:
    """subtask -> prompt text of a config's `prompt` block (template, descriptions): what a prompt-embedding
    cache holds, so training looks embeddings up by a sample's `subtask` id and never runs T5 in the loop."""
    desc = {k: tuple(v) for k, v in dict(prompt.get("descriptions", {})).items()}
    return {s: build_prompt(s, prompt.get("template", PROMPT_TEMPLATE), desc) for s in subtasks}
