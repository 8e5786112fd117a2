#!/usr/bin/env python3
"""CPU PyTorch peer of gen-scene's splat rasterizer, for `cargo bench -p gen-bench --bench splat`.

Pinned: torch 2.9.1, gsplat 1.5.3, safetensors 0.8.0
(`pip install --no-deps gsplat==1.5.3 jaxtyping rich` next to torch).

gsplat's CUDA rasterizer does not run on the CPU, so the peer
is gsplat's pure-PyTorch projection (`_quat_scale_to_covar_preci`, `_fully_fused_projection`)
and tile binning (`_isect_tiles`, `_isect_offset_encode`) from `gsplat/cuda/_torch_impl.py`,
followed by per-tile (16×16) front-to-back compositing written below in plain PyTorch with the
3DGS rules (alpha = min(0.99, opacity·exp(power)), skip alpha < 1/255 and power > 0, stop
before T < 1e-4), vectorised over the pixels and Gaussians of a tile (cumulative product of
1 - alpha); backward by autograd. SH degree 0: colour = max(0, 0.5 + 0.28209479·sh).

The scenes (seeded here) are written to `target/bench/splat_scenes.safetensors` so that the Rust
benchmark renders the same Gaussians from the same camera; the timings go to
`target/bench/splat_torch.json` (folder: `GEN_BENCH_SPLAT_DIR`; the minimum of the timed runs is
recorded too, as `*_min_s`, and the median process CPU time, as `*_cpu_s`, which a loaded
machine disturbs far less than wall time; `--threads N` or `GEN_BENCH_TORCH_THREADS` sets
torch's intra- and inter-op thread counts, default 2).
Camera: world-to-camera R = I, T = (0, 0, 4) (OpenCV axes),
fov_y 0.8 rad, square images, fx = fy = 0.5·H / tan(0.4), (cx, cy) = (W/2, H/2).

Forward: everything under `torch.no_grad()`. Forward + backward: the same with autograd, loss =
sum(w · rgb) for a fixed random w, `.backward()` to all five parameter tensors. Median of
`GEN_BENCH_REPS` runs (default 3) after one warm-up, or fewer when one takes over 5 s;
a case whose forward + backward takes over `GEN_BENCH_SPLAT_LIMIT_S` (default 30 s) of process CPU
time causes the larger images of that Gaussian count and the larger counts at that size to be
skipped; so does a case whose autograd graph would not fit in memory (estimated from the number
of tile entries against `GEN_BENCH_SPLAT_MEM_GB`, default 60% of MemAvailable).

Run: /work/venv/bin/python scripts/bench_splat_torch.py --threads 1
"""
import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import time

import torch
from safetensors.torch import save_file

PINNED = {"torch": "2.9.1", "gsplat": "1.5.3", "safetensors": "0.8.0"}
ROOT = os.path.normpath(os.path.join(os.path.dirname(__file__), ".."))
OUT_DIR = os.environ.get("GEN_BENCH_SPLAT_DIR", os.path.join(ROOT, "target", "bench"))
SCENES = os.path.join(OUT_DIR, "splat_scenes.safetensors")
RESULTS = os.path.join(OUT_DIR, "splat_torch.json")

COUNTS = [1000, 10000, 100000]
SIZES = [64, 128, 256, 512]
FOV_Y = 0.8
CAM_T = (0.0, 0.0, 4.0)
TILE = 16
SEED = 20261128
BACKGROUND = (0.0, 0.0, 0.0)
C0 = 0.28209479177387814


# Autograd keeps about nine (entries, 256) f32 tensors per tile for the backward pass: 100k
# Gaussians at 256² (about 2.5 M tile entries) were killed for memory at 23 GB RSS. Estimate with
# a margin, and skip a case that would not fit (an out-of-memory kill may hit other processes).
BYTES_PER_ISECT_PIXEL = 48


class OverMemoryBudget(Exception):
    pass


def memory_budget():
    """Bytes the forward + backward may use: `GEN_BENCH_SPLAT_MEM_GB`, else 60% of MemAvailable."""
    if "GEN_BENCH_SPLAT_MEM_GB" in os.environ:
        return float(os.environ["GEN_BENCH_SPLAT_MEM_GB"]) * 2**30
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return 0.6 * int(line.split()[1]) * 1024
    return float("inf")


def load_torch_impl():
    """gsplat/cuda/_torch_impl.py by path (importing the gsplat package pulls in CUDA wrappers)."""
    spec = importlib.util.find_spec("gsplat")
    path = os.path.join(os.path.dirname(spec.origin), "cuda", "_torch_impl.py")
    mspec = importlib.util.spec_from_file_location("gsplat_torch_impl", path)
    mod = importlib.util.module_from_spec(mspec)
    mspec.loader.exec_module(mod)
    return mod


G = load_torch_impl()


def make_scene(n, gen):
    """Same ranges as gen-scene's RandomSplatsConfig::default (degree 0)."""
    return {
        "means": torch.rand(n, 3, generator=gen) * 2 - 1,
        "log_scales": -3.0 + 1.5 * torch.rand(n, 3, generator=gen),
        "quats": torch.randn(n, 4, generator=gen),
        "opacity_logits": -1.0 + 3.0 * torch.rand(n, generator=gen),
        "sh": 0.5 * torch.randn(n, 1, 3, generator=gen),
    }


def camera(size):
    f = 0.5 * size / math.tan(0.5 * FOV_Y)
    K = torch.tensor([[f, 0, 0.5 * size], [0, f, 0.5 * size], [0, 0, 1.0]])
    V = torch.eye(4)
    V[:3, 3] = torch.tensor(CAM_T)
    return K, V


def render(p, size):
    """(H, W, 3) image and the timings of its stages (s)."""
    K, V = camera(size)
    t0 = time.perf_counter()
    covars, _ = G._quat_scale_to_covar_preci(p["quats"], torch.exp(p["log_scales"]), compute_preci=False)
    radii, means2d, depths, conics, _ = G._fully_fused_projection(
        p["means"], covars, V[None], K[None], size, size, eps2d=0.3, near_plane=0.01
    )
    radii, means2d, depths, conics = radii[0], means2d[0], depths[0], conics[0]
    t1 = time.perf_counter()
    tw = th = (size + TILE - 1) // TILE
    with torch.no_grad():
        _, isect_ids, flatten_ids = G._isect_tiles(means2d[None], radii[None], depths[None], TILE, tw, th)
        offsets = G._isect_offset_encode(isect_ids, 1, tw, th).flatten().long()
    t2 = time.perf_counter()
    colors = torch.clamp_min(0.5 + C0 * p["sh"][:, 0, :], 0.0)
    opac = torch.sigmoid(p["opacity_logits"])
    bg = torch.tensor(BACKGROUND)
    n_isect = flatten_ids.shape[0]
    if torch.is_grad_enabled():
        need = n_isect * TILE * TILE * BYTES_PER_ISECT_PIXEL
        if need > memory_budget():
            raise OverMemoryBudget(f"autograd would need about {need / 2**30:.1f} GiB ({n_isect} tile entries), "
                                   f"over the budget of {memory_budget() / 2**30:.1f} GiB")
    ends = torch.cat([offsets[1:], torch.tensor([n_isect])])
    iy, ix = torch.meshgrid(torch.arange(TILE, dtype=torch.float32), torch.arange(TILE, dtype=torch.float32), indexing="ij")
    iy, ix = iy.reshape(-1), ix.reshape(-1)
    tiles = []
    alpha_sum = 0.0  # sum of 1 - T_final over the pixels of the tiles (a cross-check with gen-scene)
    for t in range(tw * th):
        ty, tx = divmod(t, tw)
        px = ix + tx * TILE + 0.5
        py = iy + ty * TILE + 0.5
        s, e = int(offsets[t]), int(ends[t])
        if e <= s:
            tiles.append(bg.expand(TILE * TILE, 3))
            continue
        ids = flatten_ids[s:e].long()  # front to back (sorted by depth)
        m2, cn = means2d[ids], conics[ids]
        dx = m2[:, 0:1] - px[None]
        dy = m2[:, 1:2] - py[None]
        power = -0.5 * (cn[:, 0:1] * dx * dx + cn[:, 2:3] * dy * dy) - cn[:, 1:2] * dx * dy
        alpha = torch.clamp_max(opac[ids][:, None] * torch.exp(power), 0.99)
        with torch.no_grad():
            use = (power <= 0) & (alpha >= 1.0 / 255.0)
            a0 = torch.where(use, alpha, torch.zeros_like(alpha))
            t_incl = torch.cumprod(1 - a0, dim=0)
            # T never increases, so "stop before T < 1e-4" keeps a prefix.
            use = use & (t_incl >= 1e-4)
        a = torch.where(use, alpha, torch.zeros_like(alpha))
        trans = torch.cumprod(1 - a, dim=0)
        t_excl = torch.cat([torch.ones_like(trans[:1]), trans[:-1]], dim=0)
        w = a * t_excl  # (K, 256)
        rgb = w.t() @ colors[ids] + trans[-1][:, None] * bg[None]
        tiles.append(rgb)
        alpha_sum += float((1 - trans[-1]).detach().sum())
    img = torch.stack(tiles).reshape(th, tw, TILE, TILE, 3).permute(0, 2, 1, 3, 4).reshape(th * TILE, tw * TILE, 3)
    img = img[:size, :size]
    t3 = time.perf_counter()
    # Tiles beyond the image edge are empty here (sizes are multiples of 16).
    info = {"project": t1 - t0, "bin": t2 - t1, "composite": t3 - t2, "isects": n_isect, "alpha_mean": alpha_sum / (size * size)}
    return img, info


def timed(f, reps, warmup=True):
    """(median wall s, min wall s, median process CPU s, info of the last run)."""
    if warmup:
        f()
    ts, cs = [], []
    for _ in range(reps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        info = f()
        ts.append(time.perf_counter() - t0)
        cs.append(time.process_time() - c0)
        if ts[-1] > 5.0:
            break
    ts.sort()
    cs.sort()
    return ts[len(ts) // 2], ts[0], cs[len(cs) // 2], info


def write_results(results):
    """Writes the timings so far (after every case, so a crash keeps the finished ones)."""
    doc = {
        "generator": "scripts/bench_splat_torch.py",
        "versions": {k: importlib.metadata.version(k) for k in PINNED},
        "threads": torch.get_num_threads(),
        "loadavg": open("/proc/loadavg").read().strip() if os.path.exists("/proc/loadavg") else None,
        "fov_y": FOV_Y,
        "cam_t": CAM_T,
        "results": results,
    }
    with open(RESULTS + ".tmp", "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(RESULTS + ".tmp", RESULTS)


def main():
    for pkg, want in PINNED.items():
        have = importlib.metadata.version(pkg)
        if not have.startswith(want):
            sys.exit(f"{pkg} {have} installed, this benchmark is pinned to {want}")
    ap = argparse.ArgumentParser(description="CPU PyTorch peer of the splat rasterizer benchmark")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("GEN_BENCH_TORCH_THREADS", "2")),
                    help="torch intra-op threads (default: GEN_BENCH_TORCH_THREADS or 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(args.threads)
    reps = int(os.environ.get("GEN_BENCH_REPS", "3"))
    limit = float(os.environ.get("GEN_BENCH_SPLAT_LIMIT_S", "30"))
    counts = [int(x) for x in os.environ.get("GEN_BENCH_SPLAT_COUNTS", ",".join(map(str, COUNTS))).split(",")]
    sizes = [int(x) for x in os.environ.get("GEN_BENCH_SPLAT_SIZES", ",".join(map(str, SIZES))).split(",")]
    gen = torch.Generator().manual_seed(SEED)
    scenes = {n: make_scene(n, gen) for n in counts}
    os.makedirs(OUT_DIR, exist_ok=True)
    tensors = {f"n{n}/{k}": v.contiguous() for n, s in scenes.items() for k, v in s.items()}
    save_file(tensors, SCENES + ".tmp", metadata={"generator": "scripts/bench_splat_torch.py"})
    os.replace(SCENES + ".tmp", SCENES)
    results = []
    too_slow_sizes = {}  # size -> smallest count that exceeded the limit
    for n in counts:
        for size in sizes:
            row = {"count": n, "size": size}
            if any(size >= s and n >= c for s, c in too_slow_sizes.items()):
                row["skipped"] = f"a smaller case took over {limit:.0f} s or did not fit in memory"
                results.append(row)
                write_results(results)
                print(f"n={n:6} {size:3}²: skipped", flush=True)
                continue
            p = scenes[n]

            def fwd():
                with torch.no_grad():
                    img, info = render(p, size)
                return info

            wts = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(n + size))

            def fwd_bwd():
                leafs = {k: v.clone().requires_grad_(True) for k, v in p.items()}
                img, info = render(leafs, size)
                t0 = time.perf_counter()
                (wts * img).sum().backward()
                info["backward"] = time.perf_counter() - t0
                return info

            # One untimed try first decides whether the case fits the limit.
            c0 = time.process_time()
            t0 = time.perf_counter()
            try:
                fwd_bwd()
            except OverMemoryBudget as e:
                row["skipped"] = f"out of memory budget: {e}"
                too_slow_sizes[size] = min(too_slow_sizes.get(size, n), n)
                results.append(row)
                write_results(results)
                print(f"n={n:6} {size:3}²: skipped ({e})", flush=True)
                continue
            first = time.perf_counter() - t0
            first_cpu = time.process_time() - c0
            # The limit applies to CPU time, which a loaded machine inflates far less than wall time.
            if first_cpu > limit:
                row["fwd_bwd_s"] = first
                row["fwd_bwd_cpu_s"] = first_cpu
                row["note"] = "single run (over the limit)"
                too_slow_sizes[size] = min(too_slow_sizes.get(size, n), n)
                with torch.no_grad():
                    c0 = time.process_time()
                    t0 = time.perf_counter()
                    _, info = render(p, size)
                    row["fwd_s"] = time.perf_counter() - t0
                    row["fwd_cpu_s"] = time.process_time() - c0
                row["stages"] = info
            else:
                row["fwd_s"], row["fwd_min_s"], row["fwd_cpu_s"], _ = timed(fwd, reps)
                row["fwd_bwd_s"], row["fwd_bwd_min_s"], row["fwd_bwd_cpu_s"], info = timed(fwd_bwd, reps, warmup=False)
                row["stages"] = info
            results.append(row)
            write_results(results)
            st = row["stages"]
            print(
                f"n={n:6} {size:3}²: fwd {row['fwd_s']*1e3:9.1f} ms (min {row.get('fwd_min_s', row['fwd_s'])*1e3:.1f})  "
                f"fwd+bwd {row['fwd_bwd_s']*1e3:9.1f} ms (min {row.get('fwd_bwd_min_s', row['fwd_bwd_s'])*1e3:.1f}; "
                f"CPU fwd {row['fwd_cpu_s']*1e3:.1f}, fwd+bwd {row['fwd_bwd_cpu_s']*1e3:.1f} ms)  "
                f"(project {st['project']*1e3:.0f}, bin {st['bin']*1e3:.0f}, composite {st['composite']*1e3:.0f} ms; "
                f"{st['isects']} tile entries; mean alpha {st['alpha_mean']:.3f})",
                flush=True,
            )
    write_results(results)
    print(f"wrote {RESULTS} and {SCENES}")


if __name__ == "__main__":
    main()
