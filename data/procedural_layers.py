"""Built-in procedural foreground layers and backgrounds for the six AlphaBlend subtasks (no download).

Every asset is a pure function of (seed, subtask, index, size), like `data.procedural`. Foregrounds are
(colour [h, w, 3], straight alpha [h, w]) float32 in [0, 1]; light-like layers (flare, cells) are built
premultiplied (the light P they add) and split as a = max over channels of P, F = P / a.

- watermark: text set in Pillow's built-in font (random letters), with a ring, rounded square or bar logo.
- flare: a light source with glow, halo ring, star streaks and coloured ghosts along the line through the
  frame centre.
- occlusion: full-frame fog (smooth noise), rain streaks and droplets, or dirt specks; one or two of them.
- glassware: a glass of revolution (tumbler, wine glass, bottle) with a pale tint, highlight bands and rims
  that are more opaque than the middle (light crosses more glass there).
- cell: 6-20 elliptic cells, each a faint cytoplasm, a bright membrane and a nucleus, in a stain colour.
- xray: a knife, gun or bottle silhouette in X-ray pseudo-colour (blue-green metal, orange organic).
Backgrounds: the photo-like textures of `data.procedural.ProceduralSource` for flare / occlusion / watermark /
glassware, a dark microscopy field for cells, a bright X-ray scan of bag contents for X-ray.
"""

from __future__ import annotations

import string

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from data.alphablend import SUBTASKS, check_subtask
from data.procedural import ProceduralSource, _palette

F32 = np.float32
_SS = 2  # supersampling of PIL-drawn masks (then box-reduced): antialiased edges


def _split_light(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied light P [h, w, 3] -> (F, a) with a = max_c P, F = P / a."""
    p = np.clip(p, 0, 1)
    a = p.max(-1)
    f = np.where(a[..., None] > 1e-6, p / np.maximum(a[..., None], 1e-6), 0)
    return f.astype(F32), a.astype(F32)


def _grid(h: int, w: int):
    return np.mgrid[0:h, 0:w].astype(F32)


def _smooth_noise(rng, h: int, w: int, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random cells×cells grid, cubic-upsampled."""
    g = rng.uniform(0, 1, (cells + 3, cells + 3)).astype(F32)
    z = ndimage.zoom(g, ((h + 2 * h / cells) / g.shape[0], (w + 2 * w / cells) / g.shape[1]), order=3)
    y0, x0 = (z.shape[0] - h) // 2, (z.shape[1] - w) // 2
    z = z[y0:y0 + h, x0:x0 + w]
    return np.clip((z - z.min()) / max(float(np.ptp(z)), 1e-6), 0, 1).astype(F32)


def _mask(h: int, w: int, draw_fn) -> np.ndarray:
    """An antialiased [h, w] mask in [0, 1] drawn by draw_fn(ImageDraw, scale) on a supersampled canvas."""
    img = Image.new("L", (w * _SS, h * _SS), 0)
    draw_fn(ImageDraw.Draw(img), _SS)
    m = np.asarray(img, F32) / 255
    return m.reshape(h, _SS, w, _SS).mean((1, 3))


class ProceduralLayers:
    """Deterministic procedural foreground layers and backgrounds for every AlphaBlend subtask.

    `asset(subtask, index, h, w, cover)` fills the whole h×w box (`cover` is accepted for the source interface);
    `background(subtask, index, H, W)` -> [H, W, 3].
    """

    def __init__(self, seed: int = 0, *, length: int = 1 << 20):
        self.seed, self.length = int(seed), int(length)
        self._photo = ProceduralSource(self.seed)

    def __len__(self) -> int:
        return self.length

    def _rng(self, subtask: str, index: int, tag: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, SUBTASKS.index(subtask), int(index), tag])

    # ------------------------------------------------------------------------------------------ foregrounds
    def asset(self, subtask: str, index: int, height: int, width: int, cover: bool = True):
        rng = self._rng(check_subtask(subtask), index, 1)
        return getattr(self, "_" + subtask)(rng, height, width)

    @staticmethod
    def _watermark(rng, h, w):
        m = min(h, w)
        n = int(rng.integers(3, 9))
        text = "".join(rng.choice(list(string.ascii_uppercase + string.digits), n))
        logo = int(rng.integers(0, 4))  # 0 none, 1 ring, 2 rounded square, 3 underline bar

        def draw(d, s):
            # Text as wide as the box (92 %), at most 60 % of its height (30 % under a ring / square logo).
            x0, y0, x1, y1 = d.textbbox((0, 0), text, font=ImageFont.load_default(size=100))
            k = min(0.92 * w * s / max(x1 - x0, 1), (0.6 if logo in (0, 3) else 0.3) * h * s / max(y1 - y0, 1))
            font = ImageFont.load_default(size=max(4, int(100 * k)))
            x0, y0, x1, y1 = d.textbbox((0, 0), text, font=font)
            tw, th = x1 - x0, y1 - y0
            ty = (h * s - th) // 2 if logo in (0, 3) else int(h * s * 0.62)
            d.text(((w * s - tw) // 2 - x0, ty - y0), text, fill=255, font=font)
            lw = max(1, int(m * s * 0.05))
            if logo == 1:
                r = m * s * 0.22
                cx, cy = w * s / 2, h * s * 0.32
                d.ellipse((cx - r, cy - r, cx + r, cy + r), outline=255, width=lw)
            elif logo == 2:
                r = m * s * 0.2
                cx, cy = w * s / 2, h * s * 0.32
                d.rounded_rectangle((cx - r, cy - r, cx + r, cy + r), radius=r / 3, fill=255)
            elif logo == 3:
                yb = (h * s + th) // 2 + lw
                d.rectangle(((w * s - tw) // 2, yb, (w * s + tw) // 2, yb + lw), fill=255)

        a = _mask(h, w, draw)
        kind = rng.uniform()
        col = (np.full(3, rng.uniform(0.85, 1.0)) if kind < 0.5 else np.full(3, rng.uniform(0.0, 0.3))
               if kind < 0.7 else _palette(rng, 1)[0])
        return np.broadcast_to(col.astype(F32), (h, w, 3)).copy(), a

    @staticmethod
    def _flare(rng, h, w):
        y, x = _grid(h, w)
        m = float(min(h, w))
        sy, sx = rng.uniform(0.05, 0.6) * h, rng.uniform(0.1, 0.9) * w
        r = np.hypot(y - sy, x - sx)
        warm = np.array([1.0, rng.uniform(0.75, 0.95), rng.uniform(0.45, 0.8)], F32)
        p = warm * (np.exp(-0.5 * (r / (rng.uniform(0.03, 0.08) * m)) ** 2)
                    + 0.35 * np.exp(-r / (rng.uniform(0.15, 0.3) * m)))[..., None]
        ring_r, ring_w = rng.uniform(0.2, 0.35) * m, rng.uniform(0.01, 0.03) * m
        p += _palette(rng, 1)[0] * 0.25 * np.exp(-0.5 * ((r - ring_r) / ring_w) ** 2)[..., None]
        ang = np.arctan2(y - sy, x - sx)
        for _ in range(int(rng.integers(4, 9))):  # star streaks
            th = rng.uniform(0, np.pi)
            width = rng.uniform(0.01, 0.04)
            d = np.abs(np.sin(ang - th))
            p += warm * (0.5 * np.exp(-0.5 * (d / width) ** 2) * np.exp(-r / (rng.uniform(0.2, 0.5) * m)))[..., None]
        cy, cx = h / 2, w / 2
        for _ in range(int(rng.integers(3, 7))):  # ghosts along source -> centre -> beyond
            t = rng.uniform(0.4, 2.0)
            gy, gx = sy + t * (cy - sy), sx + t * (cx - sx)
            gr = rng.uniform(0.02, 0.1) * m
            d = np.hypot(y - gy, x - gx)
            p += _palette(rng, 1)[0] * (rng.uniform(0.08, 0.25) * np.clip((gr - d) / (0.3 * gr) + 0.5, 0, 1))[..., None]
        return _split_light(p)

    @staticmethod
    def _occlusion(rng, h, w):
        pre, a = np.zeros((h, w, 3), F32), np.zeros((h, w), F32)

        def over(col, alpha):  # premultiplied over of a new layer onto the accumulated one
            nonlocal pre, a
            pre = alpha[..., None] * col + (1 - alpha[..., None]) * pre
            a = alpha + (1 - alpha) * a

        kinds = rng.permutation(3)[: int(rng.integers(1, 3))]
        m = min(h, w)
        for kind in sorted(kinds):
            if kind == 0:  # fog: whitish, density varying smoothly over the frame
                dens = rng.uniform(0.25, 0.7) * (0.4 + 0.6 * _smooth_noise(rng, h, w, int(rng.integers(2, 5))))
                over(np.array([rng.uniform(0.8, 0.95)] * 2 + [rng.uniform(0.85, 1.0)], F32), dens.astype(F32))
            elif kind == 1:  # rain: slanted streaks and round droplets
                slant = rng.uniform(-0.3, 0.3)
                n = int(rng.integers(40, 120) * (h * w) / 256 ** 2) + 10
                ys, xs = rng.uniform(0, h, n), rng.uniform(0, w, n)
                ls = rng.uniform(0.03, 0.12, n) * m

                def streaks(d, s, ys=ys, xs=xs, ls=ls, slant=slant):
                    for y0, x0, ln in zip(ys, xs, ls):
                        d.line((x0 * s, y0 * s, (x0 + slant * ln) * s, (y0 + ln) * s), fill=200,
                               width=max(1, int(s * m / 200)))
                    for y0, x0, ln in zip(ys[::4], xs[::4], ls[::4]):
                        rr = ln * 0.15 * s
                        d.ellipse((x0 * s - rr, y0 * s - rr, x0 * s + rr, y0 * s + rr), fill=150)

                over(np.full(3, rng.uniform(0.85, 1.0), F32), _mask(h, w, streaks) * F32(rng.uniform(0.5, 0.9)))
            else:  # dirt: dark specks and smudges
                dens = np.clip(_smooth_noise(rng, h, w, int(rng.integers(6, 14))) * 1.6 - 0.8, 0, 1)
                col = np.array([0.25, 0.2, 0.15], F32) * F32(rng.uniform(0.5, 1.5))
                over(col, (dens * rng.uniform(0.4, 0.8)).astype(F32))
        f = np.where(a[..., None] > 1e-6, pre / np.maximum(a[..., None], 1e-6), 0)
        return np.clip(f, 0, 1).astype(F32), np.clip(a, 0, 1).astype(F32)

    @staticmethod
    def _glassware(rng, h, w):
        y, x = _grid(h, w)
        kind = int(rng.integers(0, 3))  # 0 tumbler, 1 wine glass, 2 bottle
        v = (y + 0.5) / h  # 0 top .. 1 bottom
        rw = 0.48 * w
        if kind == 0:
            prof = rw * (0.78 + 0.17 * v)
        elif kind == 1:
            bowl = rw * np.sqrt(np.clip(1 - ((v - 0.3) / 0.3) ** 2, 0, 1))
            stem = np.where((v > 0.6) & (v < 0.92), 0.06 * rw, 0)
            foot = np.where(v >= 0.92, 0.7 * rw, 0)
            prof = np.where(v <= 0.6, bowl, stem + foot)
        else:
            neck = 0.28 * rw
            shoulder = np.clip((v - 0.15) / 0.2, 0, 1)
            prof = neck + (0.9 * rw - neck) * (3 * shoulder ** 2 - 2 * shoulder ** 3)
        prof = prof * np.where((v > 0.02) & (v < 0.985), 1, 0)
        dx = np.abs(x + 0.5 - w / 2)
        inside = np.clip(prof - dx + 0.5, 0, 1)
        u = np.clip(dx / np.maximum(prof, 1e-3), 0, 1)  # 0 axis .. 1 rim
        tint = np.array([rng.uniform(0.8, 0.95), rng.uniform(0.88, 1.0), rng.uniform(0.88, 1.0)], F32)
        col = tint * (1 - 0.45 * u ** 6)[..., None]
        hx = rng.uniform(-0.6, -0.3)
        hl = np.exp(-0.5 * (((x + 0.5 - w / 2) / np.maximum(prof, 1e-3) - hx) / 0.07) ** 2)
        col = col + (1 - col) * (0.9 * hl)[..., None]
        a = inside * (rng.uniform(0.25, 0.45) + 0.55 * u ** 4 + 0.4 * hl)
        return np.clip(col, 0, 1).astype(F32), np.clip(a, 0, 1).astype(F32)

    @staticmethod
    def _cell(rng, h, w):
        y, x = _grid(h, w)
        m = float(min(h, w))
        stains = np.array([[0.2, 1.0, 0.3], [1.0, 0.3, 0.9], [0.3, 0.5, 1.0], [1.0, 0.35, 0.25]], F32)
        p = np.zeros((h, w, 3), F32)
        for _ in range(int(rng.integers(6, 21))):
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            ra = rng.uniform(0.06, 0.14) * m
            rb = ra * rng.uniform(0.6, 1.0)
            th = rng.uniform(0, np.pi)
            # Evaluate inside the cell's bounding square only (the membrane is < 1e-7 beyond 1.4 radii).
            e = 1.4 * ra + 2
            y0, y1 = max(int(cy - e), 0), min(int(cy + e) + 1, h)
            x0, x1 = max(int(cx - e), 0), min(int(cx + e) + 1, w)
            yy, xx = y[y0:y1, x0:x1], x[y0:y1, x0:x1]
            u = ((xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)) / ra
            v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) / rb
            rho = np.sqrt(u * u + v * v)
            body = np.clip((1 - rho) * ra / 1.5 + 0.5, 0, 1)
            membrane = np.exp(-0.5 * ((rho - 0.95) / 0.06) ** 2)
            nr = rng.uniform(0.3, 0.5)
            nuc = np.clip((nr - np.hypot(u - rng.uniform(-0.2, 0.2), v)) * ra / 1.5 + 0.5, 0, 1)
            lum = 0.18 * body + 0.5 * membrane + 0.45 * nuc
            col = stains[int(rng.integers(len(stains)))] * F32(rng.uniform(0.5, 0.9))
            p[y0:y1, x0:x1] += (col * lum[..., None]).astype(F32)
        return _split_light(p)

    @staticmethod
    def _xray(rng, h, w):
        kind = int(rng.integers(0, 3))  # 0 knife, 1 gun, 2 bottle
        ang = rng.uniform(0, 360)

        def shape(d, s):
            W, H = w * s, h * s
            if kind == 0:
                d.polygon([(0.08 * W, 0.47 * H), (0.62 * W, 0.42 * H), (0.62 * W, 0.56 * H), (0.15 * W, 0.53 * H)],
                          fill=255)
                d.rounded_rectangle((0.62 * W, 0.43 * H, 0.93 * W, 0.57 * H), radius=0.04 * H, fill=170)
            elif kind == 1:
                d.rectangle((0.1 * W, 0.3 * H, 0.85 * W, 0.45 * H), fill=255)
                d.polygon([(0.55 * W, 0.45 * H), (0.75 * W, 0.45 * H), (0.82 * W, 0.82 * H), (0.62 * W, 0.82 * H)],
                          fill=255)
                d.ellipse((0.42 * W, 0.4 * H, 0.58 * W, 0.6 * H), outline=255, width=max(1, int(0.03 * W)))
            else:
                d.rounded_rectangle((0.32 * W, 0.3 * H, 0.68 * W, 0.9 * H), radius=0.08 * W, fill=200)
                d.rectangle((0.43 * W, 0.1 * H, 0.57 * W, 0.32 * H), fill=255)

        img = Image.new("L", (w * _SS, h * _SS), 0)
        shape(ImageDraw.Draw(img), _SS)
        img = img.rotate(ang, resample=Image.BILINEAR)
        dens = np.asarray(img, F32).reshape(h, _SS, w, _SS).mean((1, 3)) / 255
        a = (dens > 0).astype(F32) * np.clip(dens * 1.5, 0, 1)
        metal = np.array([rng.uniform(0.05, 0.2), rng.uniform(0.3, 0.5), rng.uniform(0.5, 0.8)], F32)
        organic = np.array([rng.uniform(0.8, 1.0), rng.uniform(0.5, 0.65), rng.uniform(0.1, 0.3)], F32)
        base = metal if kind < 2 else organic
        col = base * (1.15 - 0.3 * dens)[..., None]  # denser parts transmit less
        return np.clip(col, 0, 1).astype(F32), a

    # ------------------------------------------------------------------------------------------ backgrounds
    def background(self, subtask: str, index: int, height: int, width: int) -> np.ndarray:
        check_subtask(subtask)
        if subtask == "cell":
            photo = self._photo.background(index, 1, height, width)[0]
            grey = photo.mean(-1, keepdims=True)
            return np.clip(0.02 + 0.12 * (0.7 * grey + 0.3 * photo), 0, 1).astype(F32)
        if subtask == "xray":
            return self._bag(self._rng(subtask, index, 2), height, width)
        return self._photo.background(index, 1, height, width)[0]

    @staticmethod
    def _bag(rng, h, w):
        """A scan of bag contents: a bright field times the transmission of overlapping soft items."""
        t = np.full((h, w, 3), F32(rng.uniform(0.9, 0.98)))
        palette = np.array([[1.0, 0.62, 0.25], [0.35, 0.75, 0.45], [0.25, 0.5, 0.85]], F32)
        for _ in range(int(rng.integers(5, 12))):
            y0, x0 = rng.uniform(-0.1, 0.9) * h, rng.uniform(-0.1, 0.9) * w
            y1, x1 = y0 + rng.uniform(0.1, 0.5) * h, x0 + rng.uniform(0.1, 0.5) * w
            ell = bool(rng.integers(0, 2))

            def item(d, s, y0=y0, x0=x0, y1=y1, x1=x1, ell=ell):
                (d.ellipse if ell else d.rectangle)((x0 * s, y0 * s, x1 * s, y1 * s), fill=255)

            a = ndimage.gaussian_filter(_mask(h, w, item), 0.01 * min(h, w)) * F32(rng.uniform(0.2, 0.6))
            col = palette[int(rng.integers(len(palette)))]
            t *= 1 - a[..., None] * (1 - col)
        frame = _mask(h, w, lambda d, s: d.rectangle((0.03 * w * s, 0.03 * h * s, 0.97 * w * s, 0.97 * h * s),
                                                     outline=255, width=max(1, int(0.015 * min(h, w) * s))))
        t *= 1 - 0.5 * frame[..., None]
        return np.clip(t, 0, 1).astype(F32)
