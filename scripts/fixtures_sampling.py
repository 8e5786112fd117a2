#!/usr/bin/env python3
"""End-to-end sampling parity fixtures for tests/tests/parity_sampling.rs.

Pinned reference: diffusers 0.42.1, transformers 5.24.0, torch 2.9.1 (CPU), safetensors 0.8.0,
numpy 2.4.6, Pillow 13.0.0 (scripts/requirements-fixtures.txt). Run from the repository root:
    /work/venv/bin/python scripts/fixtures_sampling.py
Writes tests/fixtures/sampling/{cases.json,tensors.safetensors,init-32.png,init-64.png}.

For each case it runs a whole text-to-image or image-to-image sampling on a pipeline folder of
this repository (tests/fixtures/tiny-sd, weights/tiny-shapes), loaded with
`StableDiffusionPipeline.from_pretrained`, and records the initial latents, every noise tensor
the run drew, the latents after each step, the final latents and the decoded image:

* CFG cases: `StableDiffusionPipeline.__call__` (or `StableDiffusionImg2ImgPipeline.__call__`
  built from the same components) itself, with `latents=` the recorded initial noise
  (text-to-image; the pipeline multiplies it by `init_noise_sigma`), `output_type="latent"`,
  the scheduler replaced by `<Class>.from_config(pipe.scheduler.config)` (DDIM with eta 0,
  EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler = DPM++ 2M).
* APG cases: `StableDiffusionPipeline.__call__` has no guider argument, so `guided_loop` below
  runs its denoising loop with the pipeline's own components, mirroring `__call__` line by line
  (`encode_prompt`, `set_timesteps`, `latents * init_noise_sigma`, `torch.cat([latents] * 2)`,
  `scheduler.scale_model_input`, `unet(x, t, encoder_hidden_states=[uncond; cond])`,
  `chunk(2)`, `scheduler.step(pred, t, latents, **prepare_extra_step_kwargs(None, 0.0))`), with
  the guidance done by `diffusers.guiders.AdaptiveProjectedGuidance` driven as its modular
  pipelines drive it (`set_state(step, num_steps, timestep)`, `prepare_inputs({})`,
  `forward(pred_cond, pred_uncond).pred`). The script checks this loop against the pipeline:
  with `ClassifierFreeGuidance` it must give `StableDiffusionPipeline.__call__`'s latents.

Noise: nothing is drawn from a generator during a run. The initial latents (and the img2img
noise) and the step noise of Euler ancestral are drawn beforehand from a seeded
`torch.Generator` and handed out in order by a replacement of `randn_tensor` in the modules
that call it (`scheduling_euler_ancestral_discrete.randn_tensor` for the step noise,
`pipeline_stable_diffusion_img2img.randn_tensor` for the img2img start noise); the replacement
checks the shape, and the script checks that every recorded tensor was used. The tensors are
saved, so the Rust test does not depend on torch's random generator.

Image-to-image: the init image is a PNG saved next to the fixtures and given to the pipeline as
a PIL image (the pipeline's VaeImageProcessor maps it to [-1, 1]). diffusers samples the VAE's
latent distribution there (`retrieve_latents(..., generator)`); gen uses its mean (deterministic,
documented in gen-models' `SdPipeline::encode_latents`), so `retrieve_latents` is replaced by
`latent_dist.mode()` for the fixture.

Decoded image: `vae.decode(latents / scaling_factor)` on the final latents, as `__call__` does
before post-processing, stored unclamped in [-1, 1].
"""
import json
import os
import sys

import numpy as np
import torch
import diffusers
import transformers
import safetensors
from PIL import Image
from safetensors.torch import save_file
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance
import diffusers.schedulers.scheduling_euler_ancestral_discrete as euler_a_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as img2img_module

diffusers.logging.set_verbosity_error()
transformers.logging.set_verbosity_error()
assert diffusers.__version__ == "0.42.1", diffusers.__version__
assert transformers.__version__ == "5.24.0", transformers.__version__
assert torch.__version__.startswith("2.9.1"), torch.__version__

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "tests", "fixtures", "sampling")

# gen image's sampler names -> diffusers scheduler classes
SCHEDULERS = {"ddim": DDIMScheduler, "euler-a": EulerAncestralDiscreteScheduler, "dpm++2m": DPMSolverMultistepScheduler}

TINY_SD = "tests/fixtures/tiny-sd"
SHAPES = "weights/tiny-shapes"

# name, pipeline folder, size (px), sampler, steps, guidance, prompts, negative prompt, img2img strength
APG_SD = dict(method="apg", scale=6.0, eta=0.0, momentum=-0.5, norm_threshold=2.5)
APG_SHAPES = dict(method="apg", scale=5.0, eta=0.5, momentum=-0.5, norm_threshold=3.0)
CASES = [
    ("tiny_sd_ddim_cfg", TINY_SD, 32, "ddim", 5, dict(method="cfg", scale=7.5), ["a photo of a cat"], "", None),
    ("tiny_sd_euler_a_cfg", TINY_SD, 32, "euler-a", 5, dict(method="cfg", scale=5.0), ["a photo of a cat"], "", None),
    ("tiny_sd_dpmpp2m_cfg_batch2", TINY_SD, 32, "dpm++2m", 6, dict(method="cfg", scale=7.5), ["a photo of a cat", "a red dog"], "blurry", None),
    ("tiny_sd_dpmpp2m_apg", TINY_SD, 32, "dpm++2m", 5, APG_SD, ["a photo of a cat"], "", None),
    ("tiny_sd_img2img_ddim", TINY_SD, 32, "ddim", 5, dict(method="cfg", scale=7.5), ["a photo of a cat"], "", 0.6),
    ("tiny_shapes_ddim_cfg", SHAPES, 64, "ddim", 5, dict(method="cfg", scale=7.5), ["a red cube, front view"], "", None),
    ("tiny_shapes_euler_a_cfg", SHAPES, 64, "euler-a", 5, dict(method="cfg", scale=7.5), ["a blue sphere, side view"], "", None),
    ("tiny_shapes_dpmpp2m_cfg", SHAPES, 64, "dpm++2m", 6, dict(method="cfg", scale=7.5), ["a yellow torus on a grey background"], "a red cube", None),
    ("tiny_shapes_euler_a_apg", SHAPES, 64, "euler-a", 5, APG_SHAPES, ["a red cube, front view"], "", None),
    ("tiny_shapes_img2img_euler_a", SHAPES, 64, "euler-a", 6, dict(method="cfg", scale=7.5), ["a blue sphere, side view"], "", 0.7),
]


class Recorded:
    """Hands out pre-drawn noise tensors in order, in place of diffusers' `randn_tensor`."""

    def __init__(self, tensors):
        self.tensors = list(tensors)
        self.used = 0

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        assert self.used < len(self.tensors), f"draw {self.used} of shape {tuple(shape)}: no recorded noise left"
        t = self.tensors[self.used]
        assert tuple(t.shape) == tuple(shape), f"draw {self.used}: recorded {tuple(t.shape)} for {tuple(shape)}"
        self.used += 1
        return t.clone().to(dtype=dtype or t.dtype)


def init_image(size):
    """A deterministic RGB test picture: a grey background, a red square and a blue disc."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    img = np.zeros((size, size, 3), np.float32)
    img[...] = 0.45 + 0.1 * x[..., None]
    sq = (x > 0.15) & (x < 0.5) & (y > 0.2) & (y < 0.55)
    img[sq] = [0.85, 0.1, 0.1]
    disc = (x - 0.68) ** 2 + (y - 0.65) ** 2 < 0.04
    img[disc] = [0.1, 0.2, 0.9]
    return Image.fromarray((img * 255).round().clip(0, 255).astype(np.uint8), "RGB")


def guided_loop(pipe, guider, prompts, negative, latents0, n):
    """`StableDiffusionPipeline.__call__`'s text-to-image denoising loop with a diffusers guider."""
    dev = pipe._execution_device
    cond, uncond = pipe.encode_prompt(prompts, dev, 1, True, [negative] * len(prompts))
    embeds = torch.cat([uncond, cond])
    sched = pipe.scheduler
    sched.set_timesteps(n, device=dev)
    latents = latents0 * sched.init_noise_sigma
    extra = pipe.prepare_extra_step_kwargs(None, 0.0)
    steps, clipped = [], []
    for i, t in enumerate(sched.timesteps):
        guider.set_state(step=i, num_inference_steps=n, timestep=t)
        guider.prepare_inputs({})
        x_in = sched.scale_model_input(torch.cat([latents] * 2), t)
        pred = pipe.unet(x_in, t, encoder_hidden_states=embeds, return_dict=False)[0]
        pred_uncond, pred_cond = pred.chunk(2)
        pred = guider.forward(pred_cond, pred_uncond).pred
        mb = getattr(guider, "momentum_buffer", None)
        if mb is not None:
            norms = mb.running_average.flatten(1).norm(dim=1)
            clipped.append([round(float(v), 3) for v in norms])
        latents = sched.step(pred, t, latents, **extra, return_dict=False)[0]
        steps.append(latents.clone())
    return latents, steps, clipped


def run_case(idx, name, folder, size, sampler, n, guidance, prompts, negative, strength, pipes, tensors):
    if folder not in pipes:
        pipes[folder] = StableDiffusionPipeline.from_pretrained(
            os.path.join(ROOT, folder), dtype=torch.float32, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    base = pipes[folder]
    base.set_progress_bar_config(disable=True)
    sched = SCHEDULERS[sampler].from_config(base.scheduler.config)
    b = len(prompts)
    f = 2 ** (len(base.vae.config.block_out_channels) - 1)
    shape = (b, base.unet.config.in_channels, size // f, size // f)
    g = torch.Generator().manual_seed(2026 + idx)
    latents0 = torch.randn(shape, generator=g)
    run_steps = n if strength is None else min(int(n * strength), n)  # img2img's get_timesteps
    step_noise = [torch.randn(shape, generator=g) for _ in range(run_steps)] if sampler == "euler-a" else []
    rec = Recorded(([latents0] if strength is not None else []) + step_noise)
    euler_a_module.randn_tensor = rec
    img2img_module.randn_tensor = rec
    img2img_module.retrieve_latents = lambda enc, generator=None, sample_mode="sample": enc.latent_dist.mode()

    steps = []

    def on_step(p, i, t, kw):
        steps.append(kw["latents"].clone())
        return {}

    common = dict(num_inference_steps=n, output_type="latent", callback_on_step_end=on_step, callback_on_step_end_tensor_inputs=["latents"])
    neg = [negative] * b
    record = {"name": name, "pipeline": folder, "width": size, "height": size, "sampler": sampler, "diffusers_scheduler": type(sched).__name__,
              "steps": n, "guidance": guidance, "prompts": prompts, "negative_prompt": negative, "strength": strength, "batch": b}
    if strength is not None:
        pipe = StableDiffusionImg2ImgPipeline(**base.components)
        pipe.scheduler = sched
        pipe.set_progress_bar_config(disable=True)
        img = init_image(size)
        img_name = f"init-{size}.png"
        img.save(os.path.join(OUT, img_name + ".tmp"), format="PNG")
        os.replace(os.path.join(OUT, img_name + ".tmp"), os.path.join(OUT, img_name))
        record["init_image"] = img_name
        assert guidance["method"] == "cfg"
        final = pipe(prompts, image=img, strength=strength, guidance_scale=guidance["scale"], negative_prompt=neg, **common).images
        record["runner"] = "StableDiffusionImg2ImgPipeline.__call__"
    elif guidance["method"] == "cfg":
        pipe = StableDiffusionPipeline(**base.components)
        pipe.scheduler = sched
        pipe.set_progress_bar_config(disable=True)
        final = pipe(prompts, height=size, width=size, guidance_scale=guidance["scale"], negative_prompt=neg, latents=latents0, **common).images
        record["runner"] = "StableDiffusionPipeline.__call__"
        # Check guided_loop against the pipeline (same components, CFG guider).
        if sampler != "euler-a":
            check = StableDiffusionPipeline(**base.components)
            check.scheduler = SCHEDULERS[sampler].from_config(base.scheduler.config)
            mine, _, _ = guided_loop(check, ClassifierFreeGuidance(guidance_scale=guidance["scale"]), prompts, negative, latents0, n)
            d = (mine - final).abs().max().item()
            assert d <= 1e-6 * final.abs().max().item(), f"{name}: guided_loop differs from __call__ by {d}"
            record["guided_loop_check_max_abs_diff"] = d
    else:
        pipe = StableDiffusionPipeline(**base.components)
        pipe.scheduler = sched
        guider = AdaptiveProjectedGuidance(
            guidance_scale=guidance["scale"], adaptive_projected_guidance_momentum=guidance["momentum"],
            adaptive_projected_guidance_rescale=guidance["norm_threshold"], eta=guidance["eta"],
        )
        final, steps, clipped = guided_loop(pipe, guider, prompts, negative, latents0, n)
        record["runner"] = "guided_loop with AdaptiveProjectedGuidance"
        r = guidance["norm_threshold"]
        record["apg_update_norms"] = clipped
        acted = [v > r for c in clipped for v in c]
        assert any(acted) and not all(acted), f"{name}: pick a norm threshold that acts at some steps only (norms {clipped}, r {r})"
    assert rec.used == len(rec.tensors), f"{name}: {len(rec.tensors) - rec.used} recorded noise tensors unused"
    decoded = base.vae.decode(final / base.vae.config.scaling_factor, return_dict=False)[0]
    record["timesteps"] = [float(t) for t in sched.timesteps[-len(steps):]]
    record["num_step_noise"] = len(step_noise)
    tensors[f"{name}.noise0"] = latents0
    for k, t in enumerate(step_noise):
        tensors[f"{name}.step_noise.{k}"] = t
    for k, t in enumerate(steps):
        tensors[f"{name}.latents.{k}"] = t
    tensors[f"{name}.final"] = final
    tensors[f"{name}.decoded"] = decoded
    print(f"{name}: {len(steps)} steps, timesteps {record['timesteps']}, |final| max {final.abs().max().item():.3f}")
    return record


def main():
    torch.set_grad_enabled(False)
    os.makedirs(OUT, exist_ok=True)
    pipes, tensors = {}, {}
    cases = [run_case(i, *c, pipes, tensors) for i, c in enumerate(CASES)]
    tensors = {k: v.detach().to(torch.float32).contiguous() for k, v in tensors.items()}
    path = os.path.join(OUT, "tensors.safetensors")
    save_file(tensors, path + ".tmp")
    os.replace(path + ".tmp", path)
    doc = {
        "generator": "scripts/fixtures_sampling.py",
        "versions": {"diffusers": diffusers.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
                     "safetensors": safetensors.__version__, "numpy": np.__version__},
        "cases": cases,
    }
    jpath = os.path.join(OUT, "cases.json")
    with open(jpath + ".tmp", "w") as fh:
        json.dump(doc, fh, indent=1)
    os.replace(jpath + ".tmp", jpath)
    total = sum(os.path.getsize(os.path.join(OUT, f)) for f in os.listdir(OUT))
    print(f"wrote {OUT}: {len(cases)} cases, {total} bytes")


if __name__ == "__main__":
    sys.exit(main())
