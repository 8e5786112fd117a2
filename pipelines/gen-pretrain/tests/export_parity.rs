//! The exported folder format against diffusers/transformers: a tiny-preset f16 export
//! (tests/fixtures/tiny-export) and its reference outputs computed by diffusers 0.42.1 and
//! transformers (scripts/fixtures_pretrain_export.py → tiny-export-expected.safetensors).
//!
//! 1. The exporter still writes the fixture's config and tokenizer files (so the fixture stands
//!    for the current format).
//! 2. gen-models reads that folder exactly as diffusers/transformers do: same token ids, text
//!    hidden states, UNet, VAE and CLIP outputs.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gen_models::clip::{clip_normalize, ClipConfig, ClipModel, TextForwardOptions};
use gen_models::loading::SafetensorsWeights;
use gen_models::pipeline::{LoadOptions, ModelSource, SdPipeline};
use gen_pretrain::stages::{
    clip_config_json, scheduler_config_json, text_encoder_config_json, unet_config_json,
    vae_config_json,
};
use gen_pretrain::PretrainConfig;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn json(p: PathBuf) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

#[test]
fn exporter_writes_the_fixture_format() -> anyhow::Result<()> {
    let dir = fixtures().join("tiny-export");
    let cfg = PretrainConfig::tiny();
    assert_eq!(json(dir.join("clip/config.json")), clip_config_json(&cfg));
    assert_eq!(json(dir.join("text_encoder/config.json")), text_encoder_config_json(&cfg));
    assert_eq!(json(dir.join("unet/config.json")), unet_config_json(&cfg));
    assert_eq!(json(dir.join("scheduler/scheduler_config.json")), scheduler_config_json());
    let vae = json(dir.join("vae/config.json"));
    let s = vae["scaling_factor"].as_f64().unwrap();
    assert_eq!(vae, vae_config_json(&cfg, s));
    let tmp = std::env::temp_dir().join(format!("gen-pretrain-tok-{}", std::process::id()));
    gen_pretrain::tokenizer::write_tokenizer(&tmp, cfg.max_text_len)?;
    for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"] {
        assert_eq!(json(tmp.join(f)), json(dir.join("tokenizer").join(f)), "{f}");
    }
    std::fs::remove_dir_all(&tmp)?;
    Ok(())
}

#[test]
fn gen_models_reads_the_export_as_diffusers_does() -> anyhow::Result<()> {
    let dir = fixtures().join("tiny-export");
    let exp = candle_core::safetensors::load(
        fixtures().join("tiny-export-expected.safetensors"),
        &Device::Cpu,
    )?;
    let pipe = SdPipeline::load(&ModelSource::Local(dir.clone()), &LoadOptions::default())?;
    assert!(pipe.unused_keys.is_empty(), "{:?}", pipe.unused_keys);
    // the prompts of scripts/fixtures_pretrain_export.py
    let prompts =
        ["a red cube", "A light blue torus on a grey background, side view", "", "a shiny cone"];
    let (hidden, enc) = pipe.encode_prompts(&prompts, &TextForwardOptions::default())?;
    let want_ids: Vec<Vec<i64>> = exp["ids"].to_vec2()?;
    for (e, w) in enc.iter().zip(&want_ids) {
        assert_eq!(e.ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), *w);
    }
    assert_eq!(pipe.tokenizer.unknown_words("a shiny cone")?, vec!["shiny".to_string()]);
    let d = max_diff(&hidden, &exp["hidden"]);
    assert!(d < 1e-5, "text encoder: {d}");
    let ctx = hidden.narrow(0, 0, 2)?;
    let eps = pipe.unet.forward(&exp["x"], &exp["t"], &ctx)?;
    let d = max_diff(&eps, &exp["eps"]);
    assert!(d < 1e-5, "unet: {d}");
    let post = pipe.vae.encode(&exp["img"])?;
    let scale = exp["post_mean"].abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let d = max_diff(&post.mean, &exp["post_mean"]);
    assert!(d < 1e-5 * scale.max(1.0), "vae posterior mean: {d} (max |mean| {scale})");
    let d = max_diff(&post.logvar, &exp["post_logvar"]);
    assert!(d < 1e-4, "vae posterior logvar: {d}");
    let d = max_diff(&pipe.vae.decode(&exp["x"])?, &exp["decoded"]);
    assert!(d < 1e-5, "vae decode: {d}");
    // the full CLIP (scorer) folder
    let w = SafetensorsWeights::open(&[dir.join("clip/model.safetensors")])?;
    let clip = ClipModel::new(
        w.var_builder(DType::F32, &Device::Cpu),
        &ClipConfig::from_file(dir.join("clip/config.json"))?,
    )?;
    let ids = Tensor::from_vec(
        want_ids.concat().iter().map(|&i| i as u32).collect::<Vec<_>>(),
        (4, want_ids[0].len()),
        &Device::Cpu,
    )?;
    let logits = clip.logits_per_image(&ids, &clip_normalize(&exp["pixels"])?)?;
    let d = max_diff(&logits, &exp["clip_logits"]);
    assert!(d < 1e-4, "clip logits: {d}");
    Ok(())
}
