#!/usr/bin/env python3
"""Record reference outputs of diffusers/transformers on the tiny SD fixture, for Rust parity tests.

Run (CPU only, a few seconds, deterministic), after scripts/make_tiny_sd.py:

    /work/venv/bin/python scripts/make_parity_fixtures.py     # writes tests/fixtures/parity/

Pinned environment: scripts/requirements-fixtures.txt
(torch==2.9.1, diffusers==0.42.1, transformers==5.24.0, tokenizers==0.23.3, safetensors==0.8.0).

References are computed in float64 (weights loaded from the f32 files, then upcast), stored as
float32, so a Rust f32 implementation is compared against a reference whose own rounding error is
negligible. Integer inputs are stored as int64.

Files (all tensors f32 unless noted):

  tokenizer_ids.json
      {"max_length": 77, "cases": [{"text": ..., "input_ids": [77 ids]}, ...]}  (padded with
      <|endoftext|>, truncated to 77, as StableDiffusionPipeline tokenizes prompts).
  text_encoder.safetensors        text_encoder/ (quick_gelu, eos_token_id 2 -> argmax pooling)
  text_encoder_gelu.safetensors   text_encoder-gelu/ (gelu, real eos id -> first-eos pooling)
      input_ids [3,77] i64        prompts PROMPTS (the 3rd is "" = the unconditional prompt)
      last_hidden_state [3,77,32] final_layer_norm(last layer)
      penultimate [3,77,32]       hidden_states[-2] (no final norm)
      penultimate_normed [3,77,32] final_layer_norm(hidden_states[-2]) (diffusers' clip_skip=1)
      pooled [3,32]               pooler_output
  unet.safetensors                unet/ (f32 weights)
  unet_fp16.safetensors           unet/ diffusion_pytorch_model.fp16.safetensors, upcast
  unet_sd2.safetensors            unet-sd2/ (linear projections, per-block head counts)
      sample [3,4,8,8], encoder_hidden_states [3,77,32] (= text_encoder last_hidden_state),
      timesteps_mixed [3] = [1, 500, 999] (also as i64: timesteps_mixed_i64), out_mixed [3,4,8,8],
      timesteps_uniform [3] = [10, 10, 10], out_uniform [3,4,8,8]
  scheduler_ddim.safetensors      DDIMScheduler from scheduler/ (SD 1.5 settings), 10 steps, eta 0
      alphas_cumprod [1000], timesteps [10] (i64), sample [3,4,8,8], model_output [3,4,8,8]
      (= unet out_uniform), and for pt in {epsilon, v_prediction}, t in STEP_TIMESTEPS:
      {pt}.t{t}.prev_sample, {pt}.t{t}.pred_original_sample
  vae.safetensors                 vae/
      image [2,3,32,32] in [-1, 1], posterior_mean [2,4,16,16], posterior_logvar [2,4,16,16]
      (diffusers clamps logvar to [-30, 20]), latent [2,4,8,8], decoded [2,3,16,16]
      (vae.decode(latent), no scaling_factor applied)
  grads_unet.safetensors, grads_vae.safetensors, grads_text_encoder.safetensors
      PyTorch autograd gradients of loss = sum(output * fixed random weights) with respect to the
      inputs and to the parameters (every parameter's gradient norm, a few full gradients); see
      write_gradient_fixtures.
"""

import argparse
import json
import os
import sys

import torch
from safetensors.torch import save_file

import diffusers
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

PINNED = {"torch": "2.9.1", "diffusers": "0.42.1", "transformers": "5.24.0"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "fixtures", "tiny-sd")
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "parity")
SEED = 1234

PROMPTS = ["a red cube, side view", "a photo of a blue sphere from the back", ""]
TOKENIZER_CASES = PROMPTS + [
    "A Shiny GREEN   torus,\toverhead view",
    "a zebra-striped cone!!",  # "zebra" is not in the vocabulary: byte-level pieces
    "two tone 42 cubes; front/back views",
    "the cube's shadow isn't dark",
    "ünïcödé cube ☃",
    " ".join(["red cube"] * 50),  # longer than 77 tokens: truncated, still ends with <|endoftext|>
]
STEP_TIMESTEPS = [901, 501, 1]


def check_versions():
    got = {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    for k, v in PINNED.items():
        if got[k] != v:
            sys.exit(f"{k} {got[k]} != pinned {v}; install scripts/requirements-fixtures.txt")


def f32(t):
    return t.detach().to(torch.float32).contiguous()


def save(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"generator": "scripts/make_parity_fixtures.py"})
    print(f"{os.path.basename(path)}: " + ", ".join(f"{k}{list(v.shape)}" for k, v in sorted(tensors.items())))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", default=TINY)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    check_versions()
    os.makedirs(args.out, exist_ok=True)
    g = torch.Generator().manual_seed(SEED)

    # -- tokenizer ------------------------------------------------------------------------------
    tok = CLIPTokenizer.from_pretrained(os.path.join(args.tiny, "tokenizer"))
    cases = []
    for text in TOKENIZER_CASES:
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert len(ids) == 77
        cases.append({"text": text, "input_ids": ids, "tokens": tok.convert_ids_to_tokens(ids)})
    with open(os.path.join(args.out, "tokenizer_ids.json"), "w", encoding="utf-8") as f:
        json.dump({"max_length": 77, "pad": "<|endoftext|>", "cases": cases}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    input_ids = torch.tensor([c["input_ids"] for c in cases[: len(PROMPTS)]], dtype=torch.int64)

    # -- text encoders ---------------------------------------------------------------------------
    ehs = None
    for sub, fname in [("text_encoder", "text_encoder.safetensors"), ("text_encoder-gelu", "text_encoder_gelu.safetensors")]:
        te = CLIPTextModel.from_pretrained(os.path.join(args.tiny, sub)).double().eval()
        with torch.no_grad():
            o = te(input_ids, output_hidden_states=True)
            pen = o.hidden_states[-2]
            rec = {
                "input_ids": input_ids,
                "last_hidden_state": f32(o.last_hidden_state),
                "penultimate": f32(pen),
                "penultimate_normed": f32(te.final_layer_norm(pen)),
                "pooled": f32(o.pooler_output),
            }
        save(os.path.join(args.out, fname), rec)
        if sub == "text_encoder":
            ehs = o.last_hidden_state

    # -- UNets -----------------------------------------------------------------------------------
    sample = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    t_mixed = torch.tensor([1, 500, 999], dtype=torch.int64)
    t_uniform = torch.tensor([10, 10, 10], dtype=torch.int64)
    unet_outputs = {}
    for sub, variant, fname in [
        ("unet", None, "unet.safetensors"),
        ("unet", "fp16", "unet_fp16.safetensors"),
        ("unet-sd2", None, "unet_sd2.safetensors"),
    ]:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(args.tiny, sub), variant=variant).double().eval()
        with torch.no_grad():
            out_mixed = unet(sample, t_mixed, encoder_hidden_states=ehs).sample
            out_uniform = unet(sample, t_uniform, encoder_hidden_states=ehs).sample
        unet_outputs[fname] = out_uniform
        save(
            os.path.join(args.out, fname),
            {
                "sample": f32(sample),
                "encoder_hidden_states": f32(ehs),
                "timesteps_mixed": t_mixed.to(torch.float32),
                "timesteps_mixed_i64": t_mixed,
                "out_mixed": f32(out_mixed),
                "timesteps_uniform": t_uniform.to(torch.float32),
                "out_uniform": f32(out_uniform),
            },
        )

    # -- DDIM steps, epsilon vs v-prediction -------------------------------------------------------
    model_output = unet_outputs["unet.safetensors"]
    rec = {"sample": f32(sample), "model_output": f32(model_output)}
    for pt in ["epsilon", "v_prediction"]:
        sched = DDIMScheduler.from_pretrained(os.path.join(args.tiny, "scheduler"), prediction_type=pt)
        sched.set_timesteps(10)
        rec["timesteps"] = sched.timesteps.to(torch.int64)
        rec["alphas_cumprod"] = f32(sched.alphas_cumprod)
        for t in STEP_TIMESTEPS:
            assert t in sched.timesteps.tolist(), (t, sched.timesteps)
            o = sched.step(model_output, t, sample, eta=0.0)
            rec[f"{pt}.t{t}.prev_sample"] = f32(o.prev_sample)
            rec[f"{pt}.t{t}.pred_original_sample"] = f32(o.pred_original_sample)
    save(os.path.join(args.out, "scheduler_ddim.safetensors"), rec)

    # -- VAE ---------------------------------------------------------------------------------------
    vae = AutoencoderKL.from_pretrained(os.path.join(args.tiny, "vae")).double().eval()
    image = torch.rand(2, 3, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    latent = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        post = vae.encode(image).latent_dist
        decoded = vae.decode(latent).sample
    save(
        os.path.join(args.out, "vae.safetensors"),
        {
            "image": f32(image),
            "posterior_mean": f32(post.mean),
            "posterior_logvar": f32(post.logvar),
            "latent": f32(latent),
            "decoded": f32(decoded),
        },
    )

    # -- gradients (PyTorch autograd in float64) ----------------------------------------------------
    write_gradient_fixtures(args, input_ids, sample, t_mixed, ehs, image, latent)


GRAD_PARAMS = {
    # A few full parameter gradients per model, chosen where candle's own layers drop or corrupt
    # gradients (attention projections, layer norms) plus ordinary convs and norms.
    "unet": [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "down_blocks.0.resnets.0.norm1.weight",
        "down_blocks.0.attentions.0.proj_in.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "up_blocks.1.attentions.2.proj_out.bias",
        "conv_out.weight",
    ],
    "vae": [
        "encoder.conv_in.weight",
        "encoder.mid_block.attentions.0.to_q.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.mid_block.attentions.0.to_k.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.conv_out.bias",
    ],
    "text_encoder": [
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.encoder.layers.0.layer_norm1.weight",
        "text_model.encoder.layers.1.mlp.fc1.weight",
        "text_model.final_layer_norm.bias",
    ],
}


def param_grads(model, names, prefix=""):
    """{"grad.<name>": full gradient for `names`} and {"gradnorm.<name>": L2 norm} for every parameter."""
    rec = {}
    params = dict(model.named_parameters())
    for name, p in params.items():
        key = prefix + name
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        rec[f"gradnorm.{key}"] = f32(g.norm().reshape(1))
    for key in names:
        name = key[len(prefix):] if key.startswith(prefix) else key
        assert name in params, key
        rec[f"grad.{key}"] = f32(params[name].grad)
    return rec


def write_gradient_fixtures(args, input_ids, sample, t_mixed, ehs, image, latent):
    """Gradients of fixed random projections of the outputs (loss = sum(out * w)) with respect
    to the inputs and the parameters, in float64.

      grads_unet.safetensors   tiny-sd unet/: inputs as in unet.safetensors; w [3,4,8,8];
          d_sample, d_encoder_hidden_states, gradnorm.<param> [1] for every parameter,
          grad.<param> for GRAD_PARAMS["unet"]
      grads_vae.safetensors    vae/: loss = sum(mean * w_mean) + sum(logvar * w_logvar) for the
          encoder (image as in vae.safetensors), + sum(decode(latent) * w_dec);
          d_image, d_latent, gradnorm.*, grad.*
      grads_text_encoder.safetensors  text_encoder/: loss = sum(last_hidden_state * w_last) +
          sum(pooled * w_pooled); gradnorm.* / grad.* (keys with the hub "text_model." prefix)
    """
    g = torch.Generator().manual_seed(SEED + 1)

    unet = UNet2DConditionModel.from_pretrained(os.path.join(args.tiny, "unet")).double()
    x = sample.clone().requires_grad_(True)
    c = ehs.detach().clone().requires_grad_(True)
    w = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    (unet(x, t_mixed, encoder_hidden_states=c).sample * w).sum().backward()
    rec = {
        "sample": f32(sample),
        "encoder_hidden_states": f32(ehs),
        "timesteps": t_mixed.to(torch.float32),
        "w": f32(w),
        "d_sample": f32(x.grad),
        "d_encoder_hidden_states": f32(c.grad),
    }
    rec.update(param_grads(unet, GRAD_PARAMS["unet"]))
    save(os.path.join(args.out, "grads_unet.safetensors"), rec)

    vae = AutoencoderKL.from_pretrained(os.path.join(args.tiny, "vae")).double()
    img = image.clone().requires_grad_(True)
    z = latent.clone().requires_grad_(True)
    w_mean = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    w_logvar = torch.randn(2, 4, 16, 16, generator=g, dtype=torch.float64)
    w_dec = torch.randn(2, 3, 16, 16, generator=g, dtype=torch.float64)
    post = vae.encode(img).latent_dist
    loss = (post.mean * w_mean).sum() + (post.logvar * w_logvar).sum() + (vae.decode(z).sample * w_dec).sum()
    loss.backward()
    rec = {
        "image": f32(image),
        "latent": f32(latent),
        "w_mean": f32(w_mean),
        "w_logvar": f32(w_logvar),
        "w_dec": f32(w_dec),
        "d_image": f32(img.grad),
        "d_latent": f32(z.grad),
    }
    rec.update(param_grads(vae, GRAD_PARAMS["vae"]))
    save(os.path.join(args.out, "grads_vae.safetensors"), rec)

    te = CLIPTextModel.from_pretrained(os.path.join(args.tiny, "text_encoder")).double()
    w_last = torch.randn(3, 77, 32, generator=g, dtype=torch.float64)
    w_pooled = torch.randn(3, 32, generator=g, dtype=torch.float64)
    o = te(input_ids)
    ((o.last_hidden_state * w_last).sum() + (o.pooler_output * w_pooled).sum()).backward()
    rec = {"input_ids": input_ids, "w_last": f32(w_last), "w_pooled": f32(w_pooled)}
    # transformers 5 names the parameters without "text_model."; the checkpoint has it.
    rec.update(param_grads(te, GRAD_PARAMS["text_encoder"], prefix="text_model."))
    save(os.path.join(args.out, "grads_text_encoder.safetensors"), rec)


if __name__ == "__main__":
    main()
