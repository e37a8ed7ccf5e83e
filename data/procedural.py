"""Built-in procedural clips: moving soft-edged textured shapes (foregrounds) over textured, moving backgrounds.

Needs no download; every clip is a pure function of (seed, index), so a dataset built on it is reproducible
anywhere. It is the default source for tests, smoke runs and the block analysis (spec §5).

Axis letters: F frames, H height, W width. Outputs are float32 in [0, 1]: foreground colour [F, H, W, 3] and
alpha [F, H, W] (straight, not premultiplied), background [F, H, W, 3].
"""

from __future__ import annotations

import numpy as np

_FG, _BG = 1, 2  # stream tags so the foreground and background of one index are independent


def _rng(seed: int, index: int, tag: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index), tag])


def _palette(rng: np.random.Generator, n: int) -> np.ndarray:
    """n saturated-ish colours [n, 3] (HSV with random hue), so objects stand out from the muted backgrounds."""
    h = rng.uniform(0, 1, n)
    s = rng.uniform(0.5, 1.0, n)
    v = rng.uniform(0.55, 1.0, n)
    k = (np.array([5.0, 3.0, 1.0])[None] + h[:, None] * 6.0) % 6.0
    return (v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0, 1)).astype(np.float32)


class ProceduralSource:
    """Deterministic synthetic foregrounds (with alpha) and backgrounds.

    Args:
      seed: global seed; clip `index` of a source with the same seed is always the same.
      max_shapes: foreground shapes per clip are drawn from 1..max_shapes.
      length: nominal number of distinct clips (the source is procedural, so any index works).
    """

    def __init__(self, seed: int = 0, *, max_shapes: int = 2, length: int = 1 << 20):
        self.seed = int(seed)
        self.max_shapes = int(max_shapes)
        self.length = int(length)

    def __len__(self) -> int:
        return self.length

    # ------------------------------------------------------------------------------------------ foreground
    def foreground(self, index: int, num_frames: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """A clip of 1..max_shapes moving, rotating, textured shapes with soft edges.

        Returns:
          (rgb float32 [F, H, W, 3], alpha float32 [F, H, W]).
        """
        rng = _rng(self.seed, index, _FG)
        n = int(rng.integers(1, self.max_shapes + 1))
        m = float(min(height, width))
        shapes = []
        for _ in range(n):
            shapes.append(dict(
                kind=int(rng.integers(0, 3)),             # 0 wobbly blob (polar), 1 superellipse, 2 star
                radius=rng.uniform(0.18, 0.32) * m,
                aspect=rng.uniform(0.6, 1.6),
                lobes=int(rng.integers(3, 7)), depth=rng.uniform(0.08, 0.3), power=rng.uniform(2.5, 6.0),
                c0=np.array([rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width]),
                vel=rng.uniform(-0.25, 0.25, 2) * m / max(num_frames - 1, 1),
                wob=rng.uniform(0.0, 0.05, 2) * m, wob_f=rng.uniform(0.5, 2.0), phase=rng.uniform(0, 2 * np.pi),
                ang0=rng.uniform(0, 2 * np.pi), spin=rng.uniform(-0.4, 0.4) * 2 * np.pi / max(num_frames, 1),
                soft=rng.uniform(0.8, 2.5) * m / 256.0 + 0.5,
                colors=_palette(rng, 2), tex=int(rng.integers(0, 3)), tex_f=rng.uniform(2.0, 6.0),
            ))
        rgb = np.zeros((num_frames, height, width, 3), np.float32)
        alpha = np.zeros((num_frames, height, width), np.float32)
        for f in range(num_frames):
            t = f / max(num_frames - 1, 1)
            for sh in shapes:  # later shapes are composited over earlier ones
                cy, cx = sh["c0"] + sh["vel"] * f + sh["wob"] * np.sin(2 * np.pi * sh["wob_f"] * t + sh["phase"])
                # Evaluate only inside the shape's bounding square: most of the frame is empty.
                ext = sh["radius"] * 1.35 * max(sh["aspect"], 1 / sh["aspect"]) ** 0.5 + 2 * sh["soft"] + 2
                y0, y1 = max(int(cy - ext), 0), min(int(cy + ext) + 1, height)
                x0, x1 = max(int(cx - ext), 0), min(int(cx + ext) + 1, width)
                if y0 >= y1 or x0 >= x1:
                    continue
                yy = np.arange(y0, y1, dtype=np.float32)[:, None] - np.float32(cy)
                xx = np.arange(x0, x1, dtype=np.float32)[None, :] - np.float32(cx)
                a, c = self._shape_frame(sh, f, yy, xx)
                p_rgb, p_a = rgb[f, y0:y1, x0:x1], alpha[f, y0:y1, x0:x1]
                p_rgb += a[..., None] * (c - p_rgb)  # premultiplied "over": a*c + (1-a)*below
                p_a += a * (1 - p_a)
        # rgb was accumulated premultiplied-over-black; straighten it where alpha > 0 (any colour is valid at 0).
        rgb = np.where(alpha[..., None] > 1e-6, rgb / np.maximum(alpha[..., None], 1e-6), 0.0)
        return np.clip(rgb, 0, 1).astype(np.float32), np.clip(alpha, 0, 1)

    @staticmethod
    def _shape_frame(sh, f, dy, dx):
        ang = sh["ang0"] + sh["spin"] * f
        ca, sa = np.float32(np.cos(ang)), np.float32(np.sin(ang))
        sq = np.float32(np.sqrt(sh["aspect"]))
        u = (ca * dx + sa * dy) / sq   # object-local axes, so texture moves with the shape
        v = (-sa * dx + ca * dy) * sq
        rho = np.sqrt(u * u + v * v) + 1e-6
        theta = np.arctan2(v, u)
        r = np.float32(sh["radius"])
        if sh["kind"] == 0:
            edge = r * (1 + sh["depth"] * np.sin(sh["lobes"] * theta + sh["phase"]))
            d = edge - rho
        elif sh["kind"] == 1:
            p = sh["power"]
            q = (np.abs(u / r) ** p + np.abs(v / r) ** p) ** (1.0 / p)
            d = (1.0 - q) * r
        else:
            edge = r * (0.6 + 0.4 * np.abs(np.cos(0.5 * sh["lobes"] * theta)) ** 0.7)
            d = edge - rho
        a = np.clip(d / sh["soft"] + 0.5, 0.0, 1.0)
        k = 2 * np.pi * sh["tex_f"] / r
        if sh["tex"] == 0:
            w = 0.5 + 0.5 * np.sin(k * u)                              # stripes
        elif sh["tex"] == 1:
            w = (np.sin(k * u) * np.sin(k * v) > 0).astype(np.float32)  # checker
        else:
            w = np.clip(rho / r, 0, 1)                                  # radial gradient
        c0, c1 = sh["colors"]
        col = c0 + w[..., None] * (c1 - c0)
        return a.astype(np.float32), col.astype(np.float32)

    # ------------------------------------------------------------------------------------------ background
    def background(self, index: int, num_frames: int, height: int, width: int) -> np.ndarray:
        """A panning texture: oriented gratings, soft colour blobs and fine grain over a colour gradient.

        Returns:
          rgb float32 [F, H, W, 3].
        """
        rng = _rng(self.seed, index, _BG)
        m = float(max(height, width))
        base = _palette(rng, 2) * np.float32(rng.uniform(0.4, 0.8))
        tone = np.float32(rng.uniform(0.15, 0.35))
        n_gr = 4
        kk = (rng.uniform(2.0, 12.0, n_gr) * 2 * np.pi / m).astype(np.float32)
        th = rng.uniform(0, np.pi, n_gr)
        ky, kx = kk * np.sin(th), kk * np.cos(th)
        ph = rng.uniform(0, 2 * np.pi, n_gr).astype(np.float32)
        mix = rng.uniform(-1, 1, (n_gr, 3)).astype(np.float32) * 0.12
        pan = rng.uniform(-0.3, 0.3, 2) * m / max(num_frames - 1, 1)  # whole-scene drift, pixels per frame
        n_blob = 5
        by = rng.uniform(0, height, n_blob).astype(np.float32)
        bx = rng.uniform(0, width, n_blob).astype(np.float32)
        bs = (rng.uniform(0.08, 0.25, n_blob) * m).astype(np.float32)
        bc = rng.uniform(-0.2, 0.2, (n_blob, 3)).astype(np.float32)
        gy, gx = rng.uniform(-0.5, 0.5, 2).astype(np.float32)
        # Fine grain is a fixed tile larger than the frame, cropped at an integer pan offset (cheap, coherent).
        span = np.abs(pan) * max(num_frames - 1, 1)
        ph_, pw_ = height + int(span[0]) + 2, width + int(span[1]) + 2
        grain = (rng.standard_normal((ph_, pw_, 1)) * 0.03).astype(np.float32)
        y = np.arange(height, dtype=np.float32)
        x = np.arange(width, dtype=np.float32)
        one_y, one_x = np.ones_like(y), np.ones_like(x)
        out = np.empty((num_frames, height, width, 3), np.float32)
        for f in range(num_frames):
            oy, ox = pan * f
            ys, xs = y + np.float32(oy), x + np.float32(ox)
            # Every term is separable in (y, x), so a frame is one rank-R product A[c] @ B per channel:
            # colour ramp, sin(a + b) = sin a cos b + cos a sin b per grating, and Gaussian blobs.
            rows, cols, cw = [], [], []
            rows += [one_y, one_y, gy * ys / height]
            cols += [one_x, gx * xs / width, one_x]
            cw += [base[0] + tone + 0.5 * (base[1] - base[0]), 0.5 * (base[1] - base[0]), 0.5 * (base[1] - base[0])]
            for i in range(n_gr):
                rows += [np.sin(ky[i] * ys + ph[i]), np.cos(ky[i] * ys + ph[i])]
                cols += [np.cos(kx[i] * xs), np.sin(kx[i] * xs)]
                cw += [mix[i], mix[i]]
            for i in range(n_blob):
                rows.append(np.exp(-0.5 * ((ys - by[i]) / bs[i]) ** 2))
                cols.append(np.exp(-0.5 * ((xs - bx[i]) / bs[i]) ** 2))
                cw.append(bc[i])
            a = np.stack(rows, 1)[None] * np.stack(cw, 0).T[:, None, :]          # [3, H, R]
            img = np.moveaxis(a @ np.stack(cols, 0), 0, -1)                      # [H, W, 3]
            iy, ix = int(round(abs(oy))), int(round(abs(ox)))
            np.add(img, grain[iy:iy + height, ix:ix + width], out=out[f])
        return np.clip(out, 0, 1)
