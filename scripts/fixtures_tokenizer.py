#!/usr/bin/env python3
"""Tokenizer fixtures for crates/gen-models/tests/tokenizer.rs.

Writes a tiny CLIP BPE tokenizer (vocab.json, merges.txt, tokenizer_config.json,
special_tokens_map.json) built by hand from a few words, saves it through transformers'
CLIPTokenizer (which also writes tokenizer.json), a tiny word-level tokenizer.json with an
unknown token, and the ids transformers / tokenizers produce for a set of prompts.

Pinned environment: scripts/requirements-fixtures.txt (transformers 5.24.0, tokenizers 0.23.3).
Run: /work/venv/bin/python scripts/fixtures_tokenizer.py
"""
import json
import os
import shutil
import tempfile

import tokenizers
import transformers
from transformers import CLIPTokenizer

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "gen-models", "tests", "fixtures", "tokenizer")
MAX_LEN = 12


def bytes_to_unicode():
    """GPT-2 / CLIP byte → printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_clip_bpe(dirname):
    chars = bytes_to_unicode()
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    words = ["a", "photo", "of", "red", "cube", "blue", "sphere", "the", "cat", "on", "green", "cubes"]
    merges = []
    for w in words:
        syms = list(w[:-1]) + [w[-1] + "</w>"]
        # merge left to right: ((c1 c2) c3) ...
        cur = syms[0]
        for s in syms[1:]:
            pair = f"{cur} {s}"
            cur = cur + s
            if pair not in merges:
                merges.append(pair)
            if cur not in vocab:
                vocab[cur] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    os.makedirs(dirname, exist_ok=True)
    with open(os.path.join(dirname, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(dirname, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


PROMPTS = [
    "a photo of a red cube",
    "A  Photo\tOF the BLUE sphere!",
    "the cat on the green cubes, a red cube",
    "zebra xylophone",
    "",
    "a red cube a red cube a red cube a red cube a red cube",
    "it's 42 cubes",
]


def main():
    tmp = tempfile.mkdtemp()
    build_clip_bpe(tmp)
    # SD1.x style folder (vocab.json + merges.txt + tokenizer_config.json; pad = <|endoftext|>)
    out_bpe = os.path.join(OUT, "clip-bpe")
    shutil.rmtree(out_bpe, ignore_errors=True)
    os.makedirs(out_bpe)
    for n in ["vocab.json", "merges.txt"]:
        shutil.copy(os.path.join(tmp, n), os.path.join(out_bpe, n))
    cfg1 = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>", "model_max_length": MAX_LEN, "tokenizer_class": "CLIPTokenizer"}
    json.dump(cfg1, open(os.path.join(out_bpe, "tokenizer_config.json"), "w"), indent=2)
    tok = CLIPTokenizer.from_pretrained(out_bpe)
    # the same tokenizer saved by transformers as tokenizer.json
    out_json = os.path.join(OUT, "clip-json")
    shutil.rmtree(out_json, ignore_errors=True)
    tok.save_pretrained(out_json)
    for n in os.listdir(out_json):
        if n not in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(out_json, n))
    # SD2 style: pad = "!" (id 0), as a folder with only vocab.json + merges.txt + configs
    out_sd2 = os.path.join(OUT, "clip-bpe-pad0")
    shutil.rmtree(out_sd2, ignore_errors=True)
    os.makedirs(out_sd2)
    for n in ["vocab.json", "merges.txt"]:
        shutil.copy(os.path.join(tmp, n), os.path.join(out_sd2, n))
    cfg = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "!",
           "unk_token": "<|endoftext|>", "model_max_length": MAX_LEN, "tokenizer_class": "CLIPTokenizer"}
    json.dump(cfg, open(os.path.join(out_sd2, "tokenizer_config.json"), "w"), indent=2)
    tok2 = CLIPTokenizer.from_pretrained(out_sd2)

    expected = {"max_len": MAX_LEN, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                "clip_bpe": [], "clip_bpe_pad0": [], "word_level": []}
    for p in PROMPTS:
        full = tok(p, add_special_tokens=False)["input_ids"]
        ids = tok(p, padding="max_length", truncation=True, max_length=MAX_LEN)["input_ids"]
        expected["clip_bpe"].append({"prompt": p, "ids": ids, "num_tokens": len(full)})
        ids2 = tok2(p, padding="max_length", truncation=True, max_length=MAX_LEN)["input_ids"]
        expected["clip_bpe_pad0"].append({"prompt": p, "ids": ids2})

    # Word-level tokenizer with an unknown token, like the embedded model's.
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    words = ["<|startoftext|>", "<|endoftext|>", "[UNK]", "a", "red", "blue", "cube", "sphere", "on", "the", "of", "photo", ","]
    wl = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    wl.normalizer = normalizers.Lowercase()
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    out_wl = os.path.join(OUT, "word-level")
    shutil.rmtree(out_wl, ignore_errors=True)
    os.makedirs(out_wl)
    wl.save(os.path.join(out_wl, "tokenizer.json"))
    json.dump({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "[UNK]", "model_max_length": MAX_LEN},
              open(os.path.join(out_wl, "tokenizer_config.json"), "w"), indent=2)
    for p in PROMPTS:
        enc = wl.encode(p, add_special_tokens=False)
        unknown = []
        for i, (a, b) in zip(enc.ids, enc.offsets):
            if i == 2 and p[a:b] not in unknown:
                unknown.append(p[a:b])
        expected["word_level"].append({"prompt": p, "tokens": enc.ids, "unknown": unknown})
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
