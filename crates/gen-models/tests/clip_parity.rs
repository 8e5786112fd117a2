//! CLIP text and vision outputs against transformers (float64 forward of tiny random models).
//! Fixtures: scripts/fixtures_clip.py → tests/fixtures/clip/.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use gen_models::clip::{
    ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig, ClipVisionModelWithProjection,
    TextForwardOptions,
};
use gen_models::loading::weights_vb;

fn dir(sub: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/clip").join(sub)
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

fn text_case(sub: &str) -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let cfg = ClipTextConfig::from_file(dir(sub).join("config.json"))?;
    let out = candle_core::safetensors::load(dir(sub).join("outputs.safetensors"), &dev)?;
    let vb = weights_vb(&[dir(sub).join("model.safetensors")], DType::F64, &dev)?;
    let model = ClipTextModelWithProjection::new(vb, &cfg)?;
    let ids = &out["input_ids"];
    let (o, embeds) = model
        .forward(ids, &TextForwardOptions { output_hidden_states: true, ..Default::default() })?;
    let tol = 1e-9;
    let checks = [
        ("embeddings", &o.hidden_states[0]),
        ("last_hidden_state", &o.last_hidden_state),
        ("penultimate", &o.penultimate),
        ("text_embeds", &embeds),
    ];
    for (name, t) in checks {
        let e = max_abs(t, &out[name]);
        println!("{sub} {name}: max |err| = {e:.3e}");
        assert!(e < tol, "{sub} {name}: {e}");
    }
    let skip = model
        .text_model
        .forward(ids, &TextForwardOptions { clip_skip: 1, ..Default::default() })?;
    let e = max_abs(&skip.selected, &out["penultimate_ln"]);
    assert!(e < tol, "{sub} clip_skip=1: {e}");
    let raw = model.text_model.forward(
        ids,
        &TextForwardOptions {
            clip_skip: 1,
            no_final_layer_norm_on_skip: true,
            ..Default::default()
        },
    )?;
    assert!(max_abs(&raw.selected, &out["penultimate"]) < tol);
    // f32 weights and compute stay close too
    let vb32 = weights_vb(&[dir(sub).join("model.safetensors")], DType::F32, &dev)?;
    let m32 = ClipTextModelWithProjection::new(vb32, &cfg)?;
    let (o32, _) = m32.forward(ids, &TextForwardOptions::default())?;
    let e32 = max_abs(&o32.last_hidden_state, &out["last_hidden_state"]);
    println!("{sub} f32 last_hidden_state: max |err| = {e32:.3e}");
    assert!(e32 < 1e-4, "{e32}");
    Ok(())
}

#[test]
fn text_quick_gelu_legacy_eos_matches_transformers() -> anyhow::Result<()> {
    text_case("text-quickgelu-eos2")
}

#[test]
fn text_gelu_first_eos_matches_transformers() -> anyhow::Result<()> {
    text_case("text-gelu")
}

#[test]
fn vision_matches_transformers() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let sub = "vision";
    let cfg = ClipVisionConfig::from_file(dir(sub).join("config.json"))?;
    let out = candle_core::safetensors::load(dir(sub).join("outputs.safetensors"), &dev)?;
    let vb = weights_vb(&[dir(sub).join("model.safetensors")], DType::F64, &dev)?;
    let model = ClipVisionModelWithProjection::new(vb, &cfg)?;
    let o = model.forward(&out["pixel_values"])?;
    for (name, t) in [
        ("last_hidden_state", &o.last_hidden_state),
        ("pooled", &o.pooled),
        ("image_embeds", &o.image_embeds),
    ] {
        let e = max_abs(t, &out[name]);
        println!("vision {name}: max |err| = {e:.3e}");
        assert!(e < 1e-9, "vision {name}: {e}");
    }
    Ok(())
}

#[test]
fn text_model_without_prefix_loads_the_same() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let sub = "text-gelu";
    let cfg = ClipTextConfig::from_file(dir(sub).join("config.json"))?;
    let tensors = candle_core::safetensors::load(dir(sub).join("model.safetensors"), &dev)?;
    let stripped: std::collections::HashMap<String, Tensor> = tensors
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("text_model.").map(|k| (k.to_string(), v)))
        .collect();
    let tmp = std::env::temp_dir()
        .join(format!("gen-models-unprefixed-{}.safetensors", std::process::id()));
    candle_core::safetensors::save(&stripped, &tmp)?;
    let a = gen_models::clip::ClipTextTransformer::new_unprefixed(
        weights_vb(std::slice::from_ref(&tmp), DType::F64, &dev)?,
        &cfg,
    )?;
    let b = gen_models::clip::ClipTextTransformer::new(
        weights_vb(&[dir(sub).join("model.safetensors")], DType::F64, &dev)?,
        &cfg,
    )?;
    let ids = Tensor::new(&[[98u32, 4, 5, 99, 1]], &dev)?;
    let oa = a.forward(&ids, &TextForwardOptions::default())?;
    let ob = b.forward(&ids, &TextForwardOptions::default())?;
    assert_eq!(max_abs(&oa.last_hidden_state, &ob.last_hidden_state), 0.0);
    assert_eq!(a.linears().len(), 6 * cfg.num_hidden_layers);
    std::fs::remove_file(&tmp).ok();
    Ok(())
}

#[test]
fn full_clip_model_logits_match_transformers() -> anyhow::Result<()> {
    let dev = Device::Cpu;
    let sub = "clip-model";
    let cfg = gen_models::clip::ClipConfig::from_file(dir(sub).join("config.json"))?;
    assert_eq!((cfg.projection_dim, cfg.text.projection_dim, cfg.vision.patch_size), (16, 16, 8));
    let out = candle_core::safetensors::load(dir(sub).join("outputs.safetensors"), &dev)?;
    let w = gen_models::loading::SafetensorsWeights::open(&[dir(sub).join("model.safetensors")])?;
    let model = gen_models::clip::ClipModel::new(w.var_builder(DType::F64, &dev), &cfg)?;
    assert_eq!(w.unused_keys(), Vec::<String>::new());
    let logits = model.logits_per_image(&out["input_ids"], &out["pixel_values"])?;
    let e = max_abs(&logits, &out["logits_per_image"]);
    println!("clip-model logits_per_image: max |err| = {e:.3e}");
    assert!(e < 1e-9, "{e}");
    let (_, t) = model.text.forward(&out["input_ids"], &TextForwardOptions::default())?;
    // CLIPModel returns L2-normalised embeddings
    assert!(max_abs(&gen_models::clip::l2_normalize(&t)?, &out["text_embeds"]) < 1e-9);
    Ok(())
}

#[test]
fn clip_normalize_uses_clip_mean_and_std() -> anyhow::Result<()> {
    let x = Tensor::ones((1, 3, 2, 2), DType::F64, &Device::Cpu)?;
    let y = gen_models::clip::clip_normalize(&x)?;
    let v: Vec<f64> = y.flatten_all()?.to_vec1()?;
    // (1 - 0.48145466) / 0.26862954 for the red channel, by hand
    assert!((v[0] - 1.9303361).abs() < 1e-6, "{}", v[0]);
    assert!((v[11] - (1.0 - 0.40821073) / 0.27577711).abs() < 1e-12);
    Ok(())
}
