#!/usr/bin/env python3
"""LoRA parity fixtures: our LoRA files loaded by diffusers, and PEFT/diffusers LoRA files for Rust.

Run (CPU, ~20 s, deterministic) from the repository root, AFTER the Rust writer has produced our
files (they are committed; regenerate them only when the writer changes):

    GEN_WRITE_LORA_FIXTURES=1 cargo test -p gen-tests --test lora_parity -- writer   # ours_*.safetensors
    /work/venv/bin/python scripts/fixtures_lora.py                                    # the rest

Pinned environment: scripts/requirements-fixtures.txt (torch==2.9.1, diffusers==0.42.1,
transformers==5.24.0, safetensors==0.8.0) plus peft==0.21.2.

Inputs (fixed): tests/fixtures/parity/unet.safetensors (sample [3,4,8,8], encoder_hidden_states
[3,77,32], timesteps_mixed [3] = [1, 500, 999]) and tests/fixtures/parity/text_encoder.safetensors
(input_ids [3,77] i64), on the tiny pipeline tests/fixtures/tiny-sd/.
Every reference is computed in float64 (weights and LoRA tensors loaded as f32, then upcast) and
stored as float32: unet_out [3,4,8,8] = unet(sample, timesteps_mixed, encoder_hidden_states),
te_last_hidden_state [3,77,32] = text_encoder(input_ids).last_hidden_state.

Files written to tests/fixtures/lora/:

(a) our files -> diffusers (`pipe.load_lora_weights(file)`):
  ref_ours_kohya.safetensors       for ours_kohya.safetensors      (kohya keys, alpha 8, rank 4)
  ref_ours_peft.safetensors        for ours_peft.safetensors       (PEFT keys, alpha baked into B)
  ref_ours_peft_meta.safetensors   for ours_peft_meta.safetensors  (PEFT keys, lora_adapter_metadata)
(b) PEFT/diffusers -> ours (the reference is the PEFT-adapted model itself, before saving):
  peft_meta.safetensors            peft LoraConfig(r=4, lora_alpha=8, gaussian init, random lora_B)
                                   on UNet (UNET_TARGETS) and text encoder (TE_TARGETS), saved by
                                   StableDiffusionPipeline.save_lora_weights with the adapter
                                   metadata (how diffusers' training scripts save alpha != r)
  ref_peft_meta.safetensors
  peft_plain.safetensors           the same with lora_alpha = r = 4, saved without metadata
  ref_peft_plain.safetensors
  diffusers_kohya.safetensors      peft_plain converted to kohya keys by diffusers'
                                   `convert_state_dict_to_kohya` (lora_te1_ prefix, int64 alpha);
                                   its reference is ref_peft_plain.safetensors
The script also checks that diffusers, reloading each file of (b), reproduces its reference.
"""

import os
import shutil
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

import diffusers
import peft
import transformers
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

# transformers 5.24 asks for peft >= 0.22, which is not published (newest: 0.21.2); its text-encoder
# adapter code works with 0.21.2, so the version gate is lifted here (and only here).
import transformers.integrations.peft as _tf_peft

_tf_peft.check_peft_version = lambda min_version=None: None

PINNED = {"torch": "2.9.1", "diffusers": "0.42.1", "transformers": "5.24.0", "peft": "0.21.2"}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "tests", "fixtures", "tiny-sd")
PARITY = os.path.join(REPO, "tests", "fixtures", "parity")
OUT = os.path.join(REPO, "tests", "fixtures", "lora")
SEED = 4321
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def check_versions():
    got = {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__}
    bad = {k: (got[k], v) for k, v in PINNED.items() if got[k] != v}
    if bad:
        sys.exit(f"version mismatch (found, pinned): {bad}")


def inputs():
    u = load_file(os.path.join(PARITY, "unet.safetensors"))
    t = load_file(os.path.join(PARITY, "text_encoder.safetensors"))
    return u["sample"], u["timesteps_mixed"], u["encoder_hidden_states"], t["input_ids"]


def load_pipe():
    return StableDiffusionPipeline.from_pretrained(TINY, torch_dtype=torch.float32, safety_checker=None)


@torch.no_grad()
def run(pipe):
    """UNet and text-encoder outputs in float64, returned as float32."""
    sample, t, ehs, ids = inputs()
    pipe.unet.to(torch.float64)
    pipe.text_encoder.to(torch.float64)
    unet_out = pipe.unet(sample.double(), t.double(), ehs.double()).sample
    te = pipe.text_encoder(ids).last_hidden_state
    pipe.unet.to(torch.float32)
    pipe.text_encoder.to(torch.float32)
    return {"unet_out": unet_out.float().contiguous(), "te_last_hidden_state": te.float().contiguous()}


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def ours_to_diffusers():
    base = run(load_pipe())
    for name in ["ours_kohya", "ours_peft", "ours_peft_meta"]:
        path = os.path.join(OUT, f"{name}.safetensors")
        if not os.path.exists(path):
            sys.exit(f"{path} missing: run the Rust writer first (see the docstring)")
        pipe = load_pipe()
        pipe.load_lora_weights(path)
        ref = run(pipe)
        for k in ref:
            d = rel(ref[k], base[k])
            print(f"{name}: {k} differs from the base model by {d:.3e}")
            assert d > 1e-3, f"{name}: the LoRA had no effect on {k}"
        save_file(ref, os.path.join(OUT, f"ref_{name}.safetensors"), metadata={"source": f"diffusers load_lora_weights({name}.safetensors)"})


def randomise_b(module, gen):
    for n, p in module.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn(p.shape, generator=gen) * 0.3


def peft_to_ours(alpha, with_meta, name):
    pipe = load_pipe()
    gen = torch.Generator().manual_seed(SEED + alpha)
    torch.manual_seed(SEED + alpha)  # peft's gaussian init of lora_A uses the global generator
    ucfg = LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    tcfg = LoraConfig(r=4, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=TE_TARGETS)
    pipe.unet.add_adapter(ucfg)
    pipe.text_encoder.add_adapter(tcfg)
    randomise_b(pipe.unet, gen)
    randomise_b(pipe.text_encoder, gen)
    unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet))
    te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder))
    kwargs = {}
    if with_meta:
        def meta(m):
            d = m.peft_config["default"].to_dict()
            d["target_modules"] = sorted(d["target_modules"])  # a set: sort for a reproducible file
            return d
        kwargs = {"unet_lora_adapter_metadata": meta(pipe.unet), "text_encoder_lora_adapter_metadata": meta(pipe.text_encoder)}
    tmp = tempfile.mkdtemp()
    StableDiffusionPipeline.save_lora_weights(tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                              safe_serialization=True, **kwargs)
    path = os.path.join(OUT, f"{name}.safetensors")
    shutil.move(os.path.join(tmp, "pytorch_lora_weights.safetensors"), path)
    shutil.rmtree(tmp)
    ref = run(pipe)
    base = run(load_pipe())
    for k in ref:
        d = rel(ref[k], base[k])
        print(f"{name}: {k} differs from the base model by {d:.3e}")
        assert d > 1e-3, f"{name}: the LoRA had no effect on {k}"
    save_file(ref, os.path.join(OUT, f"ref_{name}.safetensors"), metadata={"source": f"peft-adapted pipeline ({name})"})
    files = [path]
    if not with_meta:
        peft_sd = {**{f"unet.{k}": v for k, v in get_peft_model_state_dict(pipe.unet).items()},
                   **{f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(pipe.text_encoder).items()}}
        kohya = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft_sd).items()}
        kpath = os.path.join(OUT, "diffusers_kohya.safetensors")
        save_file(kohya, kpath, metadata={"format": "pt"})
        files.append(kpath)
    # diffusers reproduces the reference from each saved file.
    for f in files:
        p2 = load_pipe()
        p2.load_lora_weights(f)
        got = run(p2)
        for k in ref:
            d = rel(got[k], ref[k])
            print(f"diffusers reload of {os.path.basename(f)}: {k} rel err {d:.2e}")
            assert d < 1e-6, f"{f}: diffusers does not reproduce the reference ({k}: {d})"


def main():
    check_versions()
    torch.use_deterministic_algorithms(True)
    os.makedirs(OUT, exist_ok=True)
    ours_to_diffusers()
    peft_to_ours(8, True, "peft_meta")
    peft_to_ours(4, False, "peft_plain")


if __name__ == "__main__":
    main()
