"""Score predicted layers against ground truth: RMSE (×256), masked RMSE, PSNR, SSIM; LPIPS/FID when possible.

    python launch/evaluate_layers.py --pred DIR --gt DIR --out report.json [--mask DIR] [--size 256]
    python launch/evaluate_layers.py --pred DIR --logo ROOT/10khigh [--split val] --out report.json

Predictions and ground truth are paired by file name without extension (`a.png` scores against `a.jpg`);
a name on one side only is an error. `--mask DIR` (same names; white = inside) adds the masked RMSE (RMSEw).
With `--logo` the ground truth is a LOGO variant folder (spec/flux.md §5): prediction `<bgid>-<logo>.png`
scores against `natural/<bgid>.jpg` inside `<split>_images/mask/<bgid>-<logo>.png`, at `--size` (default 256,
the protocol's). `--size N` resizes both sides (and the mask) to N×N with Pillow's bilinear filter; without it
sizes must match. Conventions of every metric: omnijax/metrics/image.py (SSIM padding "zero" = pytorch_ssim, as
in the LOGO numbers; "valid" = skimage).

LPIPS (AlexNet, `lpips` package) and FID (`pytorch_fid` Inception) run only when the package is installed and
its network weights are already in the torch hub cache; nothing is downloaded. Otherwise each is skipped with
a printed reason that is also recorded under "skipped" in the report. LPIPS inputs are mapped x ↦ 2x − 1
(lpips' convention; DENet's LOGO script min-max normalises each image instead, so LPIPS is not comparable
across the two).

The report (written atomically): {"n", "mean": {metric: value}, "per_image": [{"name", metric: value}],
"settings": {...}, "skipped": {metric: reason}}; a table of the means is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.alphablend import read_rgba, resize_image  # noqa: E402
from omnijax.io.atomic import atomic_write  # noqa: E402
from omnijax.io.video import IMAGE_SUFFIXES, VideoError  # noqa: E402
from omnijax.metrics.image import image_metrics, mean_metrics  # noqa: E402

ALEXNET = "alexnet-owt-7be5be79.pth"                 # torchvision's AlexNet, which lpips builds on
FID_INCEPTION = "pt_inception-2015-12-05-6726825d.pth"  # pytorch_fid's Inception weights


class EvalError(ValueError):
    pass


def _stems(folder: str) -> dict[str, str]:
    if not os.path.isdir(folder):
        raise EvalError(f"{folder}: no such folder")
    out = {}
    for n in sorted(os.listdir(folder)):
        if n.lower().endswith(IMAGE_SUFFIXES) and not n.startswith("."):
            stem = os.path.splitext(n)[0]
            if stem in out:
                raise EvalError(f"{folder}: two images named {stem!r} ({os.path.basename(out[stem])}, {n})")
            out[stem] = os.path.join(folder, n)
    if not out:
        raise EvalError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def _unmatched(a: dict, b: dict, what: str, where: str) -> None:
    bad = sorted(set(a) - set(b))
    if bad:
        raise EvalError(f"{len(bad)} {what} have no match in {where}: {', '.join(bad[:3])}"
                        + (" ..." if len(bad) > 3 else ""))


def pairs_from_folders(pred: str, gt: str, mask: str | None) -> list[tuple[str, str, str, str | None]]:
    """(name, pred path, gt path, mask path or None) for every name, after checking both sides match."""
    p, g = _stems(pred), _stems(gt)
    m = _stems(mask) if mask else None
    _unmatched(p, g, "predictions", gt)
    _unmatched(g, p, "ground-truth images", pred)
    if m is not None:
        _unmatched(g, m, "ground-truth images", mask)
    return [(n, p[n], g[n], m[n] if m else None) for n in sorted(g)]


def pairs_from_logo(pred: str, root: str, split: str) -> list[tuple[str, str, str, str | None]]:
    from data.logo import LogoDataset

    ds = LogoDataset(root, split=split, size=None)
    p = _stems(pred)
    gt = {n: (f[2], f[1]) for n, f in zip(ds.names, ds.files)}
    _unmatched(p, gt, "predictions", f"{root} ({split})")
    _unmatched(gt, p, "LOGO test images", pred)
    return [(n, p[n], gt[n][0], gt[n][1]) for n in sorted(gt)]


def _load(path: str, size: int | None, channels: int = 3) -> np.ndarray:
    img = read_rgba(path)[..., :channels]
    return img if size is None else np.clip(resize_image(img, size, size), 0, 1)


def _hub_file(name: str) -> str | None:
    try:
        import torch
    except ImportError:
        return None
    path = os.path.join(torch.hub.get_dir(), "checkpoints", name)
    return path if os.path.isfile(path) else None


def _lpips_model():
    """(model, None) or (None, why it is skipped)."""
    try:
        import lpips
    except ImportError:
        return None, "the `lpips` package is not installed"
    if _hub_file(ALEXNET) is None:
        return None, f"AlexNet weights {ALEXNET} are not in the torch hub cache (nothing is downloaded)"
    return lpips.LPIPS(net="alex", verbose=False).eval(), None


def _lpips(model, pred: np.ndarray, gt: np.ndarray) -> float:
    import torch

    t = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32)) * 2 - 1
    with torch.no_grad():
        return float(model(t(pred), t(gt)).item())


def _fid(preds: list[np.ndarray], gts: list[np.ndarray]) -> tuple[float | None, str | None]:
    """FID between the two sets with pytorch_fid's Inception (2048-d pool features), or (None, reason)."""
    import importlib.util

    # Ask for pytorch_fid before importing anything: when it is missing, the torch import is not paid for.
    if importlib.util.find_spec("pytorch_fid") is None:
        return None, "the `pytorch_fid` package is not installed"
    try:
        import torch
        from pytorch_fid.fid_score import calculate_frechet_distance
        from pytorch_fid.inception import InceptionV3
    except ImportError:
        return None, "the `pytorch_fid` package is not installed"
    if _hub_file(FID_INCEPTION) is None:
        return None, f"Inception weights {FID_INCEPTION} are not in the torch hub cache (nothing is downloaded)"
    if len(preds) < 2:
        return None, "FID needs at least 2 images per set"
    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    def feats(images):
        with torch.no_grad():
            return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None],
                                                                               np.float32)))[0][:, :, 0, 0].numpy()
                                   for x in images])

    a, b = feats(preds), feats(gts)
    return float(calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0),
                                            np.cov(b, rowvar=False))), None


def evaluate(pairs, *, size: int | None, ssim_padding: str = "zero", perceptual: bool = True) -> dict:
    """The report dict of module docstring over (name, pred, gt, mask) path tuples."""
    skipped: dict[str, str] = {}
    lp = None
    if perceptual:
        lp, why = _lpips_model()
        if why:
            skipped["lpips"] = why
    else:
        skipped["lpips"] = skipped["fid"] = "turned off (--no-perceptual)"
    rows, keep_p, keep_g = [], [], []
    for name, pp, gp, mp in pairs:
        p, g = _load(pp, size), _load(gp, size)
        if p.shape != g.shape:
            raise EvalError(f"{name}: prediction {p.shape[1]}x{p.shape[0]} and ground truth {g.shape[1]}x"
                            f"{g.shape[0]} differ; pass --size N to score both at N×N")
        m = None
        if mp is not None:
            m = _load(mp, size, 1)[..., 0] >= 0.5
            if m.shape != g.shape[:2]:
                raise EvalError(f"{name}: mask {m.shape[1]}x{m.shape[0]} and ground truth {g.shape[1]}x"
                                f"{g.shape[0]} differ; pass --size N")
        r = dict(name=name, **image_metrics(p, g, m, ssim_padding=ssim_padding))
        if lp is not None:
            r["lpips"] = _lpips(lp, p, g)
        rows.append(r)
        if perceptual and "fid" not in skipped:
            keep_p.append(p)
            keep_g.append(g)
    mean = mean_metrics([{k: v for k, v in r.items() if k != "name"} for r in rows])
    if perceptual:
        fid, why = _fid(keep_p, keep_g)
        if why:
            skipped["fid"] = why
        else:
            mean["fid"] = fid
    return dict(n=len(rows), mean=mean, per_image=rows, skipped=skipped,
                settings=dict(size=size, rmse_scale=256, ssim=dict(window=11, sigma=1.5, padding=ssim_padding),
                              psnr_cap_db=100.0, mask_threshold=0.5, resize="PIL bilinear" if size else None))


def _finite(x):
    """NaN (an empty mask's RMSEw) becomes null: the report stays standard JSON."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and x != x else x


def _write_json(path: str, data: dict) -> None:
    atomic_write(path, json.dumps(_finite(data), indent=1))


def table(report: dict) -> str:
    lines = [f"{'metric':<10}{'mean':>12}", "-" * 22]
    lines += [f"{k:<10}{v:>12.4f}" if v == v else f"{k:<10}{'n/a':>12}" for k, v in report["mean"].items()]
    lines += [f"{k:<10}{'skipped':>12}  ({why})" for k, why in report["skipped"].items()]
    return "\n".join([f"{report['n']} images"] + lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", required=True, help="folder of predicted images")
    p.add_argument("--gt", help="folder of ground-truth images")
    p.add_argument("--mask", help="folder of masks for the masked RMSE (same names as --gt)")
    p.add_argument("--logo", help="a LOGO variant folder as ground truth (instead of --gt/--mask)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="LOGO split (val = test)")
    p.add_argument("--size", type=int, default=None, help="score at N×N (default: native; 256 with --logo)")
    p.add_argument("--ssim-padding", default="zero", choices=("zero", "valid"))
    p.add_argument("--no-perceptual", action="store_true", help="do not try LPIPS / FID")
    p.add_argument("--out", required=True, help="JSON report to write")
    a = p.parse_args(argv)
    if bool(a.gt) == bool(a.logo):
        p.error("give exactly one of --gt DIR or --logo DIR")
    if a.logo and a.mask:
        p.error("--mask is not used with --logo (the LOGO folder has the masks)")
    if a.size is not None and a.size < 11:
        p.error(f"--size must be at least 11 (the SSIM window), got {a.size}")
    try:
        if a.logo:
            pairs = pairs_from_logo(a.pred, a.logo, a.split)
            size = a.size or 256
        else:
            pairs = pairs_from_folders(a.pred, a.gt, a.mask)
            size = a.size
        report = evaluate(pairs, size=size, ssim_padding=a.ssim_padding, perceptual=not a.no_perceptual)
    except (EvalError, VideoError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k, why in report["skipped"].items():
        print(f"{k.upper()} skipped: {why}")
    _write_json(a.out, report)
    print(table(report))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
