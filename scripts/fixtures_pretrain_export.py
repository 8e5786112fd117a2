"""Reference outputs of an exported gen-pretrain model folder, computed by diffusers/transformers.

Usage (venv: torch 2.9.1, diffusers 0.42.1, transformers; see requirements-fixtures.txt):
    python scripts/fixtures_pretrain_export.py pipelines/gen-pretrain/tests/fixtures/tiny-export \
        pipelines/gen-pretrain/tests/fixtures/tiny-export-expected.safetensors

The folder is the f16 export of a tiny-preset run (`pretrain export --dtype f16`, evaluator/
removed). The Rust test `tests/export_parity.rs` loads it with gen-models and compares.
"""
import sys

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.numpy import save_file
from transformers import CLIPModel, CLIPTextModel, PreTrainedTokenizerFast

folder, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
f32 = torch.float32
tok = PreTrainedTokenizerFast.from_pretrained(folder + "/tokenizer")
te = CLIPTextModel.from_pretrained(folder + "/text_encoder", torch_dtype=f32).eval()
unet = UNet2DConditionModel.from_pretrained(folder + "/unet", torch_dtype=f32).eval()
vae = AutoencoderKL.from_pretrained(folder + "/vae", torch_dtype=f32).eval()
clip = CLIPModel.from_pretrained(folder + "/clip", torch_dtype=f32).eval()
# the whole folder loads as a diffusers pipeline
pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, torch_dtype=f32)
assert isinstance(pipe.scheduler, DDIMScheduler)

prompts = ["a red cube", "A light blue torus on a grey background, side view", "", "a shiny cone"]
L = tok.model_max_length
ids = tok(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
s = unet.config.sample_size
size = clip.config.vision_config.image_size
x = torch.randn(2, 4, s, s)
t = torch.tensor([10.0, 700.0])
img = torch.rand(2, 3, vae.config.sample_size, vae.config.sample_size) * 2 - 1
pix = torch.rand(2, 3, size, size)
mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
with torch.no_grad():
    h = te(ids).last_hidden_state
    eps = unet(x, t, encoder_hidden_states=h[:2]).sample
    post = vae.encode(img).latent_dist
    dec = vae.decode(x).sample
    logits = clip(input_ids=ids, pixel_values=(pix - mean) / std).logits_per_image
arrays = {
    "ids": ids.numpy().astype(np.int64),
    "hidden": h.numpy(),
    "x": x.numpy(),
    "t": t.numpy(),
    "eps": eps.numpy(),
    "img": img.numpy(),
    "post_mean": post.mean.numpy(),
    "post_logvar": post.logvar.numpy(),
    "decoded": dec.numpy(),
    "pixels": pix.numpy(),
    "clip_logits": logits.numpy(),
}
# safetensors writes the raw buffer: make strided views (the posterior halves) contiguous
save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, out)
print("wrote", out, "prompts:", prompts)
