#!/usr/bin/env python3
"""Parameter names and shapes of diffusers' UNet and VAE for the real Stable Diffusion 1.5 and
2.1 configs (built on the meta device: no weights, no download), so the Rust models' structure
can be checked at full size without the multi-GB checkpoints.

Run from the repository root (CPU, seconds, deterministic):

    /work/venv/bin/python crates/gen-models/tests/unet_vae_sd_shapes.py

Pinned environment: scripts/requirements-fixtures.txt (torch==2.9.1, diffusers==0.42.1).
Writes crates/gen-models/tests/unet_vae_variant_fixtures/sd_shapes.json:
    {name: {"class": "unet"|"vae", "config": <config.json as diffusers saves it>,
            "params": {key: [shape...]}}}
The configs are those of the published runwayml/stable-diffusion-v1-5 and
stabilityai/stable-diffusion-2-1 unet/ and vae/ folders.
"""

import json
import os

import torch

import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel

assert torch.__version__.startswith("2.9.1"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unet_vae_variant_fixtures", "sd_shapes.json")

SD15_UNET = dict(
    act_fn="silu", attention_head_dim=8, block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    downsample_padding=1, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
    mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, out_channels=4, sample_size=64,
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
)
SD21_UNET = dict(SD15_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024, sample_size=96,
                 use_linear_projection=True, dual_cross_attention=False, num_class_embeds=None,
                 upcast_attention=True, only_cross_attention=False)
SD_VAE = dict(
    act_fn="silu", block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3, sample_size=512,
)


def describe(cls, cfg, kind):
    with torch.device("meta"):
        model = cls(**cfg)
    config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    params = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"class": kind, "config": json.loads(json.dumps(config)), "params": params}


def main():
    out = {
        "sd15_unet": describe(UNet2DConditionModel, SD15_UNET, "unet"),
        "sd21_unet": describe(UNet2DConditionModel, SD21_UNET, "unet"),
        "sd_vae": describe(AutoencoderKL, SD_VAE, "vae"),
    }
    with open(OUT, "w") as f:
        json.dump(out, f, indent=0, sort_keys=True)
        f.write("\n")
    for k, v in out.items():
        n = sum(int(torch.tensor(s).prod()) if s else 1 for s in v["params"].values())
        print(k, len(v["params"]), "tensors", n, "parameters")


if __name__ == "__main__":
    main()
