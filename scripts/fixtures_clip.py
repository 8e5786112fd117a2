#!/usr/bin/env python3
"""CLIP parity fixtures for crates/gen-models/tests/clip_parity.rs.

Tiny random transformers CLIPTextModelWithProjection (two variants: quick_gelu with the legacy
eos_token_id == 2 pooling; gelu with a real eos id) and CLIPVisionModelWithProjection, saved with
save_pretrained (config.json + model.safetensors, keys exactly as transformers writes them),
plus inputs and reference outputs (float64 forward) in outputs.safetensors.

Pinned environment: scripts/requirements-fixtures.txt (torch 2.9.1, transformers 5.24.0).
Run: /work/venv/bin/python scripts/fixtures_clip.py
"""
import os
import shutil

import torch
from safetensors.torch import save_file
from transformers import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModelWithProjection, CLIPVisionConfig,
                          CLIPVisionModelWithProjection)

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "gen-models", "tests", "fixtures", "clip")


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def save(model, sub, tensors):
    d = os.path.join(OUT, sub)
    shutil.rmtree(d, ignore_errors=True)
    model.to(torch.float32).save_pretrained(d, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(d, "outputs.safetensors"))


def text(sub, act, eos, seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=12, hidden_act=act, projection_dim=24,
                         bos_token_id=98 if eos != 2 else 0, eos_token_id=eos, pad_token_id=1)
    m = CLIPTextModelWithProjection(cfg).eval()
    randomize(m, gen)
    m = m.to(torch.float32)
    bos = cfg.bos_token_id
    # row 0: eos then padding with eos; row 1: eos then padding with id 0; row 2: full length
    ids = torch.tensor([
        [bos, 5, 17, 33, 8, eos, eos, eos, eos, eos],
        [bos, 41, 3, eos, 0, 0, 0, 0, 0, 0],
        [bos, 7, 7, 9, 10, 11, 12, 13, 14, eos],
    ], dtype=torch.int64)
    if eos == 2:
        # legacy pooling takes the argmax id: make the eos the largest id of each row
        ids = torch.tensor([
            [bos, 5, 17, 33, 8, 99, 1, 1, 1, 1],
            [bos, 41, 3, 99, 1, 1, 1, 1, 1, 1],
            [bos, 7, 7, 9, 10, 11, 12, 13, 14, 99],
        ], dtype=torch.int64)
    md = m.to(torch.float64)
    with torch.no_grad():
        o = md(input_ids=ids, output_hidden_states=True)
    tl = md.text_model.final_layer_norm
    save(m, sub, {
        "input_ids": ids,
        "last_hidden_state": o.last_hidden_state,
        "text_embeds": o.text_embeds,
        "penultimate": o.hidden_states[-2],
        "penultimate_ln": tl(o.hidden_states[-2]),
        "embeddings": o.hidden_states[0],
    })


def vision(sub, seed):
    gen = torch.Generator().manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=16, patch_size=4, projection_dim=20, hidden_act="quick_gelu")
    m = CLIPVisionModelWithProjection(cfg).eval()
    randomize(m, gen)
    pix = torch.randn((2, 3, 16, 16), generator=gen)
    md = m.to(torch.float64)
    with torch.no_grad():
        o = md(pixel_values=pix.to(torch.float64))
        pooled = md.vision_model(pixel_values=pix.to(torch.float64)).pooler_output
    save(m, sub, {"pixel_values": pix.to(torch.float64), "last_hidden_state": o.last_hidden_state,
                  "pooled": pooled, "image_embeds": o.image_embeds})


def full(sub, seed):
    gen = torch.Generator().manual_seed(seed)
    tc = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=12, bos_token_id=98, eos_token_id=99, pad_token_id=1, projection_dim=512)
    vc = dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4, image_size=16,
              patch_size=8, projection_dim=512)
    cfg = CLIPConfig(text_config=tc, vision_config=vc, projection_dim=16, logit_scale_init_value=1.5)
    m = CLIPModel(cfg).eval()
    randomize(m, gen)
    with torch.no_grad():
        m.logit_scale.fill_(1.5)
    ids = torch.tensor([[98, 5, 17, 99, 1, 1], [98, 41, 3, 8, 9, 99], [98, 99, 1, 1, 1, 1]], dtype=torch.int64)
    pix = torch.randn((2, 3, 16, 16), generator=gen, dtype=torch.float64)
    md = m.to(torch.float64)
    with torch.no_grad():
        o = md(input_ids=ids, pixel_values=pix)
    save(m, sub, {"input_ids": ids, "pixel_values": pix, "logits_per_image": o.logits_per_image,
                  "text_embeds": o.text_embeds, "image_embeds": o.image_embeds})


def main():
    torch.set_grad_enabled(False)
    text("text-quickgelu-eos2", "quick_gelu", 2, 1)
    text("text-gelu", "gelu", 99, 2)
    vision("vision", 3)
    full("clip-model", 4)


if __name__ == "__main__":
    main()
