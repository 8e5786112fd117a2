#!/usr/bin/env python3
"""Checks that diffusers itself loads a gen model folder (the shipped weights/tiny-shapes) and
samples from it.

Every component is loaded with `output_loading_info=True` and must report no missing,
unexpected or mismatched keys and no errors; then `DiffusionPipeline.from_pretrained` builds the
whole pipeline and samples one image per prompt (30 steps, CFG 7.5, 64×64, seed 0).

Run (venv with scripts/requirements-fixtures.txt; CPU):
    /work/venv/bin/python scripts/check_diffusers_load.py weights/tiny-shapes target/diffusers-check
Writes OUT/<n>.png and OUT/report.json; exits non-zero on any problem.
"""
import json
import os
import sys

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel
from transformers import CLIPModel, CLIPTextModel

PINNED = {"torch": "2.9.1", "diffusers": "0.42.1", "transformers": "5.24.0"}
PROMPTS = ["a red cube, front view", "a blue sphere, side view", "a yellow torus on a grey background"]


def check(name, cls, path):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    bad = {k: v for k, v in info.items() if v}
    print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters; loading info {'clean' if not bad else bad}")
    return bad


def main():
    folder, out = sys.argv[1], sys.argv[2]
    versions = {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    for k, v in versions.items():
        if v != PINNED[k]:
            print(f"warning: {k} {v} != pinned {PINNED[k]}", file=sys.stderr)
    problems = {}
    for name, cls, sub in [("unet", UNet2DConditionModel, "unet"), ("vae", AutoencoderKL, "vae"), ("text_encoder", CLIPTextModel, "text_encoder"), ("clip", CLIPModel, "clip")]:
        p = os.path.join(folder, sub)
        if not os.path.isdir(p):
            if name == "clip":
                continue
            problems[name] = "folder missing"
            continue
        bad = check(name, cls, p)
        if bad:
            problems[name] = bad
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None, feature_extractor=None)
    print(f"pipeline: {type(pipe).__name__}, scheduler {type(pipe.scheduler).__name__}")
    os.makedirs(out, exist_ok=True)
    size = pipe.unet.config.sample_size * (2 ** (len(pipe.vae.config.block_out_channels) - 1))
    files = []
    for i, prompt in enumerate(PROMPTS):
        g = torch.Generator().manual_seed(0)
        img = pipe(prompt, num_inference_steps=30, guidance_scale=7.5, height=size, width=size, generator=g).images[0]
        f = os.path.join(out, f"{i}.png")
        img.save(f)
        files.append(f)
        print(f"sampled {prompt!r} -> {f} ({img.size[0]}x{img.size[1]})")
    report = {"folder": folder, "versions": versions, "pipeline": type(pipe).__name__, "problems": problems, "images": files, "prompts": PROMPTS}
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=1)
    if problems:
        print(f"FAILED: {problems}", file=sys.stderr)
        sys.exit(1)
    print("ok: diffusers loads every component with no missing/unexpected keys and samples")


if __name__ == "__main__":
    main()
