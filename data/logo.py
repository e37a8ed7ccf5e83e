"""Reader for the LOGO watermark-removal datasets (SplitNet; LOGO-H `10khigh`, LOGO-L `10kmid`, LOGO-Gray
`10kgray`), spec/flux.md §5, as samples shaped like `data.alphablend` watermark samples.

Folder layout of one variant (`root` below):
    root/train_images/{image,mask,wm}/<bgid>-<logo>.png     composite, binary mask, watermark layer (RGBA)
    root/val_images/{image,mask,wm}/<bgid>-<logo>.png       the test split
    root/natural/<bgid>.jpg                                 clean background (ground truth)
The background of `<bgid>-<logo>` is `natural/<bgid>.*` (the part before the first '-', as SplitNet's loader
does). `wm` is optional (only needed for the foreground layer); `mask` is required (masked RMSE).

Resizing (`size`): the LOGO protocol scores at 256×256; images are resized with Pillow's bilinear filter (what
torchvision's Resize on PIL images, used by the SplitNet/SLBR loaders, does), the mask too, then thresholded
at 0.5. size=None keeps the native size.

Axis letters: H height, W width. Samples: composite, background, foreground [H, W, 3]; fg_rgb [H, W, 3]; alpha,
mask [H, W] float32 in [0, 1]; subtask int32 (the watermark index of data.alphablend.SUBTASKS); has_wm bool.
Without a `wm/` file alpha, foreground and fg_rgb are zeros and has_wm is False. The foreground layer is the
premultiplied mark a·W (over black), as for the synthetic watermark subtask.
"""

from __future__ import annotations

import os

import numpy as np

from data.alphablend import SUBTASKS, read_rgba, resize_image
from omnijax.io.video import IMAGE_SUFFIXES

F32 = np.float32


class LogoError(ValueError):
    """A LOGO folder that does not have the expected layout."""


def _images(folder: str) -> dict[str, str]:
    return {os.path.splitext(n)[0]: os.path.join(folder, n) for n in sorted(os.listdir(folder))
            if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith(".")}


class LogoDataset:
    """One split of one LOGO variant as a random-access source (grain-compatible).

    Args:
      root: the variant folder (holding `natural/` and `<split>_images/`).
      split: "val" (the test split) or "train".
      size: square output side (256 in the protocol) or None for native size.

    Raises:
      LogoError: a missing folder, an image without its mask or background (the first few names are listed),
        or, when a sample is read, layers whose sizes differ.
    """

    def __init__(self, root: str, *, split: str = "val", size: int | None = 256):
        if split not in ("train", "val"):
            raise LogoError(f"split must be 'train' or 'val', got {split!r}")
        base = os.path.join(root, f"{split}_images")
        need = [os.path.join(base, "image"), os.path.join(base, "mask"), os.path.join(root, "natural")]
        missing = [d for d in need if not os.path.isdir(d)]
        if missing:
            raise LogoError(f"{root}: not a LOGO variant folder: missing {', '.join(missing)}")
        images = _images(need[0])
        masks = _images(need[1])
        wms = _images(os.path.join(base, "wm")) if os.path.isdir(os.path.join(base, "wm")) else {}
        natural = _images(need[2])
        if not images:
            raise LogoError(f"{need[0]}: no images")
        no_mask = [n for n in images if n not in masks]
        no_bg = [n for n in images if n.split("-", 1)[0] not in natural]
        for what, bad in (("mask in " + need[1], no_mask), ("background in " + need[2], no_bg)):
            if bad:
                raise LogoError(f"{len(bad)} of {len(images)} images have no {what}: {', '.join(bad[:3])}"
                                + (" ..." if len(bad) > 3 else ""))
        self.root, self.split, self.size = root, split, size
        self.names = sorted(images)
        self.files = [(images[n], masks[n], natural[n.split("-", 1)[0]], wms.get(n)) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    def _fit(self, img: np.ndarray) -> np.ndarray:
        return img if self.size is None else resize_image(img, self.size, self.size)

    def __getitem__(self, index: int) -> dict:
        image, mask, natural, wm = self.files[int(index)]
        comp, m, bg = read_rgba(image)[..., :3], read_rgba(mask)[..., :1], read_rgba(natural)[..., :3]
        layers = [comp, m, bg] + ([read_rgba(wm)] if wm else [])
        if len({x.shape[:2] for x in layers}) != 1:
            raise LogoError(f"{self.names[index]}: sizes differ: image {comp.shape[1]}x{comp.shape[0]}, mask "
                            f"{m.shape[1]}x{m.shape[0]}, natural {bg.shape[1]}x{bg.shape[0]}"
                            + (f", wm {layers[3].shape[1]}x{layers[3].shape[0]}" if wm else ""))
        h, w = comp.shape[:2]
        if wm:
            rgba = layers[3]
            pre = self._fit(np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1))
            alpha = np.clip(pre[..., 3], 0, 1)
            fg_rgb = np.where(alpha[..., None] > 1e-6, pre[..., :3] / np.maximum(alpha[..., None], 1e-6), 0)
        else:
            out = self.size or h, self.size or w
            alpha, fg_rgb = np.zeros(out, F32), np.zeros((*out, 3), F32)
        fg_rgb = np.clip(fg_rgb, 0, 1).astype(F32)
        return dict(
            composite=np.clip(self._fit(comp), 0, 1), background=np.clip(self._fit(bg), 0, 1),
            foreground=(alpha[..., None] * fg_rgb).astype(F32), fg_rgb=fg_rgb, alpha=alpha.astype(F32),
            mask=(self._fit(m)[..., 0] >= 0.5).astype(F32), subtask=np.int32(SUBTASKS.index("watermark")),
            has_wm=np.bool_(wm is not None))
