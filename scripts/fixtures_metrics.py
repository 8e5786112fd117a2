#!/usr/bin/env python3
"""Parity fixtures for crates/gen-world/src/metrics.rs (pinned: numpy 2.4.6, scipy 1.16.3,
mpmath 1.3.0, safetensors 0.8.0; `pip install scipy==1.16.3` next to the fixture venv).

Fréchet distance: computed the standard way, as pytorch-fid's `calculate_frechet_distance`
does it (np.mean, np.cov(rowvar=False), scipy.linalg.sqrtm(sigma1 @ sigma2, disp=False), the
eps*I offset when the product's square root is not finite, real part), re-implemented here
in a few lines (pytorch-fid itself is not installed). A second, independent reference value
comes from mpmath at 50 digits: the eigenvalues of the (similar, symmetric PSD) matrix
sqrt(S1) S2 sqrt(S1) from mpmath.eigsy, on the float64 covariances. Both are stored so that the
test can say which it matches and how far apart the two references are.

Saturation: Python's colorsys.rgb_to_hsv per pixel (s = (max - min) / max, 0 for black) on
8-bit values / 255, averaged over the selected pixels. Colourfulness: Hasler & Suesstrunk
(2003) with numpy on 0..255 values (np.std, ddof 0). Clipped fraction: np.mean of v <= lo or
v >= hi.

Layout of crates/gen-world/tests/fixtures/metrics_parity.safetensors:
  fd/{case}/a, fd/{case}/b      N x D f64   feature sets (seeded numpy draws)
  fd/{case}/scipy               0-d f64     pytorch-fid style Frechet distance
  fd/{case}/mpmath              0-d f64     50-digit eigenvalue-route Frechet distance
  fd/{case}/offset_used         0-d i64     1 if the eps*I offset path was taken
  img/{k}/rgb                   H x W x 3 u8
  img/{k}/mask                  H x W f32   coverage in [0, 1]
  img/{k}/sat_all               0-d f64     mean colorsys saturation over all pixels
  img/{k}/sat_mask              0-d f64     ... over pixels with coverage >= 1
  img/{k}/bg                    3 u8        a background colour
  img/{k}/bg_threshold          0-d f64     distance threshold in [0, 1] sRGB units
  img/{k}/bg_select             H x W u8    1 where ||rgb/255 - bg/255|| > threshold
  img/{k}/sat_bg                0-d f64     mean saturation over bg_select pixels
  img/{k}/colourfulness         0-d f64     over all pixels
  img/{k}/clip_exact            0-d f64     fraction of channel values <= 0 or >= 255
  img/{k}/clip_loose            0-d f64     ... <= 1 or >= 254

Run: /work/venv/bin/python scripts/fixtures_metrics.py
"""
import colorsys
import os

import mpmath
import numpy as np
import scipy
import scipy.linalg
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "gen-world", "tests", "fixtures", "metrics_parity.safetensors")


def frechet_pytorch_fid(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The standard FID formula, following pytorch-fid's calculate_frechet_distance."""
    diff = mu1 - mu2
    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    offset_used = 0
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        offset_used = 1
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError("imaginary component %s" % np.max(np.abs(covmean.imag)))
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)), offset_used


def frechet_mpmath(mu1, sigma1, mu2, sigma2):
    mpmath.mp.dps = 50
    d = sigma1.shape[0]
    s1 = mpmath.matrix(sigma1.tolist())
    s2 = mpmath.matrix(sigma2.tolist())
    e, q = mpmath.eigsy(s1)
    r = mpmath.diag([mpmath.sqrt(max(e[i], 0)) for i in range(d)])
    root = q * r * q.T
    m = root * s2 * root
    m = (m + m.T) / 2
    ev = mpmath.eigsy(m, eigvals_only=True)
    tr = sum(mpmath.sqrt(max(v, 0)) for v in ev)
    mean = sum((mpmath.mpf(float(x)) - mpmath.mpf(float(y))) ** 2 for x, y in zip(mu1, mu2))
    total = mean + sum(s1[i, i] for i in range(d)) + sum(s2[i, i] for i in range(d)) - 2 * tr
    return float(total)


def fd_case(out, name, a, b):
    mu1, mu2 = a.mean(axis=0), b.mean(axis=0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref, offset_used = frechet_pytorch_fid(mu1, s1, mu2, s2)
    hp = frechet_mpmath(mu1, s1, mu2, s2)
    print(f"fd/{name}: N={a.shape[0]},{b.shape[0]} D={a.shape[1]} scipy={ref!r} mpmath={hp!r} "
          f"rel diff={abs(ref - hp) / abs(hp):.3e} offset={offset_used}")
    out[f"fd/{name}/a"] = a
    out[f"fd/{name}/b"] = b
    out[f"fd/{name}/scipy"] = np.array(ref)
    out[f"fd/{name}/mpmath"] = np.array(hp)
    out[f"fd/{name}/offset_used"] = np.array(offset_used, dtype=np.int64)


def saturation(px):
    return colorsys.rgb_to_hsv(*(float(v) / 255.0 for v in px))[1]


def image_case(out, k, rgb, mask, bg, threshold):
    h, w, _ = rgb.shape
    flat = rgb.reshape(-1, 3)
    sats = np.array([saturation(p) for p in flat])
    sel = mask.reshape(-1) >= 1.0
    dist = np.sqrt((((flat.astype(np.float64) - np.array(bg, dtype=np.float64)) / 255.0) ** 2).sum(axis=1))
    bg_sel = dist > threshold
    x = rgb.astype(np.float64)
    rg = x[..., 0] - x[..., 1]
    yb = 0.5 * (x[..., 0] + x[..., 1]) - x[..., 2]
    colourful = np.sqrt(np.std(rg) ** 2 + np.std(yb) ** 2) + 0.3 * np.sqrt(np.mean(rg) ** 2 + np.mean(yb) ** 2)
    out[f"img/{k}/rgb"] = rgb
    out[f"img/{k}/mask"] = mask.astype(np.float32)
    out[f"img/{k}/sat_all"] = np.array(sats.mean())
    out[f"img/{k}/sat_mask"] = np.array(sats[sel].mean())
    out[f"img/{k}/bg"] = np.array(bg, dtype=np.uint8)
    out[f"img/{k}/bg_threshold"] = np.array(threshold)
    out[f"img/{k}/bg_select"] = bg_sel.reshape(h, w).astype(np.uint8)
    out[f"img/{k}/sat_bg"] = np.array(sats[bg_sel].mean())
    out[f"img/{k}/colourfulness"] = np.array(float(colourful))
    out[f"img/{k}/clip_exact"] = np.array(float(np.mean((rgb <= 0) | (rgb >= 255))))
    out[f"img/{k}/clip_loose"] = np.array(float(np.mean((rgb <= 1) | (rgb >= 254))))
    print(f"img/{k}: {h}x{w} sat_all={sats.mean():.6f} sat_mask={sats[sel].mean():.6f} "
          f"bg_sel={bg_sel.mean():.3f} colourfulness={colourful:.4f}")


def main():
    rng = np.random.default_rng(20261128)
    out = {}
    d = 16
    # Two different Gaussians, well-conditioned.
    a = rng.standard_normal((200, d)) @ rng.standard_normal((d, d)) * 0.5
    b = rng.standard_normal((200, d)) @ rng.standard_normal((d, d)) * 0.4 + 0.3
    fd_case(out, "basic", a, b)
    # Near-singular: rank-6 structure plus 1e-5 noise (covariance eigenvalues down to ~1e-10).
    wa, wb = rng.standard_normal((6, d)), rng.standard_normal((6, d))
    a = rng.standard_normal((200, 6)) @ wa + 1e-5 * rng.standard_normal((200, d))
    b = rng.standard_normal((200, 6)) @ (wa + 0.2 * wb) + 1e-5 * rng.standard_normal((200, d)) + 0.1
    fd_case(out, "near_singular", a, b)
    # Same distribution, two draws (a real-vs-real-like small distance).
    base = rng.standard_normal((d, d))
    a = rng.standard_normal((150, d)) @ base
    b = rng.standard_normal((150, d)) @ base
    fd_case(out, "same_dist", a, b)
    # Rank-deficient: fewer samples than dimensions (singular covariances).
    a = rng.standard_normal((10, d))
    b = rng.standard_normal((12, d)) * 1.5
    fd_case(out, "rank_deficient", a, b)

    # Images: random colours with some pure black, white and clipped pixels.
    for k, (h, w) in enumerate([(8, 8), (6, 10), (12, 12)]):
        rgb = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        rgb[0, 0] = [0, 0, 0]
        rgb[0, 1] = [255, 255, 255]
        rgb[1, 0] = [128, 128, 128]
        rgb[1, 1] = [255, 0, 1]
        mask = rng.uniform(0.0, 1.0, size=(h, w))
        mask[mask > 0.6] = 1.0
        bg = [128, 128, 128] if k != 1 else [70, 100, 170]
        image_case(out, k, rgb, mask, bg, 0.12 if k != 2 else 0.4)

    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    save_file(out, OUT, metadata={"numpy": np.__version__, "scipy": scipy.__version__, "mpmath": mpmath.__version__})
    print("wrote", os.path.normpath(OUT), os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
