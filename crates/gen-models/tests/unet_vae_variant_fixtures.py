#!/usr/bin/env python3
"""Reference outputs of diffusers for config variants that the tiny-sd fixture does not cover.

Run (CPU, a few seconds, deterministic) from the repository root:

    /work/venv/bin/python crates/gen-models/tests/unet_vae_variant_fixtures.py

Pinned environment: scripts/requirements-fixtures.txt (torch==2.9.1, diffusers==0.42.1).
Writes crates/gen-models/tests/unet_vae_variant_fixtures/{unet,vae}/ (diffusers save_pretrained:
config.json + diffusion_pytorch_model.safetensors, f32) and io_{unet,vae}.safetensors. References
are computed in float64 from the stored f32 weights and stored as float32.

UNet variant: linear projections, transformer_layers_per_block [2, 1], only_cross_attention
[True, False], per-block heads [2, 4], upcast_attention, flip_sin_to_cos False, freq_shift 1,
center_input_sample, layers_per_block 2.
  io_unet: sample [2,4,8,8], timesteps [2] = [37, 801], encoder_hidden_states [2,3,8], out [2,4,8,8]
VAE variant: three blocks [8, 8, 16], layers_per_block 2, no quant_conv / post_quant_conv, gelu.
  io_vae: image [2,3,16,16], posterior_mean/logvar [2,4,4,4], latent [2,4,4,4], decoded [2,3,16,16]
"""

import os

import torch
from safetensors.torch import save_file

import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel

assert torch.__version__.startswith("2.9.1"), torch.__version__
assert diffusers.__version__ == "0.42.1", diffusers.__version__

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "unet_vae_variant_fixtures")


def perturb(model, g):
    """Random weights: norm weights near 1, biases small, other weights ~ N(0, 1/fan_in)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            n = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if name.endswith("bias"):
                p.copy_(0.1 * n)
            elif "norm" in name:
                p.copy_(1.0 + 0.1 * n)
            else:
                p.copy_(n / (p[0].numel() ** 0.5))


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def main():
    g = torch.Generator().manual_seed(4321)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2, cross_attention_dim=8, attention_head_dim=[2, 4], norm_num_groups=4,
        use_linear_projection=True, transformer_layers_per_block=[2, 1], only_cross_attention=[True, False],
        upcast_attention=True, flip_sin_to_cos=False, freq_shift=1, center_input_sample=True,
    )
    perturb(unet, g)
    unet.save_pretrained(os.path.join(OUT, "unet"))
    sample = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([37.0, 801.0], dtype=torch.float64)
    ehs = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = unet.double().eval()(sample, t, encoder_hidden_states=ehs).sample
    save_file({"sample": f32(sample), "timesteps": f32(t), "encoder_hidden_states": f32(ehs), "out": f32(out)},
              os.path.join(OUT, "io_unet.safetensors"))

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 16), layers_per_block=2,
        latent_channels=4, norm_num_groups=4, sample_size=16, act_fn="gelu",
        use_quant_conv=False, use_post_quant_conv=False,
    )
    perturb(vae, g)
    vae.save_pretrained(os.path.join(OUT, "vae"))
    image = torch.rand(2, 3, 16, 16, generator=g, dtype=torch.float64) * 2 - 1
    latent = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
    vae = vae.double().eval()
    with torch.no_grad():
        post = vae.encode(image).latent_dist
        decoded = vae.decode(latent).sample
    save_file({"image": f32(image), "posterior_mean": f32(post.mean), "posterior_logvar": f32(post.logvar),
               "latent": f32(latent), "decoded": f32(decoded)}, os.path.join(OUT, "io_vae.safetensors"))


if __name__ == "__main__":
    main()
