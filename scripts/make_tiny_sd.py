#!/usr/bin/env python3
"""Build a tiny, random-weight Stable Diffusion pipeline folder for tests.

Run (CPU only, ~10 s, deterministic):

    /work/venv/bin/python scripts/make_tiny_sd.py            # writes tests/fixtures/tiny-sd/
    /work/venv/bin/python scripts/make_tiny_sd.py --out DIR

Pinned environment: scripts/requirements-fixtures.txt
(torch==2.9.1, diffusers==0.42.1, transformers==5.24.0, tokenizers==0.23.3, safetensors==0.8.0).

What it writes (diffusers layout, real key names, safetensors, f32):

    model_index.json                    StableDiffusionPipeline, no safety checker / feature extractor
    scheduler/scheduler_config.json     DDIMScheduler, scaled_linear, epsilon (SD 1.5 settings)
    tokenizer/                          hand-built CLIP byte-level BPE: vocab.json + merges.txt
                                        (+ tokenizer.json from the tokenizers-backed CLIPTokenizer)
    text_encoder/                       CLIPTextModel ("text_model.*" keys as on the hub, although
                                        transformers 5 itself saves them unprefixed):
                                        hidden 32, 2 layers, 4 heads, intermediate 37, quick_gelu,
                                        eos_token_id 2 (the legacy "argmax" pooling of SD 1.5 configs)
    text_encoder-gelu/                  same shape, hidden_act "gelu", real eos_token_id (not loaded
                                        by the pipeline; for tests)
    unet/                               UNet2DConditionModel (16, 32), 2 layers per block, 8 norm
                                        groups, CrossAttnDown + Down / Up + CrossAttnUp, 4 heads
                                        ("attention_head_dim": 4), conv projections;
                                        plus diffusion_pytorch_model.fp16.safetensors
    unet-sd2/                           SD2-style variant: use_linear_projection, attention_head_dim
                                        [2, 4] (per-block head counts), 1 layer per block
    vae/                                AutoencoderKL (16, 32), 8 norm groups, 4 latent channels,
                                        32x32 images <-> 4x16x16 latents

Channel widths are (16, 32) rather than (32, 64) to keep the folder near 3 MB (the fixture is
committed to git); the structure (block types, skip connections, attention layouts) is the same.

Every parameter (including those diffusers/transformers initialise to zero or one, such as
conv_out, proj_out, norm affines and biases) is replaced by seeded random values, so a parity test
against these weights is sensitive to every parameter.
"""

import argparse
import json
import math
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

import diffusers
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PINNED = {"torch": "2.9.1", "diffusers": "0.42.1", "transformers": "5.24.0"}

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, "tests", "fixtures", "tiny-sd")

SEED = 20261128

# ---------------------------------------------------------------------------------------------
# Tokenizer: CLIP byte-level BPE built by hand.
# ---------------------------------------------------------------------------------------------

# Words that become single tokens. Everything else falls back to smaller pieces (down to bytes).
WORDS = """
a an the of in on at to from with and or by for is are this that it its as
red orange yellow green cyan blue purple white black gray grey pink brown gold silver
light dark bright pale deep shiny matte glossy plain striped two tone colored colour color
cube sphere ball cylinder cone torus ring box pyramid disk object shape shapes thing toy
front side back top bottom left right overhead above below view views angle camera
photo picture image render rendering drawing painting illustration scene model
small large big tiny huge single one two three simple smooth high quality detailed
background floor table wall sky studio lighting shadow
""".split()

# Sub-word pieces (become tokens inside words; "</w>" marks a word end).
PIECES = ["ing</w>", "ed</w>", "s</w>", "er</w>", "ly</w>", "un", "re", "st", "th", "ch"]


def bytes_to_unicode():
    """The reversible byte -> printable-unicode table of GPT-2/CLIP byte-level BPE."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def build_vocab_and_merges():
    """CLIP's vocabulary order: 256 byte symbols, the same with "</w>", merge results, specials."""
    byte_syms = list(bytes_to_unicode().values())
    vocab = byte_syms + [s + "</w>" for s in byte_syms]
    merges = []
    seen = set(vocab)

    def add_chain(symbols):
        # Merge left to right: ((s0 s1) s2) ... so the whole sequence becomes one token.
        cur = symbols[0]
        for s in symbols[1:]:
            new = cur + s
            if new not in seen:
                merges.append((cur, s))
                vocab.append(new)
                seen.add(new)
            cur = new

    def split(piece):
        if piece.endswith("</w>"):
            body = piece[: -len("</w>")]
            return list(body[:-1]) + [body[-1] + "</w>"]
        return list(piece)

    for p in PIECES:
        add_chain(split(p))
    for w in WORDS:
        add_chain(split(w + "</w>"))
    # A word's chain can be pre-empted by an earlier (lower-rank) merge of another chain, e.g.
    # "e d</w>" from the piece "ed</w>" splits "red" into "r ed</w>". Append fix-up merges until
    # every listed word is one token (appended merges have the highest rank, so they only act
    # where nothing else applies and never split a word that was already whole).
    merge_set = set(merges)
    for _ in range(10):
        vocab_ids = {tok: i for i, tok in enumerate(vocab)}
        fixed = False
        for w in WORDS:
            pieces = bpe_pieces(w, merges)
            if len(pieces) > 1 and (pieces[0], pieces[1]) not in merge_set:
                pair = (pieces[0], pieces[1])
                merges.append(pair)
                merge_set.add(pair)
                if pair[0] + pair[1] not in vocab_ids:
                    vocab.append(pair[0] + pair[1])
                    vocab_ids[pair[0] + pair[1]] = len(vocab) - 1
                fixed = True
        if not fixed:
            break
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(vocab)}, merges


CLIP_PAT = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+""",
    re.IGNORECASE,
)


def bpe_pieces(word, merges):
    """Rank-ordered BPE of one pre-tokenized word (a string of byte symbols) -> its pieces."""
    ranks = {m: i for i, m in enumerate(merges)}
    pieces = list(word)
    pieces[-1] = pieces[-1] + "</w>"
    while len(pieces) > 1:
        pairs = [(pieces[i], pieces[i + 1]) for i in range(len(pieces) - 1)]
        best = min(pairs, key=lambda p: ranks.get(p, math.inf))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == best:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = merged
    return pieces


def reference_clip_bpe(text, vocab, merges, max_len=77):
    """Independent re-implementation of OpenAI CLIP's tokenizer (whitespace clean + lowercase,
    regex split, bytes -> unicode, rank-ordered BPE), used to cross-check the tokenizers-backed
    CLIPTokenizer on the fixture prompts. Pads with <|endoftext|> to max_len."""
    b2u = bytes_to_unicode()
    text = re.sub(r"\s+", " ", text).strip().lower()
    ids = [vocab["<|startoftext|>"]]
    for tok in CLIP_PAT.findall(text):
        ids += [vocab[p] for p in bpe_pieces([b2u[b] for b in tok.encode("utf-8")], merges)]
    ids = ids[: max_len - 1] + [vocab["<|endoftext|>"]]
    return ids + [vocab["<|endoftext|>"]] * (max_len - len(ids))


def write_tokenizer(out_dir):
    vocab, merges = build_vocab_and_merges()
    tok_dir = os.path.join(out_dir, "tokenizer")
    os.makedirs(tok_dir, exist_ok=True)
    with open(os.path.join(tok_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(tok_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")
    # transformers 5 has a single, tokenizers-backed CLIPTokenizer (the old slow and fast classes
    # are merged); building it from vocab.json + merges.txt and saving writes tokenizer.json too.
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    tok.save_pretrained(tok_dir)
    # save_pretrained rewrites vocab.json / merges.txt; make sure they are still present.
    for name in ["vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json"]:
        assert os.path.exists(os.path.join(tok_dir, name)), name

    # Cross-check against the independent reference BPE.
    reloaded = CLIPTokenizer.from_pretrained(tok_dir)
    checks = [
        "a red cube, side view",
        "A photo of a Blue SPHERE from the back",
        "  green   torus, overhead view of a zebra!! 42 ",
        "",
    ]
    for text in checks:
        got = reloaded(text, padding="max_length", max_length=77, truncation=True).input_ids
        want = reference_clip_bpe(text, vocab, merges)
        assert got == want, (text, got[:16], want[:16])
    not_single = [w for w in WORDS if reference_clip_bpe(w, vocab, merges)[2] != vocab["<|endoftext|>"]]
    print(f"tokenizer: {len(vocab)} tokens, {len(merges)} merges; words split into pieces: {not_single}")
    return vocab


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def randomize_(model, seed, std_scale=1.0):
    """Overwrite every parameter with seeded random values.

    Weights with >= 2 dims: N(0, 1/fan_in) (fan_in = product of all but the first dim), so
    activations keep a moderate scale through the random network. 1-D parameters of
    normalisation layers ("norm" in the name, or LayerNorm/GroupNorm weights): 1 + 0.1 N(0,1).
    All other 1-D parameters (biases): 0.1 N(0,1). Registered buffers (e.g. position ids) are
    left alone.
    """
    g = torch.Generator().manual_seed(seed)
    norm_weight_names = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
            norm_weight_names.add(f"{mod_name}.weight" if mod_name else "weight")
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                fan_in = p[0].numel()
                p.copy_(r * (std_scale / math.sqrt(fan_in)))
            elif name in norm_weight_names:
                p.copy_(1.0 + 0.1 * r)
            else:
                p.copy_(0.1 * r)


def text_encoder_config(vocab_size, hidden_act, eos_token_id):
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=eos_token_id,
        pad_token_id=1,
    )


def unet_config(sd2=False):
    return dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1 if sd2 else 2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        # diffusers reads attention_head_dim as the number of heads: 4 heads of dim 4 / 8.
        # SD2 style: a per-block list, [2, 4] heads -> head dim 8 in both blocks.
        attention_head_dim=[2, 4] if sd2 else 4,
        use_linear_projection=sd2,
        norm_num_groups=8,
    )


def vae_config():
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def scheduler():
    # Stable Diffusion 1.5's scheduler settings.
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def add_text_model_prefix(path, model):
    """Rewrite a CLIPTextModel safetensors file with "text_model."-prefixed keys and check that
    transformers loads it back to the same outputs."""
    sd = load_file(path)
    if not all(k.startswith("text_model.") for k in sd):
        sd = {("text_model." + k if not k.startswith("text_model.") else k): v.contiguous() for k, v in sd.items()}
        save_file(sd, path, metadata={"format": "pt"})
    reloaded = CLIPTextModel.from_pretrained(os.path.dirname(path))
    ids = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        a = model(ids).last_hidden_state
        b = reloaded(ids).last_hidden_state
    assert torch.equal(a, b), f"{path}: prefixed checkpoint does not load back identically"


def check_versions():
    got = {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__, "transformers": transformers.__version__}
    for k, v in PINNED.items():
        if got[k] != v:
            sys.exit(f"{k} {got[k]} != pinned {v}; install scripts/requirements-fixtures.txt")


def dir_size(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    args = ap.parse_args()
    check_versions()
    torch.manual_seed(SEED)
    out = args.out
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)

    vocab = write_tokenizer(out)
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(out, "tokenizer"))
    eos_id = vocab["<|endoftext|>"]
    assert eos_id == len(vocab) - 1, "argmax pooling needs <|endoftext|> to be the largest id"

    text_encoder = CLIPTextModel(text_encoder_config(len(vocab), "quick_gelu", eos_token_id=2))
    randomize_(text_encoder, SEED + 1)
    unet = UNet2DConditionModel(**unet_config(sd2=False))
    randomize_(unet, SEED + 2)
    vae = AutoencoderKL(**vae_config())
    randomize_(vae, SEED + 3)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)

    # Half-precision copy of the UNet weights (diffusers "fp16" variant file name).
    unet_half = UNet2DConditionModel.from_pretrained(os.path.join(out, "unet")).half()
    unet_half.save_pretrained(os.path.join(out, "unet"), variant="fp16", safe_serialization=True)

    # Variants used directly by tests (the pipeline does not load them).
    te_gelu = CLIPTextModel(text_encoder_config(len(vocab), "gelu", eos_token_id=eos_id))
    randomize_(te_gelu, SEED + 4)
    te_gelu.save_pretrained(os.path.join(out, "text_encoder-gelu"), safe_serialization=True)
    unet2 = UNet2DConditionModel(**unet_config(sd2=True))
    randomize_(unet2, SEED + 5)
    unet2.save_pretrained(os.path.join(out, "unet-sd2"), safe_serialization=True)

    # transformers 5 saves CLIPTextModel keys without the "text_model." prefix; every SD text
    # encoder checkpoint on the hub (saved by transformers 4) has it. Store the hub layout.
    for name, model in [("text_encoder", text_encoder), ("text_encoder-gelu", te_gelu)]:
        add_text_model_prefix(os.path.join(out, name, "model.safetensors"), model)

    # Drop machine-specific absolute paths that save_pretrained records.
    for d, _, files in os.walk(out):
        for f in files:
            if f.endswith(".json") and f != "vocab.json" and f != "tokenizer.json":
                path = os.path.join(d, f)
                with open(path, encoding="utf-8") as fh:
                    cfg = json.load(fh)
                if isinstance(cfg, dict) and "_name_or_path" in cfg:
                    del cfg["_name_or_path"]
                    with open(path, "w", encoding="utf-8") as fh:
                        json.dump(cfg, fh, indent=2, sort_keys=True)
                        fh.write("\n")

    # Sanity: the folder loads back with diffusers and runs.
    pipe2 = StableDiffusionPipeline.from_pretrained(out)
    assert pipe2.safety_checker is None
    for name in ["text_encoder", "text_encoder-gelu", "unet", "unet-sd2", "vae"]:
        print(f"{name}: {dir_size(os.path.join(out, name)) / 1e3:.0f} kB")
    print(
        "params: text_encoder %d, unet %d, unet-sd2 %d, vae %d"
        % tuple(sum(p.numel() for p in m.parameters()) for m in [text_encoder, unet, unet2, vae])
    )
    print(f"total {dir_size(out) / 1e6:.2f} MB in {out}")


if __name__ == "__main__":
    main()
