//! The word-level tokenizer of the embedded model, over the world's caption vocabulary.
//!
//! Files written to a `tokenizer/` folder: `tokenizer.json` (a `tokenizers` WordLevel model:
//! lowercase normaliser, whitespace/punctuation pre-tokenizer, unknown token `[UNK]`),
//! `tokenizer_config.json` (transformers' `PreTrainedTokenizerFast` with the special tokens and
//! `model_max_length`) and `special_tokens_map.json`.

use std::path::Path;

use serde_json::json;

use gen_core::{write_atomic, Error, Result};

/// Beginning-of-text token (id 0).
pub const BOS: &str = "<|startoftext|>";
/// End-of-text and padding token (id 1).
pub const EOS: &str = "<|endoftext|>";
/// Unknown-word token (id 2).
pub const UNK: &str = "[UNK]";

/// The vocabulary, in id order: the three special tokens, then `gen_world::vocabulary()`.
pub fn vocab() -> Vec<String> {
    let mut v = vec![BOS.to_string(), EOS.to_string(), UNK.to_string()];
    v.extend(gen_world::vocabulary());
    v
}

fn pretty(v: &serde_json::Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::msg(format!("serialising tokenizer JSON: {e}")))
}

/// Writes the tokenizer files into `dir` (created if needed).
pub fn write_tokenizer(dir: &Path, model_max_length: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let vocab: serde_json::Map<String, serde_json::Value> =
        vocab().into_iter().enumerate().map(|(i, w)| (w, json!(i))).collect();
    let special = |id: usize, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, BOS), special(1, EOS), special(2, UNK)],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        // transformers adds bos/eos through this; gen-models adds them itself (it encodes
        // without special tokens), so both give `[bos] words [eos]`.
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": EOS, "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": BOS, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": EOS, "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}, {"SpecialToken": {"id": EOS, "type_id": 1}}],
            "special_tokens": {
                BOS: {"id": BOS, "ids": [0], "tokens": [BOS]},
                EOS: {"id": EOS, "ids": [1], "tokens": [EOS]}
            }},
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": UNK}
    });
    write_atomic(dir.join("tokenizer.json"), &pretty(&tokenizer)?)?;
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": UNK,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": false
    });
    write_atomic(dir.join("tokenizer_config.json"), &pretty(&config)?)?;
    let map = json!({"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": UNK});
    write_atomic(dir.join("special_tokens_map.json"), &pretty(&map)?)
}
