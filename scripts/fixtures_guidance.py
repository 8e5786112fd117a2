#!/usr/bin/env python3
"""Guidance parity fixtures for crates/gen-diffusion (tests/guidance_parity.rs).

Pinned reference: diffusers 0.42.1 (`diffusers.guiders.AdaptiveProjectedGuidance`,
`diffusers.guiders.ClassifierFreeGuidance`), torch 2.9.1 CPU. Run:
    /work/venv/bin/python scripts/fixtures_guidance.py
Writes crates/gen-diffusion/tests/fixtures/guidance.json.

Each case runs one guider over several steps of one trajectory (so APG's momentum state
matters) on seeded random conditional / unconditional predictions, driving the guider the way
diffusers' modular pipelines do: `set_state(step, num_steps, timestep)`, `prepare_inputs`
(creates the momentum buffer at step 0), `forward(pred_cond, pred_uncond)`.
"""
import json
import logging
import os
import sys

import torch
import diffusers
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance

assert diffusers.__version__ == "0.42.1", diffusers.__version__
logging.getLogger("diffusers").setLevel(logging.ERROR)

SHAPE = (2, 3, 6, 6)

CASES = [
    # name, guider class, kwargs, steps, scale of (c - u) per sample
    ("apg_momentum_rescale15", AdaptiveProjectedGuidance,
     dict(guidance_scale=7.5, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=15.0, eta=1.0), 6, [3.0, 0.5]),
    ("apg_eta0_original_momentum_pos", AdaptiveProjectedGuidance,
     dict(guidance_scale=4.0, adaptive_projected_guidance_momentum=0.3, adaptive_projected_guidance_rescale=0.0, eta=0.0, use_original_formulation=True), 5, [1.0, 2.0]),
    ("apg_eta05_guidance_rescale", AdaptiveProjectedGuidance,
     dict(guidance_scale=9.0, adaptive_projected_guidance_momentum=-0.75, adaptive_projected_guidance_rescale=2.5, eta=0.5, guidance_rescale=0.7), 5, [1.5, 0.2]),
    ("apg_interval_quarter", AdaptiveProjectedGuidance,
     dict(guidance_scale=6.0, adaptive_projected_guidance_momentum=-0.5, adaptive_projected_guidance_rescale=15.0, eta=0.0, start=0.25, stop=0.75), 8, [3.0, 1.0]),
    ("cfg_rescale07", ClassifierFreeGuidance,
     dict(guidance_scale=5.0, guidance_rescale=0.7), 3, [1.0, 0.3]),
]


def flat(t):
    return [float("%.9g" % v) for v in t.detach().to(torch.float64).flatten().tolist()]


def main():
    torch.set_grad_enabled(False)
    cases = []
    for idx, (name, cls, kw, n, diff_scale) in enumerate(CASES):
        g = torch.Generator().manual_seed(77 + idx)
        guider = cls(**kw)
        steps = []
        scale = torch.tensor(diff_scale).view(-1, 1, 1, 1)
        for k in range(n):
            t = torch.tensor(999 - k * (1000 // n))
            guider.set_state(step=k, num_inference_steps=n, timestep=t)
            guider.prepare_inputs({})
            c = torch.randn(SHAPE, generator=g)
            # correlated uncond so the projection is non-trivial
            u = c - scale * torch.randn(SHAPE, generator=g) - 0.3 * c * scale
            out = guider.forward(c, u).pred
            steps.append({"step": k, "timestep": float(t), "cond": flat(c), "uncond": flat(u), "out": flat(out)})
        cases.append({"name": name, "guider": cls.__name__, "kwargs": kw, "num_steps": n, "shape": list(SHAPE), "steps": steps})
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "gen-diffusion", "tests", "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "guidance.json")
    doc = {"generator": "scripts/fixtures_guidance.py", "diffusers": diffusers.__version__, "torch": torch.__version__, "cases": cases}
    with open(path + ".tmp", "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(path + ".tmp", path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    sys.exit(main())
