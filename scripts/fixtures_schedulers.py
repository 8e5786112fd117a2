#!/usr/bin/env python3
"""Scheduler parity fixtures for crates/gen-diffusion (tests/schedulers_parity.rs).

Pinned reference: diffusers 0.42.1, torch 2.9.1 (CPU). Run with the project venv:
    /work/venv/bin/python scripts/fixtures_schedulers.py
Writes crates/gen-diffusion/tests/fixtures/schedulers.json.

For each case it builds a diffusers scheduler from a config dict (diffusers field names), sets
the timesteps, and runs a whole trajectory with fixed pseudo-random model outputs, recording the
timesteps, sigmas, alphas_cumprod, the initial sample, every model input / model output / noise
and every step's prev_sample and pred_original_sample. Stochastic steps get their noise through
an explicit argument (DDIM `variance_noise`) or a freshly seeded torch.Generator whose first draw
is recorded (DDPM, Euler ancestral: diffusers draws `torch.randn(shape, generator=g)`).
"""
import json
import os
import sys

import numpy as np
import torch
import diffusers
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert torch.__version__.startswith("2.9.1"), torch.__version__

SHAPE = (2, 2, 4, 4)
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

CLASSES = {
    "DDIMScheduler": DDIMScheduler,
    "DDPMScheduler": DDPMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
}

# (name, class, config, num_inference_steps, eta (DDIM only), strength or None)
CASES = [
    ("ddim_sd_leading_eps", "DDIMScheduler", dict(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False), 10, 0.0, None),
    ("ddim_linear_trailing_v_eta", "DDIMScheduler", dict(beta_schedule="linear", timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=True), 8, 0.7, None),
    ("ddim_cosine_linspace_sample", "DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", prediction_type="sample", clip_sample=True, clip_sample_range=1.5), 7, 0.0, None),
    ("ddim_zero_snr_trailing_v", "DDIMScheduler", dict(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction", clip_sample=False), 6, 0.0, None),
    ("ddim_sd_img2img", "DDIMScheduler", dict(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False), 10, 0.0, 0.6),
    ("ddpm_linear_leading_eps_small", "DDPMScheduler", dict(beta_schedule="linear", clip_sample=True), 10, 0.0, None),
    ("ddpm_sd_trailing_v_large", "DDPMScheduler", dict(**SD, timestep_spacing="trailing", prediction_type="v_prediction", variance_type="fixed_large", clip_sample=False), 6, 0.0, None),
    ("ddpm_cosine_linspace_sample_smalllog", "DDPMScheduler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", prediction_type="sample", variance_type="fixed_small_log", clip_sample=True), 5, 0.0, None),
    ("euler_sd_linspace_eps", "EulerDiscreteScheduler", dict(**SD), 10, 0.0, None),
    ("euler_sd_karras_leading_v", "EulerDiscreteScheduler", dict(**SD, use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 12, 0.0, None),
    ("euler_linear_trailing_sigmamin", "EulerDiscreteScheduler", dict(beta_schedule="linear", timestep_spacing="trailing", final_sigmas_type="sigma_min"), 9, 0.0, None),
    ("euler_sd_img2img", "EulerDiscreteScheduler", dict(**SD), 10, 0.0, 0.5),
    ("euler_a_sd_linspace_eps", "EulerAncestralDiscreteScheduler", dict(**SD), 10, 0.0, None),
    ("euler_a_sd_leading_v", "EulerAncestralDiscreteScheduler", dict(**SD, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 8, 0.0, None),
    ("dpm2m_sd_linspace_eps", "DPMSolverMultistepScheduler", dict(**SD), 10, 0.0, None),
    ("dpm2m_sd_karras_eps_20", "DPMSolverMultistepScheduler", dict(**SD, use_karras_sigmas=True), 20, 0.0, None),
    ("dpm2m_sd_trailing_v_sigmamin", "DPMSolverMultistepScheduler", dict(**SD, timestep_spacing="trailing", prediction_type="v_prediction", final_sigmas_type="sigma_min", lower_order_final=False), 16, 0.0, None),
    ("dpm2m_cosine_heun_sample", "DPMSolverMultistepScheduler", dict(beta_schedule="squaredcos_cap_v2", solver_type="heun", prediction_type="sample"), 12, 0.0, None),
    ("dpm2m_linear_leading_eps_order1", "DPMSolverMultistepScheduler", dict(beta_schedule="linear", timestep_spacing="leading", steps_offset=1, solver_order=1), 6, 0.0, None),
    ("euler_zero_snr_trailing_v", "EulerDiscreteScheduler", dict(**SD, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction"), 7, 0.0, None),
    ("dpm2m_cosine_lambda_clipped_linspace", "DPMSolverMultistepScheduler", dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1), 9, 0.0, None),
    ("dpm2m_sd_img2img", "DPMSolverMultistepScheduler", dict(**SD, use_karras_sigmas=True), 12, 0.0, 0.75),
]


def flat(t):
    return [float("%.9g" % v) for v in t.detach().to(torch.float64).flatten().tolist()]


def tensor(t):
    return {"shape": list(t.shape), "data": flat(t)}


def run_case(idx, name, cls_name, cfg, n, eta, strength):
    cls = CLASSES[cls_name]
    sched = cls(**cfg)
    sched.set_timesteps(n)
    all_ts = sched.timesteps.clone()
    t_start = 0
    if strength is not None:
        # diffusers img2img get_timesteps
        init_timestep = min(int(n * strength), n)
        t_start = max(n - init_timestep, 0)
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(t_start * sched.order)
    timesteps = all_ts[t_start * sched.order:]

    g = torch.Generator().manual_seed(1234 + idx)
    x0_img = torch.randn(SHAPE, generator=g)
    noise0 = torch.randn(SHAPE, generator=g)
    if strength is not None:
        start = sched.add_noise(x0_img, noise0, timesteps[:1].repeat(SHAPE[0]))
    else:
        start = noise0 * sched.init_noise_sigma
    # add_noise on a fresh scheduler at two inference timesteps (per sample)
    probe = cls(**cfg)
    probe.set_timesteps(n)
    add_ts = torch.stack([probe.timesteps[1], probe.timesteps[len(probe.timesteps) // 2]])
    noisy = probe.add_noise(x0_img, noise0, add_ts)

    steps = []
    x = start
    for k, t in enumerate(timesteps):
        x_in = sched.scale_model_input(x, t)
        mo = torch.randn(SHAPE, generator=g)
        noise = None
        if cls_name == "DDIMScheduler":
            if eta > 0:
                noise = torch.randn(SHAPE, generator=g)
                out = sched.step(mo, t, x, eta=eta, variance_noise=noise)
            else:
                out = sched.step(mo, t, x, eta=0.0)
        elif cls_name in ("DDPMScheduler", "EulerAncestralDiscreteScheduler"):
            seed = 10_000 * (idx + 1) + k
            noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
            if cls_name == "DDPMScheduler" and int(t) == 0:
                noise = None  # diffusers' DDPM draws no noise at t = 0
            out = sched.step(mo, t, x, generator=torch.Generator().manual_seed(seed))
        else:
            out = sched.step(mo, t, x)
        rec = {
            "timestep": float(t),
            "model_input": flat(x_in),
            "model_output": flat(mo),
            "noise": flat(noise) if noise is not None else None,
            "prev_sample": flat(out.prev_sample),
        }
        po = getattr(out, "pred_original_sample", None)
        rec["pred_original_sample"] = flat(po) if po is not None else None
        steps.append(rec)
        x = out.prev_sample

    sigmas = getattr(sched, "sigmas", None)
    return {
        "name": name,
        "config": {"_class_name": cls_name, **cfg},
        "num_inference_steps": n,
        "eta": eta,
        "strength": strength,
        "shape": list(SHAPE),
        "timesteps": [float(t) for t in timesteps],
        "all_timesteps": [float(t) for t in all_ts],
        "sigmas": flat(sigmas) if (sigmas is not None and cls_name not in ("DDIMScheduler", "DDPMScheduler")) else None,
        "alphas_cumprod": flat(sched.alphas_cumprod),
        "init_noise_sigma": float(sched.init_noise_sigma),
        "x0": flat(x0_img),
        "noise0": flat(noise0),
        "start": flat(start),
        "add_noise_timesteps": [float(t) for t in add_ts],
        "add_noise": flat(noisy),
        "steps": steps,
    }


def main():
    out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "crates", "gen-diffusion", "tests", "fixtures")
    os.makedirs(out_dir, exist_ok=True)
    torch.set_grad_enabled(False)
    cases = [run_case(i, *c) for i, c in enumerate(CASES)]
    doc = {
        "generator": "scripts/fixtures_schedulers.py",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "cases": cases,
    }
    path = os.path.join(out_dir, "schedulers.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
    os.replace(tmp, path)
    print(f"wrote {path} ({os.path.getsize(path)} bytes, {len(cases)} cases)")


if __name__ == "__main__":
    sys.exit(main())
