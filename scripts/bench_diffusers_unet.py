#!/usr/bin/env python3
"""Time diffusers' UNet2DConditionModel on CPU with the configurations of bench/benches/unet.rs.

Run (nothing else heavy at the same time; the SD-1.5-sized UNet takes a few minutes):

    /work/venv/bin/python scripts/bench_diffusers_unet.py            # writes target/bench/diffusers_unet.json
    /work/venv/bin/python scripts/bench_diffusers_unet.py --no-sd15 --reps 3

then `cargo bench -p gen-bench --bench unet` prints gen-models / diffusers ratios from that file.

Pinned environment: scripts/requirements-fixtures.txt (torch==2.9.1, diffusers==0.42.1).

Same measurements as the Rust benchmark: f32, torch.set_num_threads(2), timestep 500 for every
sample, median of --reps timed calls after one untimed warm-up (wall clock, and the process CPU
time of all threads, steadier on a shared machine):
  fwd            forward under torch.no_grad()
  fwd_bwd        forward + MSE loss against a random target + backward
  fwd_bwd_adamw  the same + torch.optim.AdamW(lr=1e-4).step()
Configurations:
  tiny  block_out_channels (32, 64, 64), 1 layer per block, 1.49 M parameters, batch 32,
        4x16x16 latents, 77 condition tokens of width 64
  prior the embedded prior's UNet (gen train --preset real): (32, 64, 64), attention at 8x8
        and 4x4 only, batch 32, 4x16x16 latents, 16 condition tokens of width 64
  sd15  Stable Diffusion 1.5's UNet (860 M parameters), batch 1, 4x64x64 latents, 77x768
        condition; forward only unless --sd15-backward (forward + backward, no AdamW;
        needs well over 10 GB of memory)
Weights: seeded random, by the rule of scripts/make_tiny_sd.py (the values do not change the time).
"""

import argparse
import json
import os
import statistics
import sys
import time

import torch

import diffusers
from diffusers import UNet2DConditionModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_tiny_sd import randomize_  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINNED = {"torch": "2.9.1", "diffusers": "0.42.1"}

CONFIGS = {
    "tiny": dict(
        model=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        batch=32,
        hw=16,
        tokens=77,
    ),
    # the embedded prior's UNet (gen-pretrain's real preset): one `gen train` UNet step
    "prior": dict(
        model=dict(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=64,
            attention_head_dim=4,
            norm_num_groups=16,
        ),
        batch=32,
        hw=16,
        tokens=16,
    ),
    "sd15": dict(
        model=dict(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=768,
            attention_head_dim=8,
            norm_num_groups=32,
        ),
        batch=1,
        hw=64,
        tokens=77,
    ),
}


def timed(fn, reps, warmup=1):
    """(median wall ms, min wall ms, median process CPU ms over all threads)."""
    for _ in range(warmup):
        fn()
    ms, cpu = [], []
    for _ in range(reps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        fn()
        ms.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return statistics.median(ms), min(ms), statistics.median(cpu)


def bench(name, spec, reps, backward, adamw, warmup=1):
    print(f"== {name}: building", file=sys.stderr)
    unet = UNet2DConditionModel(**spec["model"])
    randomize_(unet, 1)
    n_params = sum(p.numel() for p in unet.parameters())
    g = torch.Generator().manual_seed(2)
    b, hw = spec["batch"], spec["hw"]
    x = torch.randn(b, 4, hw, hw, generator=g)
    ehs = torch.randn(b, spec["tokens"], spec["model"]["cross_attention_dim"], generator=g)
    target = torch.randn(b, 4, hw, hw, generator=g)
    t = torch.full((b,), 500, dtype=torch.int64)
    res = {"params": n_params, "batch": b, "hw": hw, "tokens": spec["tokens"], "reps": reps}

    def fwd():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ehs)

    print(f"== {name}: forward", file=sys.stderr)
    res["fwd_ms"], res["fwd_min_ms"], res["fwd_cpu_ms"] = timed(fwd, reps, warmup)
    if backward:
        unet.train()

        def fwd_bwd():
            loss = ((unet(x, t, encoder_hidden_states=ehs).sample - target) ** 2).mean()
            loss.backward()
            unet.zero_grad(set_to_none=True)

        print(f"== {name}: forward + backward", file=sys.stderr)
        res["fwd_bwd_ms"], res["fwd_bwd_min_ms"], res["fwd_bwd_cpu_ms"] = timed(fwd_bwd, reps, warmup)
        if not adamw:
            return res
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def step():
            loss = ((unet(x, t, encoder_hidden_states=ehs).sample - target) ** 2).mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        print(f"== {name}: forward + backward + AdamW", file=sys.stderr)
        res["fwd_bwd_adamw_ms"], res["fwd_bwd_adamw_min_ms"], res["fwd_bwd_adamw_cpu_ms"] = timed(step, reps, warmup)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5, help="timed calls for the tiny UNet")
    ap.add_argument("--sd15-reps", type=int, default=2)
    ap.add_argument("--no-sd15", action="store_true")
    ap.add_argument("--sd15-backward", action="store_true", help="also forward + backward (no AdamW)")
    ap.add_argument("--sd15-warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(REPO, "target", "bench", "diffusers_unet.json"))
    args = ap.parse_args()
    for k, v in {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__}.items():
        if v != PINNED[k]:
            print(f"warning: {k} {v} != pinned {PINNED[k]}", file=sys.stderr)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    results = {"torch": torch.__version__, "diffusers": diffusers.__version__, "threads": args.threads}
    results["tiny"] = bench("tiny", CONFIGS["tiny"], args.reps, backward=True, adamw=True)
    results["prior"] = bench("prior", CONFIGS["prior"], args.reps, backward=True, adamw=True)
    if not args.no_sd15:
        results["sd15"] = bench(
            "sd15", CONFIGS["sd15"], args.sd15_reps, backward=args.sd15_backward, adamw=False, warmup=args.sd15_warmup
        )

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1)
    os.replace(tmp, args.out)

    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {args.threads} threads, f32 CPU")
    print("median ms (process CPU ms) | params | batch | fwd | fwd+bwd | fwd+bwd+AdamW")
    print("---|---|---|---|---|---")
    for name in ["tiny", "prior", "sd15"]:
        r = results.get(name)
        if r is None:
            continue
        f = lambda k: f"{r[k + '_ms']:.1f} ({r[k + '_cpu_ms']:.0f})" if k + "_ms" in r else "-"  # noqa: E731
        print(f"{name} | {r['params']} | {r['batch']} | {f('fwd')} | {f('fwd_bwd')} | {f('fwd_bwd_adamw')}")
    print(f"(written to {args.out})")


if __name__ == "__main__":
    main()
