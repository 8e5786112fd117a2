//! Tokenizer ids against transformers' CLIPTokenizer and the `tokenizers` word-level model.
//! Fixtures: scripts/fixtures_tokenizer.py → tests/fixtures/tokenizer/.

use std::path::PathBuf;

use gen_models::tokenizer::Tokenizer;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn expected() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
        .unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn check_clip(folder: &str, key: &str) -> anyhow::Result<()> {
    let tok = Tokenizer::from_folder(fixtures().join(folder))?;
    let exp = expected();
    let max_len = exp["max_len"].as_u64().unwrap() as usize;
    assert_eq!(tok.model_max_length(), Some(max_len));
    let cases = exp[key].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let prompt = case["prompt"].as_str().unwrap();
        let enc = tok.encode(prompt, max_len)?;
        assert_eq!(enc.ids, ids(&case["ids"]), "{folder}: prompt {prompt:?}");
        if let Some(n) = case.get("num_tokens") {
            let n = n.as_u64().unwrap() as usize;
            assert_eq!(enc.num_tokens, n, "{prompt:?}");
            assert_eq!(enc.truncated, n > max_len - 2, "{prompt:?}");
        }
    }
    Ok(())
}

#[test]
fn clip_bpe_from_vocab_and_merges_matches_transformers() -> anyhow::Result<()> {
    check_clip("clip-bpe", "clip_bpe")
}

#[test]
fn clip_bpe_from_tokenizer_json_matches_transformers() -> anyhow::Result<()> {
    check_clip("clip-json", "clip_bpe")
}

#[test]
fn clip_bpe_sd2_pads_with_exclamation_mark() -> anyhow::Result<()> {
    let tok = Tokenizer::from_folder(fixtures().join("clip-bpe-pad0"))?;
    assert_eq!(tok.pad_id(), 0);
    check_clip("clip-bpe-pad0", "clip_bpe_pad0")
}

#[test]
fn truncation_is_reported() -> anyhow::Result<()> {
    let tok = Tokenizer::from_folder(fixtures().join("clip-bpe"))?;
    let long = tok.encode("a red cube a red cube a red cube a red cube", 8)?;
    assert!(long.truncated);
    assert_eq!(long.ids.len(), 8);
    assert_eq!(long.ids[0], tok.bos_id().unwrap());
    assert_eq!(long.ids[7], tok.eos_id().unwrap());
    let short = tok.encode("a red cube", 8)?;
    assert!(!short.truncated);
    // exactly fitting: 6 tokens + bos + eos = 8
    let fit = tok.encode("a red cube a red cube", 8)?;
    assert!(!fit.truncated);
    let batch = tok.encode_batch(&["a red cube", "the blue sphere"], 8)?;
    let t = Tokenizer::ids_tensor(&batch, &candle_core::Device::Cpu)?;
    assert_eq!(t.dims(), &[2, 8]);
    assert!(tok.encode("a", 1).is_err());
    Ok(())
}

#[test]
fn word_level_unknown_words() -> anyhow::Result<()> {
    let tok = Tokenizer::from_folder(fixtures().join("word-level"))?;
    let exp = expected();
    let max_len = exp["max_len"].as_u64().unwrap() as usize;
    assert_eq!(tok.unk_id(), Some(2));
    for case in exp["word_level"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        let tokens = ids(&case["tokens"]);
        assert_eq!(tok.tokenize(prompt)?, tokens, "{prompt:?}");
        let unknown: Vec<String> = case["unknown"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tok.unknown_words(prompt)?, unknown, "{prompt:?}");
        let enc = tok.encode(prompt, max_len)?;
        let mut want = vec![0u32];
        want.extend(tokens.iter().take(max_len - 2));
        want.push(1);
        want.resize(max_len, 1);
        assert_eq!(enc.ids, want, "{prompt:?}");
    }
    let known = tok.known_words();
    assert!(known.contains(&"cube".to_string()));
    assert!(!known.contains(&"[UNK]".to_string()));
    assert!(!known.contains(&"<|endoftext|>".to_string()));
    assert_eq!(known.len(), 10);
    Ok(())
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = std::env::temp_dir().join(format!("gen-tok-missing-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("readme.txt"), "x").unwrap();
    let e = Tokenizer::from_folder(&dir).unwrap_err().to_string();
    assert!(e.contains("tokenizer.json") && e.contains("readme.txt"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}
