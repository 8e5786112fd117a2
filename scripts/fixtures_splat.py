#!/usr/bin/env python3
"""Parity fixtures for the Gaussian-splat ops of crates/gen-scene (pinned: torch 2.9.1,
gsplat 1.5.3, safetensors 0.8.0; `pip install --no-deps gsplat==1.5.3` next to torch).

References:
- projection and SH colour: gsplat's pure-PyTorch implementation, `gsplat/cuda/_torch_impl.py`
  (`_quat_scale_to_covar_preci`, `_fully_fused_projection`, `_spherical_harmonics`), loaded by
  file path so that no CUDA extension is built or imported; gradients by torch autograd;
- full render: gsplat's projection and SH followed by the 3DGS compositing rules
  (graphdeco-inria/diff-gaussian-rasterization: alpha = min(0.99, opacity * exp(power)), skip
  alpha < 1/255 and power > 0, stop before T < 1e-4, depth order) written below in dense torch
  ops; a 16x16 image is a single 16x16 tile, so tile binning does not enter. gsplat's own
  rasterizer needs CUDA and clamps alpha at 0.999, so it is not used.

Everything is float64. Conventions shared with gen-scene: world-to-camera `t = R p + T`,
OpenCV axes, pixel centres at +0.5, quaternions (w, x, y, z), opacity = sigmoid(logit),
scale = exp(log_scale), colour = max(0, 0.5 + SH(dir = mean - camera centre)).

Layout of crates/gen-scene/tests/fixtures/splat_gsplat.safetensors (f64 unless said):
  {case}/camera/K          (4)   fx, fy, cx, cy
  {case}/camera/size       (2)   width, height
  {case}/camera/R          (3,3) world-to-camera rotation
  {case}/camera/T          (3)   world-to-camera translation
  {case}/in/means (N,3), in/log_scales (N,3), in/quats (N,4), in/logits (N), in/sh (N,K,3)
  proj/out/means2d (N,2), proj/out/conics (N,3), proj/out/depths (N), proj/out/valid (N) 0/1
  proj/w/means2d, proj/w/conics, proj/w/depths   loss weights, same shapes as the outputs
  proj/grad/{means,log_scales,quats}             d loss / d input,
      loss = sum(valid * (w_means2d . means2d + w_conics . conics + w_depths * depths))
  sh/out/colors (N,3), sh/w/colors (N,3), sh/grad/{means,sh}   loss = sum(w . colors)
  render/out/{rgb (H,W,3), alpha (H,W), depth (H,W)}, render/background (3)
  render/w/{rgb, alpha, depth}, render/grad/{means,log_scales,quats,logits,sh}
      loss = sum(w_rgb . rgb) + sum(w_alpha . alpha) + sum(w_depth . depth)

Run: /work/venv/bin/python scripts/fixtures_splat.py
"""
import importlib.metadata
import importlib.util
import math
import os
import sys

import torch
from safetensors.torch import save_file

PINNED = {"torch": "2.9.1", "gsplat": "1.5.3", "safetensors": "0.8.0"}
OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "gen-scene", "tests", "fixtures", "splat_gsplat.safetensors")


def check_versions():
    for pkg, want in PINNED.items():
        have = importlib.metadata.version(pkg)
        if not have.startswith(want):
            sys.exit(f"{pkg} {have} installed, the fixtures are pinned to {want}")


def load_torch_impl():
    """gsplat/cuda/_torch_impl.py by path: importing the gsplat package would pull in its
    CUDA wrappers."""
    spec = importlib.util.find_spec("gsplat")
    path = os.path.join(os.path.dirname(spec.origin), "cuda", "_torch_impl.py")
    mspec = importlib.util.spec_from_file_location("gsplat_torch_impl", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


G = None  # the gsplat torch implementation module
D = torch.float64


def rot_from_quat(q):
    q = q / q.norm()
    w, x, y, z = q.tolist()
    return torch.tensor(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ],
        dtype=D,
    )


def camera(gen, width, height, fov_y, dist):
    """A camera `dist` in front of the origin, slightly rotated."""
    q = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=D) + 0.15 * torch.randn(4, generator=gen, dtype=D)
    R = rot_from_quat(q)
    T = torch.tensor([0.1, -0.05, dist], dtype=D)
    f = 0.5 * height / math.tan(0.5 * fov_y)
    K = torch.tensor([f, f * 1.05, 0.5 * width + 0.7, 0.5 * height - 0.4], dtype=D)
    return K, R, T


def Kmat(K):
    fx, fy, cx, cy = K.tolist()
    return torch.tensor([[fx, 0, cx], [0, fy, cy], [0, 0, 1]], dtype=D)


def viewmat(R, T):
    V = torch.eye(4, dtype=D)
    V[:3, :3] = R
    V[:3, 3] = T
    return V


def cam_center(R, T):
    return -(R.T @ T)


def project(means, log_scales, quats, K, R, T, width, height):
    covars, _ = G._quat_scale_to_covar_preci(quats, torch.exp(log_scales), compute_preci=False)
    radii, means2d, depths, conics, _ = G._fully_fused_projection(
        means, covars, viewmat(R, T)[None], Kmat(K)[None], width, height, eps2d=0.3, near_plane=0.01
    )
    return radii[0], means2d[0], depths[0], conics[0]


def sh_colors(means, sh, R, T):
    k = sh.shape[1]
    degree = int(round(math.sqrt(k))) - 1
    dirs = means - cam_center(R, T)[None]
    return torch.clamp_min(G._spherical_harmonics(degree, dirs, sh) + 0.5, 0.0)


def case_inputs(gen, n, k, extent, log_scale_range, logit_range, sh_std):
    lo, hi = log_scale_range
    return {
        "means": (torch.rand(n, 3, generator=gen, dtype=D) * 2 - 1) * extent,
        "log_scales": lo + (hi - lo) * torch.rand(n, 3, generator=gen, dtype=D),
        "quats": torch.randn(n, 4, generator=gen, dtype=D),
        "logits": logit_range[0] + (logit_range[1] - logit_range[0]) * torch.rand(n, generator=gen, dtype=D),
        "sh": sh_std * torch.randn(n, k, 3, generator=gen, dtype=D),
    }


def leafs(inputs):
    return {k: v.clone().requires_grad_(True) for k, v in inputs.items()}


def put_camera(out, case, K, R, T, width, height):
    out[f"{case}/camera/K"] = K
    out[f"{case}/camera/size"] = torch.tensor([width, height], dtype=D)
    out[f"{case}/camera/R"] = R
    out[f"{case}/camera/T"] = T


def put_inputs(out, case, inputs):
    for k, v in inputs.items():
        out[f"{case}/in/{k}"] = v.detach().clone()


def proj_case(out, gen):
    width, height = 64, 48
    K, R, T = camera(gen, width, height, 0.9, 4.0)
    inputs = case_inputs(gen, 48, 1, 1.6, (-2.5, -0.8), (-1.0, 1.0), 0.3)
    # Points beyond the frustum clamp margin (x/z > 1.15 tan) that are still large enough to
    # reach into the image, one behind the camera, one far off screen.
    fx, cx = K[0].item(), K[2].item()
    tan_x = 0.5 * width / fx
    lim_pos = (width - cx) / fx + 0.3 * tan_x
    lim_neg = cx / fx + 0.3 * tan_x
    # (x/z in camera space, z, log-scale)
    specials = [(lim_pos + 0.1, 3.0, 0.2), (-(lim_neg + 0.15), 3.5, 0.3), (0.2, -1.0, -1.0), (9.0, 3.0, -2.0)]
    for i, (ratio, z, ls) in enumerate(specials):
        t = torch.tensor([ratio * z, 0.1, z], dtype=D)
        inputs["means"][i] = R.T @ (t - T)
        inputs["log_scales"][i] = ls
    x = leafs(inputs)
    radii, means2d, depths, conics = project(x["means"], x["log_scales"], x["quats"], K, R, T, width, height)
    valid = (radii > 0).all(dim=-1).to(D)
    w = {
        "means2d": torch.randn(means2d.shape, generator=gen, dtype=D),
        "conics": torch.randn(conics.shape, generator=gen, dtype=D),
        "depths": torch.randn(depths.shape, generator=gen, dtype=D),
    }
    loss = (valid[:, None] * (w["means2d"] * means2d)).sum() + (valid[:, None] * (w["conics"] * conics)).sum() + (valid * w["depths"] * depths).sum()
    loss.backward()
    put_camera(out, "proj", K, R, T, width, height)
    put_inputs(out, "proj", inputs)
    out["proj/out/means2d"] = means2d.detach()
    out["proj/out/conics"] = conics.detach()
    out["proj/out/depths"] = depths.detach()
    out["proj/out/valid"] = valid
    for k, v in w.items():
        out[f"proj/w/{k}"] = v
    for k in ["means", "log_scales", "quats"]:
        out[f"proj/grad/{k}"] = x[k].grad.detach().clone()
    print(f"proj: {int(valid.sum())} of {len(valid)} valid")


def sh_case(out, gen):
    width, height = 32, 32
    K, R, T = camera(gen, width, height, 0.9, 4.0)
    inputs = case_inputs(gen, 32, 16, 1.5, (-2.0, -1.0), (-1.0, 1.0), 0.4)
    x = leafs(inputs)
    colors = sh_colors(x["means"], x["sh"], R, T)
    w = torch.randn(colors.shape, generator=gen, dtype=D)
    (w * colors).sum().backward()
    put_camera(out, "sh", K, R, T, width, height)
    put_inputs(out, "sh", inputs)
    out["sh/out/colors"] = colors.detach()
    out["sh/w/colors"] = w
    out["sh/grad/means"] = x["means"].grad.detach().clone()
    out["sh/grad/sh"] = x["sh"].grad.detach().clone()
    print(f"sh: {int((colors == 0).sum())} clamped channels")


def composite(means2d, conics, depths, colors, opacity, valid, width, height, background):
    """3DGS compositing, dense: every Gaussian at every pixel of a single-tile image."""
    ys, xs = torch.meshgrid(torch.arange(height, dtype=D) + 0.5, torch.arange(width, dtype=D) + 0.5, indexing="ij")
    px, py = xs.reshape(-1), ys.reshape(-1)
    dx = means2d[:, 0:1] - px[None]
    dy = means2d[:, 1:2] - py[None]
    a, b, c = conics[:, 0:1], conics[:, 1:2], conics[:, 2:3]
    power = -0.5 * (a * dx * dx + c * dy * dy) - b * dx * dy
    alpha = torch.clamp_max(opacity[:, None] * torch.exp(power), 0.99)
    order = sorted([i for i in range(len(depths)) if valid[i]], key=lambda i: (depths[i].item(), i))
    with torch.no_grad():
        mask = torch.zeros_like(alpha)
        al, pw = alpha.detach(), power.detach()
        for p in range(px.shape[0]):
            t = 1.0
            for i in order:
                if pw[i, p] > 0 or al[i, p] < 1.0 / 255.0:
                    continue
                if t * (1 - al[i, p].item()) < 1e-4:
                    break
                t *= 1 - al[i, p].item()
                mask[i, p] = 1.0
    alpha = alpha * mask
    tr = torch.ones(px.shape[0], dtype=D)
    rgb = torch.zeros(px.shape[0], 3, dtype=D)
    dep = torch.zeros(px.shape[0], dtype=D)
    for i in order:
        wgt = tr * alpha[i]
        rgb = rgb + wgt[:, None] * colors[i][None]
        dep = dep + wgt * depths[i]
        tr = tr * (1 - alpha[i])
    rgb = rgb + tr[:, None] * background[None]
    return rgb.reshape(height, width, 3), (1 - tr).reshape(height, width), dep.reshape(height, width)


def render_case(out, gen):
    width, height = 16, 16
    K, R, T = camera(gen, width, height, 0.8, 4.0)
    inputs = case_inputs(gen, 10, 9, 0.7, (-1.6, -0.9), (-1.0, 3.0), 0.3)
    x = leafs(inputs)
    radii, means2d, depths, conics = project(x["means"], x["log_scales"], x["quats"], K, R, T, width, height)
    valid = (radii > 0).all(dim=-1)
    assert bool(valid.all()), "every splat of the render case must be visible"
    colors = sh_colors(x["means"], x["sh"], R, T)
    opacity = torch.sigmoid(x["logits"])
    background = torch.tensor([0.2, 0.3, 0.4], dtype=D)
    rgb, alpha, depth = composite(means2d, conics, depths, colors, opacity, valid, width, height, background)
    w = {
        "rgb": torch.randn(rgb.shape, generator=gen, dtype=D),
        "alpha": torch.randn(alpha.shape, generator=gen, dtype=D),
        "depth": 0.2 * torch.randn(depth.shape, generator=gen, dtype=D),
    }
    ((w["rgb"] * rgb).sum() + (w["alpha"] * alpha).sum() + (w["depth"] * depth).sum()).backward()
    put_camera(out, "render", K, R, T, width, height)
    put_inputs(out, "render", inputs)
    out["render/background"] = background
    out["render/out/rgb"] = rgb.detach()
    out["render/out/alpha"] = alpha.detach()
    out["render/out/depth"] = depth.detach()
    for k, v in w.items():
        out[f"render/w/{k}"] = v
    for k in ["means", "log_scales", "quats", "logits", "sh"]:
        out[f"render/grad/{k}"] = x[k].grad.detach().clone()
    print(f"render: alpha range {alpha.min().item():.3f}..{alpha.max().item():.3f}")


def main():
    global G
    check_versions()
    G = load_torch_impl()
    torch.set_default_dtype(D)
    gen = torch.Generator().manual_seed(20261128)
    out = {}
    proj_case(out, gen)
    sh_case(out, gen)
    render_case(out, gen)
    out = {k: v.contiguous() for k, v in out.items()}
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    save_file(out, tmp, metadata={"generator": "scripts/fixtures_splat.py", **{f"version_{k}": v for k, v in PINNED.items()}})
    os.replace(tmp, OUT)
    print(f"wrote {os.path.normpath(OUT)} ({os.path.getsize(OUT)} bytes, {len(out)} tensors)")


if __name__ == "__main__":
    main()
