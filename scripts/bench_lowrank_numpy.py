#!/usr/bin/env python3
"""numpy peer of the projection-time table of `cargo bench -p gen-bench --bench optim`:
SVD (np.linalg.svd, thin, f32 — what GaLore's projector computes, top-r singular vectors of the
short side) vs DCT selection (matmul by a cached orthonormal DCT-II basis of the short side,
column/row L1 norms, argsort, first r), same shapes, ranks and statistic (median ms) as the
Rust benchmark. Gradients: seeded standard normal f32.

Run right after the Rust benchmark on the same machine:
  OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 MKL_NUM_THREADS=2 /work/venv/bin/python scripts/bench_lowrank_numpy.py
"""
import math
import os
import time

import numpy as np

SHAPES = [(320, 320), (640, 640), (1280, 1280), (320, 1280), (1280, 5120), (2560, 320)]
RANKS = [32, 128]


def dct2_basis(d):
    i = np.arange(d)[:, None]
    k = np.arange(d)[None, :]
    q = np.sqrt(2.0 / d) * np.cos(np.pi * (2 * i + 1) * k / (2 * d))
    q[:, 0] *= 1 / math.sqrt(2)
    return q.astype(np.float32)


def svd_proj(g, r):
    m, n = g.shape
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    return vt[:r].T if m >= n else u[:, :r]


def dct_proj(g, basis, r):
    m, n = g.shape
    scores = np.abs(g @ basis).sum(0) if m >= n else np.abs(basis.T @ g).sum(1)
    return np.argsort(-scores)[:r]


def median_ms(f, reps, warmup):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    n = len(ts)
    return ts[n // 2] if n % 2 else 0.5 * (ts[n // 2 - 1] + ts[n // 2])


def main():
    reps = int(os.environ.get("GEN_BENCH_REPS", "3"))
    rng = np.random.default_rng(7)
    print(f"numpy {np.__version__}")
    print("| shape | rank | numpy SVD (ms) | numpy DCT select (ms) | SVD/DCT |")
    print("|---|---|---|---|---|")
    for m, n in SHAPES:
        g = rng.standard_normal((m, n)).astype(np.float32)
        basis = dct2_basis(min(m, n))
        for r in RANKS:
            svd = median_ms(lambda: svd_proj(g, r), reps, 0)
            dct = median_ms(lambda: dct_proj(g, basis, r), max(reps, 5), 1)
            print(f"| {m}×{n} | {r} | {svd:.1f} | {dct:.2f} | {svd / dct:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
