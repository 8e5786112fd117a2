//! The tiny diffusers reference folder (tests/fixtures/tiny-sd, scripts/make_tiny_sd.py): every
//! text-encoder key is resolved, the tokenizer and text encoder match transformers
//! (tests/fixtures/parity, scripts/make_parity_fixtures.py).

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gen_models::clip::{ClipTextConfig, ClipTextTransformer, TextForwardOptions};
use gen_models::loading::{find_weight_files, SafetensorsWeights, WeightVariant};
use gen_models::tokenizer::Tokenizer;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

fn text_encoder_case(sub: &str, parity: &str) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let dir = root().join("tiny-sd").join(sub);
    let cfg = ClipTextConfig::from_file(dir.join("config.json"))?;
    let files = find_weight_files(&dir, &WeightVariant::default())?;
    let w = SafetensorsWeights::open(&files)?;
    let model = ClipTextTransformer::new(w.var_builder(DType::F64, &dev), &cfg)?;
    assert_eq!(w.unused_keys(), Vec::<String>::new(), "{sub}: keys the model does not read");
    let out = candle_core::safetensors::load(root().join("parity").join(parity), &dev)?;
    let o = model.forward(&out["input_ids"], &TextForwardOptions::default())?;
    let skip = model
        .forward(&out["input_ids"], &TextForwardOptions { clip_skip: 1, ..Default::default() })?;
    for (name, t) in [
        ("last_hidden_state", &o.last_hidden_state),
        ("penultimate", &o.penultimate),
        ("penultimate_normed", &skip.selected),
        ("pooled", &o.pooled),
    ] {
        let e = max_abs(t, &out[name]);
        println!("{sub} {name}: max |err| = {e:.3e}");
        assert!(e < 1e-5, "{sub} {name}: {e}");
    }
    Ok(())
}

#[test]
fn tiny_sd_text_encoder_loads_every_key_and_matches() -> anyhow::Result<()> {
    text_encoder_case("text_encoder", "text_encoder.safetensors")
}

#[test]
fn tiny_sd_text_encoder_gelu_loads_every_key_and_matches() -> anyhow::Result<()> {
    text_encoder_case("text_encoder-gelu", "text_encoder_gelu.safetensors")
}

#[test]
fn tiny_sd_tokenizer_matches_transformers() -> anyhow::Result<()> {
    let dir = root().join("tiny-sd/tokenizer");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("parity/tokenizer_ids.json"))?)?;
    let max_len = v["max_length"].as_u64().unwrap() as usize;
    // both ways of reading the folder: tokenizer.json, and vocab.json + merges.txt
    let from_json = Tokenizer::from_folder(&dir)?;
    let specials = gen_models::tokenizer::SpecialTokens::from_folder(&dir)?;
    let from_bpe =
        Tokenizer::from_vocab_merges(dir.join("vocab.json"), dir.join("merges.txt"), &specials)?;
    let cases = v["cases"].as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        for (which, tok) in [("tokenizer.json", &from_json), ("vocab+merges", &from_bpe)] {
            let enc = tok.encode(text, max_len)?;
            assert_eq!(enc.ids, want, "{which}: {text:?}");
        }
    }
    let long = from_json.encode(cases.last().unwrap()["text"].as_str().unwrap(), max_len)?;
    assert!(long.truncated);
    Ok(())
}
