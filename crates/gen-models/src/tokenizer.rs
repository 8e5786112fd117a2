//! The text tokenizer of a diffusers pipeline (`tokenizer/`).
//!
//! Loads either a `tokenizer.json` (any model the `tokenizers` crate reads: CLIP's BPE, a
//! word-level vocabulary with an unknown token, …) or CLIP's `vocab.json` + `merges.txt`, for
//! which it builds the same byte-level BPE as transformers' `CLIPTokenizerFast`: NFC,
//! whitespace runs collapsed to one space, lowercase, CLIP's split regex, `</w>` end-of-word
//! suffix. Special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`, `model_max_length`)
//! come from `tokenizer_config.json` / `special_tokens_map.json` when present.
//!
//! [`Tokenizer::encode`] follows transformers' `tokenizer(prompt, padding="max_length",
//! truncation=True, max_length=L)`: `[bos] + tokens[..L-2] + [eos]`, padded to `L` with the pad
//! token (SD1.x pads with `<|endoftext|>`, SD2 with `!`, id 0).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use gen_core::{Error, Result};

/// CLIP's pre-tokenization pattern (`'s`, `'t`, …, letter runs, single digits, other symbol runs).
const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Names of the special tokens. `None` fields fall back to CLIP's when those are in the vocabulary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub pad: Option<String>,
    pub unk: Option<String>,
    /// `model_max_length` of `tokenizer_config.json` (77 for SD).
    pub model_max_length: Option<usize>,
}

impl SpecialTokens {
    /// Reads `tokenizer_config.json` and then `special_tokens_map.json` of `dir` (either may be
    /// absent; the first one naming a token wins).
    pub fn from_folder(dir: &Path) -> Result<Self> {
        let mut s = SpecialTokens::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if !path.exists() {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Config {
                file: path.clone(),
                key: "(file)".into(),
                msg: format!("not valid JSON: {e}"),
            })?;
            let tok = |key: &str| -> Option<String> {
                match v.get(key)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => {
                        o.get("content").and_then(|c| c.as_str()).map(str::to_string)
                    }
                    _ => None,
                }
            };
            s.bos = s.bos.or_else(|| tok("bos_token"));
            s.eos = s.eos.or_else(|| tok("eos_token"));
            s.pad = s.pad.or_else(|| tok("pad_token"));
            s.unk = s.unk.or_else(|| tok("unk_token"));
            if s.model_max_length.is_none() {
                // transformers writes a huge number when unset
                s.model_max_length = v
                    .get("model_max_length")
                    .and_then(|m| m.as_u64())
                    .filter(|&m| m < 1_000_000)
                    .map(|m| m as usize);
            }
        }
        Ok(s)
    }
}

/// Token ids of one prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly `max_len` ids: bos, tokens, eos, padding.
    pub ids: Vec<u32>,
    /// Tokens were dropped to fit `max_len` (the CLI warns).
    pub truncated: bool,
    /// Number of tokens of the prompt before truncation, without bos/eos.
    pub num_tokens: usize,
}

/// A tokenizer with the special tokens of a diffusers pipeline.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    source: PathBuf,
    bos: Option<u32>,
    eos: Option<u32>,
    pad: u32,
    unk: Option<u32>,
    model_max_length: Option<usize>,
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::msg(format!("{}: cannot load tokenizer: {e}", path.display()))
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json` if present, else `dir/vocab.json` + `dir/merges.txt`, with the
    /// special tokens of `dir`'s `tokenizer_config.json` / `special_tokens_map.json`.
    pub fn from_folder(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::MissingFile {
                path: dir.to_path_buf(),
                hint: "tokenizer folder".into(),
            });
        }
        let specials = SpecialTokens::from_folder(dir)?;
        let tj = dir.join("tokenizer.json");
        if tj.exists() {
            return Self::from_tokenizer_json(&tj, &specials);
        }
        let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
        if v.exists() && m.exists() {
            return Self::from_vocab_merges(&v, &m, &specials);
        }
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        Err(Error::MissingFile {
            path: tj,
            hint: format!(
                "and no vocab.json + merges.txt either; the folder holds: {}",
                names.join(", ")
            ),
        })
    }

    /// From a `tokenizer.json`.
    pub fn from_tokenizer_json(path: impl AsRef<Path>, specials: &SpecialTokens) -> Result<Self> {
        let path = path.as_ref();
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| tok_err(path, e))?;
        // The unknown token of a word-level or BPE model, read from the file itself.
        let mut specials = specials.clone();
        if specials.unk.is_none() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| tok_err(path, e))?;
            specials.unk =
                v.pointer("/model/unk_token").and_then(|u| u.as_str()).map(str::to_string);
        }
        Self::with_specials(inner, path, &specials)
    }

    /// From CLIP's `vocab.json` and `merges.txt` (the first line `#version: …` is skipped).
    pub fn from_vocab_merges(
        vocab: impl AsRef<Path>,
        merges: impl AsRef<Path>,
        specials: &SpecialTokens,
    ) -> Result<Self> {
        let (vocab, merges) = (vocab.as_ref(), merges.as_ref());
        let vtext = std::fs::read_to_string(vocab).map_err(|e| Error::io(vocab, e))?;
        let vjson: serde_json::Value = serde_json::from_str(&vtext)
            .map_err(|e| tok_err(vocab, format!("not valid JSON: {e}")))?;
        let vmap =
            vjson.as_object().ok_or_else(|| tok_err(vocab, "not a JSON object of token → id"))?;
        let mtext = std::fs::read_to_string(merges).map_err(|e| Error::io(merges, e))?;
        let mut merge_list = Vec::new();
        for (i, line) in mtext.lines().enumerate() {
            if (i == 0 && line.starts_with("#version")) || line.trim().is_empty() {
                continue;
            }
            let parts: Vec<&str> = line.split(' ').collect();
            if parts.len() != 2 {
                return Err(tok_err(
                    merges,
                    format!("line {}: expected two space-separated symbols, found {line:?}", i + 1),
                ));
            }
            merge_list.push(serde_json::Value::String(line.to_string()));
        }
        let unk = specials.unk.clone().unwrap_or_else(|| "<|endoftext|>".to_string());
        let mut added = Vec::new();
        for name in [
            specials.bos.as_deref().unwrap_or("<|startoftext|>"),
            specials.eos.as_deref().unwrap_or("<|endoftext|>"),
        ] {
            if let Some(id) = vmap.get(name).and_then(|i| i.as_u64()) {
                added.push(serde_json::json!({"id": id, "content": name, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": true, "special": true}));
            }
        }
        let json = serde_json::json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFC"},
                {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
                {"type": "Lowercase"}
            ]},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": CLIP_SPLIT}, "behavior": "Removed", "invert": true},
                {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
            ]},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": "",
                "end_of_word_suffix": "</w>", "fuse_unk": false, "byte_fallback": false,
                "vocab": vjson, "merges": merge_list}
        });
        let bytes = serde_json::to_vec(&json).map_err(|e| tok_err(vocab, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes).map_err(|e| tok_err(vocab, e))?;
        let mut sp = specials.clone();
        sp.unk = Some(unk);
        Self::with_specials(inner, vocab, &sp)
    }

    fn with_specials(
        inner: tokenizers::Tokenizer,
        source: &Path,
        s: &SpecialTokens,
    ) -> Result<Self> {
        let find = |name: Option<&str>, fallback: &str| -> Result<Option<u32>> {
            match name {
                Some(n) => inner.token_to_id(n).map(Some).ok_or_else(|| {
                    tok_err(source, format!("special token {n:?} is not in the vocabulary"))
                }),
                None => Ok(inner.token_to_id(fallback)),
            }
        };
        let bos = find(s.bos.as_deref(), "<|startoftext|>")?;
        let eos = find(s.eos.as_deref(), "<|endoftext|>")?;
        let unk = match s.unk.as_deref() {
            Some(n) => inner.token_to_id(n),
            None => None,
        };
        let pad = match find(s.pad.as_deref(), "<|endoftext|>")?.or(eos).or(unk) {
            Some(p) => p,
            None => {
                return Err(tok_err(source, "no pad token: set pad_token in tokenizer_config.json"))
            }
        };
        Ok(Self {
            inner,
            source: source.to_path_buf(),
            bos,
            eos,
            pad,
            unk,
            model_max_length: s.model_max_length,
        })
    }

    /// The file the tokenizer was read from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }

    /// `model_max_length` from `tokenizer_config.json`, when given.
    pub fn model_max_length(&self) -> Option<usize> {
        self.model_max_length
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The prompt's token ids without bos/eos/padding.
    pub fn tokenize(&self, prompt: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| tok_err(&self.source, format!("encoding {prompt:?}: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// `[bos] + tokens + [eos]`, truncated to `max_len` (keeping bos and eos) and padded to
    /// exactly `max_len` with the pad token.
    pub fn encode(&self, prompt: &str, max_len: usize) -> Result<Encoded> {
        let specials = self.bos.is_some() as usize + self.eos.is_some() as usize;
        if max_len < specials + 1 {
            return Err(Error::invalid("max_len", format!("{max_len} leaves no room for tokens")));
        }
        let tokens = self.tokenize(prompt)?;
        let room = max_len - specials;
        let truncated = tokens.len() > room;
        let mut ids = Vec::with_capacity(max_len);
        ids.extend(self.bos);
        ids.extend(tokens.iter().take(room));
        ids.extend(self.eos);
        ids.resize(max_len, self.pad);
        Ok(Encoded { ids, truncated, num_tokens: tokens.len() })
    }

    /// [`Tokenizer::encode`] for each prompt.
    pub fn encode_batch(&self, prompts: &[&str], max_len: usize) -> Result<Vec<Encoded>> {
        prompts.iter().map(|p| self.encode(p, max_len)).collect()
    }

    /// The encoded prompts as a `(B, max_len)` u32 tensor for the text encoder.
    pub fn ids_tensor(encoded: &[Encoded], device: &Device) -> Result<Tensor> {
        let l = encoded.first().map(|e| e.ids.len()).unwrap_or(0);
        if encoded.iter().any(|e| e.ids.len() != l) {
            return Err(Error::invalid("encoded prompts", "rows of different lengths"));
        }
        let flat: Vec<u32> = encoded.iter().flat_map(|e| e.ids.iter().copied()).collect();
        Ok(Tensor::from_vec(flat, (encoded.len(), l), device)?)
    }

    /// Pieces of the prompt that map to the unknown token (word-level tokenizers), in order,
    /// as they appear in the prompt. Empty when the tokenizer has no unknown token.
    pub fn unknown_words(&self, prompt: &str) -> Result<Vec<String>> {
        let Some(unk) = self.unk else { return Ok(Vec::new()) };
        let enc = self
            .inner
            .encode(prompt, false)
            .map_err(|e| tok_err(&self.source, format!("encoding {prompt:?}: {e}")))?;
        let mut out = Vec::new();
        for (id, &(a, b)) in enc.get_ids().iter().zip(enc.get_offsets()) {
            if *id == unk {
                // offsets are byte offsets into the original prompt
                let w = prompt.get(a..b).unwrap_or("").to_string();
                if !w.is_empty() && !out.contains(&w) {
                    out.push(w);
                }
            }
        }
        Ok(out)
    }

    /// The vocabulary without special tokens, sorted by id.
    pub fn known_words(&self) -> Vec<String> {
        let special: Vec<u32> =
            [self.bos, self.eos, self.unk, Some(self.pad)].into_iter().flatten().collect();
        let vocab: HashMap<String, u32> = self.inner.get_vocab(true);
        let mut words: Vec<(u32, String)> = vocab
            .into_iter()
            .filter(|(_, id)| !special.contains(id))
            .map(|(w, id)| (id, w))
            .collect();
        words.sort();
        words.into_iter().map(|(_, w)| w).collect()
    }
}
